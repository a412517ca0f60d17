"""Batch inference: `python -m t5lite.infer --config C[:arg] --checkpoint SPEC (--input IN.jsonl |
--task NAME [--split S]) --output OUT.jsonl [--workdir W] [--config.x=y ...]`.

Decodes every input with config.decode and writes one JSON object per input, in input order:
`{"index": i, "line": n, "input": ..., "prediction": ..., "target": ...}` (`line`: the input
file's line number; `target` when the input has one).

`--mode score` (infer.mode=score) decodes nothing: it scores each line's given target instead,
`{"index", "line", "input", "target", "log_likelihood", "num_tokens", "score"}` with
log_likelihood = sum over the target's tokens (EOS included) of log p(token | input, the target
before it), num_tokens those tokens, and score the log-likelihood, or its mean per token with
infer.length_normalize (T5X's `score_batch`, seqio's normalize_by_target_length). Every line needs
a target (infer.target_key); a target longer than data.targets_length (EOS included) is an error
naming the line, never cut: its score would be another string's. --checkpoint is as for t5lite.eval (latest,
N, a path, hf:DIR; latest and N read --workdir's checkpoints).

Input: JSON lines, each an object with the text under infer.input_key (default "inputs") and
optionally a target under infer.target_key; a line that is a bare JSON string is an input too;
blank lines are ignored. `<extra_id_N>` in the text is sentinel N (as HuggingFace's T5 tokenizer
reads it), so span-corruption style inputs can be written out. A line that is not valid JSON or
has no input string is an error naming the line number (infer.on_bad_line='error'), or is
skipped and counted ('skip'). An input longer than data.inputs_length tokens (EOS included) is
cut to fit with a counted warning (infer.on_too_long='truncate') or is an error naming the line
('error'). All inputs are read and checked before the model is loaded. --task reads a registered task's split instead (inputs after
its preprocessing, detokenized for the output).

Resumable: each batch is written and flushed (and fsync'ed) as soon as it is decoded. Run the same
command again after an interruption and it keeps the complete lines already in --output, drops a
cut-off last line, and continues. It restarts at the start of the batch that holds the first
missing input, so batches (and sampling's per-batch random keys) are the same as in an
uninterrupted run and the file ends up identical. An output file written for other inputs is an
error. Several processes: every process reads all inputs and decodes its share; process 0 writes.

--input and --output may be gs:// URLs (pip install 't5lite[gcp]'). An object cannot be appended
to, so a gs:// --output is uploaded whole at most every 30 seconds and when the job ends or is
stopped (see _Output); a rerun resumes from what was uploaded. Progress lines say the lines done,
the rate and the ETA, after a 'compiling the decode step' line around the first batch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from t5lite import checkpoints, cli, files, init_from, logs, partitioning
from t5lite import config as config_lib
from t5lite.data import catalog  # pylint: disable=unused-import  (registers the built-in tasks)
from t5lite.data import tasks as tasks_lib
from t5lite.data import vocab as vocab_lib
from t5lite.evaluation import evaluator as evaluator_lib
from t5lite.evaluation import scoring
from t5lite.models import decoding

log = logging.getLogger('t5lite.infer')  # not __name__: '__main__' under python -m


class InferError(ValueError):
  """Bad input or output file; the message names the file and line (exit code 2)."""


def _parse_line(raw: bytes, input_key: str):
  """(the line's JSON object, None), (None, None) for a blank line, or (None, what is wrong)."""
  try:
    line = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    return None, f'not UTF-8 text (byte {e.start + 1} of the line)'
  if not line.strip():
    return None, None
  try:
    value = json.loads(line)
  except json.JSONDecodeError as e:
    return None, f'not valid JSON ({e.msg} at column {e.colno})'
  if isinstance(value, str):
    value = {input_key: value}
  if not isinstance(value, dict) or not isinstance(value.get(input_key), str):
    return None, f'no {input_key!r} string (set infer.input_key to the field holding the text)'
  return value, None


def read_jsonl(path: str, input_key: str, target_key: str, on_bad_line: str,
               need_target: bool = False):
  """([{'line', 'input', 'target'?}], number of bad lines skipped); with `need_target` a line
  without a target string is a bad line."""
  records, bad = [], 0
  try:
    # bytes: a line that is not UTF-8 is a bad line, named like the others
    f = files.to_path(path).open('rb')
  except OSError as e:
    raise InferError(f'--input {path}: cannot read it ({e.strerror or e})') from None
  with f:
    for number, raw in enumerate(f, 1):
      value, problem = _parse_line(raw, input_key)
      if need_target and value is not None and not isinstance(value.get(target_key), str):
        problem = (f'no {target_key!r} string to score (infer.mode=score; set infer.target_key to '
                   'the field holding the target)')
      if problem:
        if on_bad_line == 'error':
          raise InferError(f'{path}: line {number}: {problem}; fix the line or set '
                           'infer.on_bad_line=skip to skip and count such lines')
        bad += 1
        if bad & (bad - 1) == 0:
          log.info(f'warning: {path}: line {number}: {problem}; skipped ({bad} so far)')
        continue
      if value is None:
        continue
      record = {'line': number, 'input': value[input_key]}
      if target_key in value:
        record['target'] = value[target_key]
      records.append(record)
  return records, bad


def read_task(name: str, split: str, vocabulary, seed: int):
  """Records of a task's split: input ids after its preprocessing (EOS included, not trimmed)."""
  task = tasks_lib.get_task(name)
  features = task.output_features
  if vocabulary is not None:
    features = {k: f.replace(vocabulary=vocabulary) for k, f in features.items()}
  if 'inputs' not in features:
    raise InferError(f'--task {name}: the task has no inputs feature to decode from')
  records = []
  for i, example in enumerate(task.examples(split, None, features)):
    ctx = task.context(None, np.random.default_rng([seed, 2, i]), features)
    example = task.process(example, ctx)
    if example is None:
      continue
    record = {
        'ids': [int(t) for t in example['inputs']],
        'input': features['inputs'].vocabulary.decode(example['inputs'])
    }
    if 'targets' in example:
      record['target'] = features['targets'].vocabulary.decode(example['targets'])
      record['target_ids'] = [int(t) for t in example['targets']]
    records.append(record)
  return records


def fit_inputs(records, vocabulary, length: int, on_too_long: str, where: str,
               feature: str = 'input') -> int:
  """Sets record['ids'] (record['target_ids'] for feature='target'): EOS included, at most
  `length`; returns how many were truncated."""
  key, field = ('ids', 'inputs_length') if feature == 'input' else ('target_ids', 'targets_length')
  cut = 0
  for i, r in enumerate(records):
    ids = r.get(key)
    if ids is None:
      ids = vocab_lib.encode_with_sentinels(vocabulary, r[feature]) + [vocabulary.eos_id]
    if len(ids) > length:
      at = f'line {r["line"]}' if 'line' in r else f'example {i}'
      if on_too_long == 'error':
        raise InferError(f'{where}: {at}: the {feature} has {len(ids)} tokens (EOS included), '
                         f'more than data.{field}={length}; raise data.{field} or set '
                         'infer.on_too_long=truncate')
      cut += 1
      if cut & (cut - 1) == 0:
        noun = 'tokens' if feature == 'input' else 'target tokens'
        log.info(f'warning: {where}: {at}: {len(ids)} {noun}, truncated to data.{field}={length} '
                 f'({cut} truncated so far)')
      ids = ids[:length - 1] + [vocabulary.eos_id]
    r[key] = ids
  return cut


def resume(output: str, records) -> tuple[int, bytes]:
  """(how many records --output already holds, its bytes up to its last complete valid line).
  A local file is cut back to those bytes here; a URL gets them back with the next upload."""
  target = files.to_path(output)
  if not target.exists():
    return 0, b''
  data = target.read_bytes()
  done, keep = 0, 0
  for raw in data.split(b'\n')[:-1]:  # the piece after the last newline is cut off (or empty)
    try:
      record = json.loads(raw)
    except ValueError:
      break
    if not isinstance(record, dict) or record.get('index') != done:
      break
    if done >= len(records) or record.get('input') != records[done]['input'] or record.get(
        'target') != records[done].get('target'):
      raise InferError(f'--output {output}: line {done + 1} was written for another input; '
                       'remove the file or choose another --output')
    done, keep = done + 1, keep + len(raw) + 1
  if keep != len(data) and jax.process_index() == 0 and not files.is_url(output):
    with open(os.fspath(target), 'r+b') as f:
      f.truncate(keep)
  return done, data[:keep]


class _Output:
  """Where process 0 writes the predictions, batch by batch.

  A local file is appended to, flushed and fsync'ed after every batch. An object store cannot
  append (an object is written whole), so a URL's text is kept in memory and the whole object
  is uploaded again at most every `upload_s` seconds and on close (after an error or a SIGTERM
  too): rewriting it after every batch would upload the file once per batch. A kill -9 loses at
  most the last `upload_s` seconds of predictions, which the rerun decodes again. The first batch
  is uploaded at once, so a bucket that cannot be written fails the job after one batch, not at
  its end."""

  def __init__(self, path: str, kept: bytes, upload_s: float = 30.0):
    self.path, self.upload_s = path, upload_s
    self.url = files.is_url(path)
    self._text = [kept.decode('utf-8')] if self.url else None
    self._dirty = False
    self._last = -float('inf')  # the first write uploads
    self._file = None if self.url else open(os.fspath(files.to_path(path)), 'a', encoding='utf-8')

  def write(self, text: str) -> None:
    if not self.url:
      self._file.write(text)
      self._file.flush()
      os.fsync(self._file.fileno())
      return
    self._text.append(text)
    self._dirty = True
    if time.monotonic() - self._last >= self.upload_s:
      self._upload()

  def _upload(self) -> None:
    self._text = [''.join(self._text)]
    files.write_text(self.path, self._text[0])
    self._dirty, self._last = False, time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    elif self._dirty or not files.to_path(self.path).exists():
      self._upload()


def _full_batch_to_global(array: np.ndarray, sharding) -> jax.Array:
  """Every process holds the whole batch; each device takes its rows."""
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def score_rows(model, params, chunk, cfg, lengths: tuple[int, int], batch_size: int, mesh,
               rules) -> np.ndarray:
  """[len(chunk)]: each record's summed target log-likelihood, one padded batch of the converter
  layout training uses (`scoring.build_pair_batches`: a pair per record, one option each)."""
  batches, _ = scoring.build_pair_batches(model, [r['ids'] for r in chunk],
                                          [[r['target_ids']] for r in chunk], batch_size=batch_size,
                                          add_eos=False,
                                          prefix_lm=cfg.data.converter == 'prefix_lm',
                                          inputs_length=lengths[0], targets_length=lengths[1])
  return scoring.score_batch(model, params, batches[0], mesh, rules)[:len(chunk)]


def _score_fields(log_likelihood: float, num_tokens: int, length_normalize: bool) -> dict:
  return {
      'log_likelihood': log_likelihood, 'num_tokens': num_tokens,
      'score': log_likelihood / num_tokens if length_normalize else log_likelihood
  }


def _check_task(name: str, split: str) -> None:
  try:
    task = tasks_lib.get_task(name)
  except (KeyError, ValueError) as e:  # unknown, or a mixture
    raise InferError(f'--task {name}: {e.args[0]}') from None
  if split not in task.splits:
    raise InferError(f'--split {split}: task {name!r} has only the splits {list(task.splits)}')


def run(config, output: str, checkpoint: str = 'latest', workdir: str | None = None,
        input: str | None = None, task: str | None = None, split: str = 'validation',
        devices=None) -> dict:
  """Writes the predictions; returns counts {'written', 'resumed', 'truncated', 'skipped'}."""
  # pylint: disable=redefined-builtin
  if (input is None) == (task is None):
    raise config_lib.ConfigError('give exactly one of --input FILE.jsonl and --task NAME')
  if task is not None:
    _check_task(task, split)
  cli.check_output_file(output, '--output')
  built = cli.build(config, devices)
  target = checkpoints.resolve_steps(checkpoint, workdir)  # exists? before reading any input
  if checkpoint == 'all' or len(target) != 1:
    raise config_lib.ConfigError('--checkpoint all is for t5lite.eval; give latest, N or a path')
  cfg, model, mesh, rules = built.cfg, built.model, built.mesh, built.rules
  i_cfg = cfg.infer
  scoring_mode = i_cfg.mode == 'score'
  inputs_length, targets_length = evaluator_lib.lengths(cfg)
  vocabulary = evaluator_lib.config_vocabulary(cfg)
  if input is not None:
    records, skipped = read_jsonl(input, i_cfg.input_key, i_cfg.target_key, i_cfg.on_bad_line,
                                  need_target=scoring_mode)
    where = input
  else:
    records, skipped, where = read_task(task, split, vocabulary, cfg.train.seed), 0, task
  if vocabulary is None:
    vocabulary = tasks_lib.get_task(task).output_features['inputs'].vocabulary if task else None
  if vocabulary is None:
    raise config_lib.ConfigError('data.vocabulary=task needs --task (a file has no task to take '
                                 'a vocabulary from)')
  truncated = fit_inputs(records, vocabulary, inputs_length, i_cfg.on_too_long, where)
  if scoring_mode:
    missing = [i for i, r in enumerate(records) if 'target' not in r]
    if missing:  # --task: a task without targets
      raise InferError(f'{where}: example {missing[0]} has no target to score (infer.mode=score)')
    # Never truncated: a cut target is another string, whose score would answer another question.
    fit_inputs(records, vocabulary, targets_length, 'error', where, feature='target')
  done, kept = resume(output, records)
  counts = {'written': 0, 'resumed': done, 'truncated': truncated, 'skipped': skipped}
  batch_size = i_cfg.batch_size or cfg.eval.batch_size or cfg.train.batch_size
  data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
  if batch_size % data_parallel:
    raise config_lib.ConfigError(f'config.infer.batch_size={batch_size} is not divisible by the '
                                 f'data-parallel size {data_parallel}')
  if done >= len(records):
    if jax.process_index() == 0:
      _Output(output, kept).close()  # no inputs: an empty output, as asked
    log.info(f'nothing to do: {output} already has all {len(records)} predictions'
             if records else f'{where}: no inputs; {output} is empty')
    return counts
  log.info(f'reading the params of {target[0][1]}')
  params = init_from.load_params(target[0][1], partitioning.abstract_params(model, mesh, rules)[0])
  decode_cfg = evaluator_lib.decode_config(cfg, targets_length)
  key = ('encoder_input_tokens'
         if model.cfg.architecture == 'encoder_decoder' else 'decoder_prompt_tokens')
  sharding = partitioning.batch_sharding(mesh, rules)
  start = done // batch_size * batch_size
  if done:
    log.info(f'resuming: {done} of {len(records)} predictions already in {output}')
  out = _Output(output, kept) if jax.process_index() == 0 else None
  progress = logs.Progress('infer', len(records) - done, 'lines', logger=log)
  try:
    for begin in range(start, len(records), batch_size):
      chunk = records[begin:begin + batch_size]
      rows = np.zeros((batch_size, inputs_length), np.int32)
      for r, record in enumerate(chunk):
        rows[r, :len(record['ids'])] = record['ids']
      rng = jax.random.fold_in(jax.random.PRNGKey(cfg.decode.seed), begin // batch_size)
      first = begin == start  # the first decode compiles: minutes for a large model
      what = 'the scoring step' if scoring_mode else 'the decode step'
      with logs.compiling(what, log) if first else contextlib.nullcontext():
        if scoring_mode:
          scores = score_rows(model, params, chunk, cfg, (inputs_length, targets_length),
                              batch_size, mesh, rules)
        else:
          tokens = decoding.decode(model, params, {key: _full_batch_to_global(rows, sharding)},
                                   decode_cfg, rng, prefix_lm=cfg.data.converter == 'prefix_lm',
                                   mesh=mesh, rules=rules).tokens
          tokens = (np.asarray(jax.device_get(tokens)) if jax.process_count() == 1 else np.asarray(
              multihost_utils.process_allgather(tokens, tiled=True)))
      lines = []
      for r, record in enumerate(chunk):
        index = begin + r
        if index < done:
          continue
        entry = {
            'index': index, **({'line': record['line']} if 'line' in record else {}),
            'input': record['input']
        }
        if scoring_mode:
          entry['target'] = record['target']
          entry.update(
              _score_fields(float(scores[r]), len(record['target_ids']), i_cfg.length_normalize))
        else:
          entry['prediction'] = vocabulary.decode(tokens[r])
          if 'target' in record:
            entry['target'] = record['target']
        lines.append(json.dumps(entry, ensure_ascii=False) + '\n')
      if out is not None:
        out.write(''.join(lines))
      counts['written'] += len(lines)
      progress.update(len(lines))
    progress.finish()
  finally:
    if out is not None:
      out.close()
  noun = 'scores' if scoring_mode else 'predictions'
  log.info(f'wrote {counts["written"]} {noun} to {output} ({done} were already there); '
           f'{truncated} input(s) truncated to {inputs_length} tokens, {skipped} bad line(s) '
           'skipped')
  return counts


FLAGS = (
    cli.Flag('checkpoint', 'latest', 'latest | N | a path | hf:DIR, as for t5lite.eval'),
    cli.Flag('input', None, 'JSON lines to decode (or --task)', str),
    cli.Flag('task', None, 'a registered task whose split to decode (or --input)', str),
    cli.Flag('split', 'validation', '--task: the split to read'),
    cli.Flag('output', None, 'where the predictions go, one JSON line per input', str),
    cli.Flag(
        'mode', None, 'decode | score: sets config.infer.mode (score: the log-likelihood of '
        'each given target)', str),
)


def main(argv: Sequence[str]) -> int:

  def job(invocation: cli.Invocation):
    options = dict(invocation.options)
    if options['output'] is None:
      raise config_lib.ConfigError('--output FILE.jsonl is required')
    mode = options.pop('mode')
    if mode is not None:  # checked with the rest of the config (a choice field)
      invocation.config.infer.mode = mode
    if invocation.workdir:  # read only: the run whose checkpoints --checkpoint latest / N name
      cli.check_folder(invocation.workdir, '--workdir', writable=False, must_exist=True)
    run(invocation.config, workdir=invocation.workdir, **options)

  return cli.main(
      argv, job, usage=__doc__, job_flags=FLAGS, errors=[
          (checkpoints.MissingCheckpointError, 'infer', 2), (InferError, 'infer', 2)
      ], stopped=('infer: stopped by SIGTERM; the complete lines already in --output are kept: run '
                  'the same command to continue'),
      workdir_help='the run whose checkpoints --checkpoint latest / N read')


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
