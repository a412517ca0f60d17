"""Data from the config alone: `data.source`, `data.source_fields` and `data.objective` -> a Task.

    --config.data.source=jsonl:data/{split}.jsonl --config.data.source_fields=inputs=q,targets=a

At start-up (cli.build, before the config is validated) `apply(config)` registers a Task built
from these three fields and points data.task at it, so the rest of the run reads it as any
registered task: per-process slices, packing, the checkpointed iterator position and its exact
resume, validation on its 'validation' split. The task's name spells the three fields (e.g.
"data.source=jsonl:train.jsonl (supervised, inputs=q,targets=a)"), so a resume that reads other
files or another objective is refused as a change of data.task (pipeline.DataStateMismatchError).

data.source is FORMAT:PATTERN or hf:FOLDER:

  jsonl        one JSON object per line                     (sources.JsonlSource)
  tsv          a header line naming the columns, then rows  (sources.TsvSource)
  text         one example {'text': line} per line          (sources.TextLineSource)
  parquet      one example per row                          (table_sources.ParquetSource)
  arrayrecord  one JSON object per record                   (table_sources.ArrayRecordSource)
  hf           a `datasets` folder                          (table_sources.HfSource)

PATTERN is a file or a glob, local or gs:// (see the formats' sources); '{split}' in it is replaced by the split name (train, validation, test). Without '{split}' the files are the
split 'train' only. The objectives:

  supervised       inputs <- column, targets <- column, tokenized
  span_corruption  T5's (noise 0.15, mean span 3) over the `inputs` column: each text tokenized, a
                   random chunk that fills data.inputs_length (T5's select_random_chunk), corrupted
  prefix_lm        the same chunk split at a uniformly random point into inputs and targets

The vocabulary is data.vocabulary's (data.vocabulary=task has none to give: refused).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

from t5lite.fields import ConfigError

FORMATS = ('jsonl', 'tsv', 'text', 'parquet', 'arrayrecord', 'hf')
OBJECTIVES = ('supervised', 'span_corruption', 'prefix_lm')
SPLITS = ('train', 'validation', 'test')  # what '{split}' becomes
FEATURES = ('inputs', 'targets')
EXAMPLE = '--config.data.source=jsonl:data/{split}.jsonl'


def parse_source(source: str) -> tuple[str, str]:
  """(format, pattern) of data.source; ConfigError saying what would be valid."""
  fmt, sep, pattern = source.partition(':')
  if not sep or fmt not in FORMATS:
    guess = next((f for f in FORMATS if source.rstrip('/').endswith(f'.{f}')), 'jsonl')
    # 'gs://b/x.jsonl' lacks a format; 'csv:x.csv' has a wrong one.
    files = pattern if sep and not pattern.startswith('//') else source
    raise ConfigError(f'config.data.source={source!r}: expected FORMAT:PATTERN with FORMAT one '
                      f'of {", ".join(FORMATS)} (hf:FOLDER for HuggingFace datasets), e.g. '
                      f'{guess}:{files}')
  if not pattern.strip():
    raise ConfigError(f'config.data.source={source!r} names no files: set it to your training '
                      f'data, e.g. {EXAMPLE} (files train.jsonl and validation.jsonl)')
  return fmt, pattern


def parse_fields(text: str, objective: str) -> dict[str, str]:
  """{feature: column} of data.source_fields ('inputs=question,targets=answer'), reduced to what
  `objective` reads: inputs and targets for supervised, inputs for the others."""
  mapping: dict[str, str] = {}
  for part in filter(None, (p.strip() for p in str(text).split(','))):
    feature, sep, column = (s.strip() for s in part.partition('='))
    if not sep or not feature or not column:
      raise ConfigError(f'config.data.source_fields={text!r}: {part!r} is not feature=column, '
                        "e.g. 'inputs=question,targets=answer'")
    if feature not in FEATURES:
      raise ConfigError(f'config.data.source_fields={text!r}: unknown feature {feature!r}; the '
                        f'features are {", ".join(FEATURES)}')
    if feature in mapping:
      raise ConfigError(f'config.data.source_fields={text!r}: {feature!r} is mapped twice')
    mapping[feature] = column
  wanted = FEATURES if objective == 'supervised' else ('inputs',)
  missing = [f for f in wanted if f not in mapping]
  if missing:
    raise ConfigError(f'config.data.source_fields={text!r}: data.objective={objective!r} reads '
                      f'{" and ".join(wanted)}; map {", ".join(missing)} to a column, e.g. '
                      f"{','.join(f'{f}=COLUMN' for f in wanted)}")
  return {f: mapping[f] for f in wanted}


def split_patterns(pattern: str) -> dict[str, str]:
  if '{split}' in pattern:
    return {s: pattern.replace('{split}', s) for s in SPLITS}
  return {'train': pattern}


def check_config(c) -> None:
  """The config rule of data.source (t5lite/config_rules.py): its syntax, the fields the
  objective reads, and the settings it needs; the training files must exist, and the validation
  files when eval.every_steps validates on it. No-op for ''."""
  d = c.data
  if not isinstance(d.source, str) or not d.source:
    return  # '' reads data.task; a non-string is the per-field check's to report
  fmt, pattern = parse_source(d.source)
  parse_fields(d.source_fields, d.objective)
  if d.vocabulary == 'task':
    raise ConfigError("config.data.vocabulary='task' gives data.source no vocabulary (its task "
                      "declares none); use 'embedded', 'byte' or a SentencePiece .model path")
  if d.converter == 'decoder':
    raise ConfigError(f'config.data.source: data.objective={d.objective!r} makes inputs and '
                      "targets, which data.converter='decoder' does not read; use "
                      "data.converter='prefix_lm' (decoder-only) or 'encdec'")
  splits = ['train']
  validates = getattr(c, 'eval', None) is not None and c.eval.every_steps and not c.eval.task
  if validates:  # the validation loss reads eval.split of this task: said now, not at step N
    if '{split}' not in pattern and fmt != 'hf':
      raise ConfigError(
          f'config.eval.every_steps={c.eval.every_steps} validates on split '
          f"{c.eval.split!r} of data.source={d.source!r}, which has no '{{split}}' in "
          f'its pattern (its files are the split train); write e.g. {EXAMPLE}, or '
          'set eval.every_steps=0')
    splits.append(c.eval.split)
  for split in splits:
    _check_files(d.source, fmt, pattern, split)


def _check_files(source: str, fmt: str, pattern: str, split: str) -> None:
  from t5lite.data import sources  # pylint: disable=import-outside-toplevel  (data stack)
  path = pattern.replace('{split}', split)
  if fmt in ('hf', 'arrayrecord') and '://' in path:
    raise ConfigError(f'config.data.source={source!r}: {fmt} sources read local files only (the '
                      'readers open files by path); copy them to a local disk, or use jsonl, tsv, '
                      'text or parquet, which read gs:// too')
  if fmt == 'hf':
    folder = path if '{split}' in pattern else pattern
    if '://' not in folder and not os.path.isdir(folder):
      raise ConfigError(f'config.data.source={source!r}: no folder {folder!r}; hf: reads a '
                        '`datasets` save_to_disk folder or a folder of Parquet/Arrow files')
    return
  try:
    sources.expand_patterns(path)
  except sources.DataFileNotFoundError:
    raise ConfigError(f'config.data.source={source!r}: no file matches {path!r} (the split '
                      f'{split!r}); set data.source to your files, e.g. {EXAMPLE}') from None


def task_name(d) -> str:
  """The registered name of data.source's task: the three fields that make it."""
  fields = parse_fields(d.source_fields, d.objective)
  return (f'data.source={d.source} ({d.objective}, '
          f'{",".join(f"{k}={v}" for k, v in fields.items())})')


def make_source(fmt: str, pattern: str, label: str):
  from t5lite.data import sources, table_sources  # pylint: disable=import-outside-toplevel
  if fmt == 'hf':
    return table_sources.HfSource(pattern, label)
  patterns = split_patterns(pattern)
  if fmt == 'jsonl':
    return sources.JsonlSource(patterns, label)
  if fmt == 'tsv':
    return sources.TsvSource(patterns, None, label)
  if fmt == 'text':
    return sources.TextLineSource(patterns, 'text', label)
  if fmt == 'parquet':
    return table_sources.ParquetSource(patterns, label)
  if fmt == 'arrayrecord':
    return table_sources.ArrayRecordSource(patterns, label)
  raise ConfigError(f'config.data.source: unknown format {fmt!r}; one of {", ".join(FORMATS)}')


class ColumnsChecked:
  """data.source's Source, with its columns checked against data.source_fields when a split is
  opened (its first example, so a wrong mapping is said before any batch), and the hint for a
  split a pattern without '{split}' does not have."""

  def __init__(self, source, mapping: Mapping[str, str], label: str, has_split_pattern: bool):
    self.source = source
    self.mapping = dict(mapping)
    self.label = label
    self.split_hint = '' if has_split_pattern else (
        f" {label} has no '{{split}}' in its pattern, so its files are the split 'train' only; "
        'write e.g. data/{split}.jsonl for train and validation files.')

  @property
  def splits(self):
    return self.source.splits

  def num_examples(self, split):
    return len(self.get(split))

  def get(self, split):
    rows = self.source.get(split)
    missing_column(rows[0], self.mapping, f'{self.label} split {split!r}, first example')
    return rows


def missing_column(example: Mapping[str, Any], mapping: Mapping[str, str], where: str) -> None:
  from t5lite.data.sources import DataSourceError  # pylint: disable=import-outside-toplevel
  for feature, column in mapping.items():
    if column not in example:
      raise DataSourceError(
          f'{where}: no column {column!r} (data.source_fields maps {feature} to it); the columns '
          f'are {sorted(example)}: map {feature} to one of them in data.source_fields '
          "(feature=column pairs, e.g. 'inputs=question,targets=answer').")


class SelectColumns:
  """Step: {feature: example[column]} as text; a missing column or a non-text value is an error
  naming the column (a top-level class, so grain worker processes can pickle it)."""

  def __init__(self, mapping: Mapping[str, str], label: str):
    self.mapping = dict(mapping)
    self.label = label

  def __call__(self, example, ctx):
    from t5lite.data.sources import DataSourceError  # pylint: disable=import-outside-toplevel
    missing_column(example, self.mapping, f'{self.label}: an example')
    out = {}
    for feature, column in self.mapping.items():
      value = example[column]
      if isinstance(value, bytes):
        value = value.decode('utf-8')
      if not isinstance(value, str):
        raise DataSourceError(f'{self.label}: column {column!r} holds a {type(value).__name__} '
                              f'({str(value)[:40]!r}), expected text; write it as a string in '
                              'the data, or map another column in data.source_fields.')
      out[feature] = value
    return out


def _steps(objective: str, mapping: Mapping[str, str], label: str) -> list:
  from t5lite.data import preprocessors as P  # pylint: disable=import-outside-toplevel
  if objective == 'supervised':
    return [SelectColumns(mapping, label), P.tokenize]
  # One text per example, as the C4 tasks (t5lite.data.catalog.pretraining): lazily, per example.
  text = [SelectColumns({'targets': mapping['inputs']}, label), P.tokenize]
  if objective == 'span_corruption':
    return text + [
        P.RandomChunk(P.span_corruption_raw_length),
        functools.partial(P.span_corruption_step, noise_density=0.15, mean_noise_span_length=3.0)
    ]
  if objective == 'prefix_lm':
    return text + [P.RandomChunk(P.prefix_lm_raw_length), P.prefix_lm]
  raise ConfigError(f'config.data.objective={objective!r}: one of {", ".join(OBJECTIVES)}')


def register(d):
  """Registers (again, if it is) data.source's task from the data section `d`; returns it."""
  from t5lite.data import tasks, vocab  # pylint: disable=import-outside-toplevel
  fmt, pattern = parse_source(d.source)
  mapping = parse_fields(d.source_fields, d.objective)
  label = f'data.source={d.source}'
  source = ColumnsChecked(make_source(fmt, pattern, label), mapping, label, fmt == 'hf'
                          or '{split}' in pattern)
  feature = tasks.Feature(functools.partial(vocab.get_vocabulary, d.vocabulary, d.sp_vocab_size))
  # Texts too short for an objective (a one-token line) are dropped and counted, as C4's are;
  # a supervised example with an empty side is a data error, said with its task.
  return tasks.add_task(task_name(d), source, _steps(d.objective, mapping, label),
                        {'inputs': feature, 'targets': feature}, overwrite=True,
                        drop_invalid=d.objective != 'supervised')


def apply(config):
  """data.source set: checks it, registers its task and points data.task at it (a ConfigDict in
  place; a RunConfig is returned replaced). Returns the config."""
  if not isinstance(config.data.source, str) or not config.data.source:
    return config
  check_config(config)
  name = register(config.data).name
  if dataclasses.is_dataclass(config):
    return dataclasses.replace(config, data=dataclasses.replace(config.data, task=name))
  config.data.task = name
  return config
