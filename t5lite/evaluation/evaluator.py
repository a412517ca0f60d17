"""Metric evaluation: decode or score a task's whole split, postprocess, apply its metric fns.

    ev = Evaluator(cfg, model, mesh, rules, workdir=W)         # tasks: cfg.eval.tasks
    results = ev.evaluate(params, step)                        # {task: TaskResult}
    # -> W/eval/<task>/step_<step>.json, TensorBoard scalars in W/eval, a printed table

For each task, one ordered pass (shuffle=False, repeat=False) over `eval.split` with the
unpacked encoder-decoder converter, so each row is one example. Each task is evaluated at its own
lengths, as seqio's evaluator does: the longest inputs and targets of its split (EOS included,
rounded up to a multiple of 8), capped at eval.max_inputs_length / eval.max_targets_length.
Examples longer than a cap are trimmed to it (EOS kept) and counted in the task's
`truncated_examples`, which the result file and the log report (`task_lengths`). The pipeline zero-pads the last
batch; padding rows are recognised by their all-zero targets (a real target always holds EOS) and
never reach a metric, so every example counts exactly once. A task's metric fns (names or
functions, `t5lite.metrics`) come in two kinds, as in seqio:

- predict metrics `fn(targets, predictions)`: the inputs are decoded (`t5lite.models.decoding`,
  config.decode), predictions and targets are detokenized and passed through the task's
  postprocess_fn (`fn(text, example=..., is_target=...)`, example the row's element of
  `task.examples(split)`, see `split_examples`; a one-argument function works too);
- score metrics `fn(targets, scores)` (`metrics.takes_scores`): with rank options (the task's
  `rank_options`) every (example, option) pair is scored
  and `scores[i]` holds example i's per-option log-likelihoods, `targets[i]` the index of its
  postprocessed target among the options (rank classification); without options `scores[i]` is the
  log-likelihood of the example's own target.

Several processes: each reads its slice of the split. They may run out at different batches, so
`multihost.lockstep` keeps them taking the same steps (a process with no data left feeds an
all-padding batch to the collective computations, as in-training validation does).
Decoded tokens and per-row data are gathered with `multihost_utils.process_allgather`; every
process computes the metrics (cheap) and only process 0 writes. Params stay on the training mesh
and every jitted function runs under the mesh and rules (`partitioning.jit`).

`cfg` is the resolved config (`config.resolve`; a ConfigDict works too): it reads the data, eval,
decode, train (batch size, seed) and reporting parts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from t5lite import files, logs
from t5lite import metrics as metrics_lib
from t5lite import multihost, partitioning
from t5lite.data import converters, pipeline, tasks as tasks_lib, vocab as vocab_lib
from t5lite.data import preprocessors as P
from t5lite.evaluation import scoring
from t5lite.models import decoding

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TaskResult:
  """One task's evaluation; lists are in split order, one entry per example."""
  task: str
  metrics: dict[str, float]
  inputs: list[str]
  targets: list[Any]  # postprocessed
  predictions: list[Any]  # postprocessed (empty without predict metrics)
  raw_predictions: list[str]  # detokenized, before postprocessing
  scores: list[Any]  # per-option scores (rank) or target log-likelihoods; may be empty
  seconds: float
  lengths: dict[str, int] = dataclasses.field(default_factory=dict)  # {'inputs', 'targets'}
  truncated_examples: int = 0  # longer than eval.max_inputs_length / max_targets_length

  @property
  def num_examples(self) -> int:
    return len(self.targets)


def lengths(config) -> tuple[int, int]:
  """(inputs_length, targets_length) as training uses them (targets 0: T5's span helper)."""
  d = config.data
  encdec = converters.feature_lengths('encdec', d.inputs_length, d.targets_length)
  return encdec['inputs'], encdec['targets']


@dataclasses.dataclass(frozen=True)
class TaskLengths:
  """A task's evaluation lengths: `inputs`/`targets` (tokens, EOS included), the longest example's
  (`longest_*`, before the caps), and how many examples a cap cuts (`truncated`)."""
  inputs: int
  targets: int
  longest_inputs: int
  longest_targets: int
  truncated: int


def task_lengths(task, split: str, caps: tuple[int, int], vocabulary=None, seed: int = 0,
                 limit: int | None = None, sized_by=None) -> TaskLengths:
  """The lengths a task's split needs: every example (the first `limit`, when given: what
  eval.max_batches evaluates) through the task's steps untrimmed (EOS appended where the feature
  adds it), the longest of each feature rounded up to a multiple of 8 and capped at `caps`
  (inputs, targets). A feature the task lacks gets its cap.

  A task whose steps size their output by the lengths (span corruption or prefix LM over random
  chunks) has no length of its own: it gets `sized_by` (inputs, targets), the training lengths,
  capped, with nothing truncated (its chunks are cut to fit by design)."""
  try:
    return _measured_lengths(task, split, caps, vocabulary, seed, limit)
  except P.NeedsLengthsError:
    if sized_by is None:
      raise
    log.info(f'eval {task.name}: its steps size examples by the feature lengths; evaluated at '
             f'the training lengths {sized_by[0]} / {sized_by[1]}')
    fitted = [min(cap, n) for cap, n in zip(caps, sized_by)]
    return TaskLengths(fitted[0], fitted[1], fitted[0], fitted[1], 0)


def _measured_lengths(task, split, caps, vocabulary, seed, limit) -> TaskLengths:
  features = task.output_features
  if vocabulary is not None:
    features = {k: f.replace(vocabulary=vocabulary) for k, f in features.items()}
  longest = {'inputs': 0, 'targets': 0}
  truncated = 0
  examples = task.examples(split, None, features)
  for i in range(len(examples) if limit is None else min(limit, len(examples))):
    example = examples[i]
    # No sequence_length: trim() keeps everything; the rng is the one infer's --task uses.
    example = task.process(example, task.context(None, np.random.default_rng([seed, 2, i]),
                                                 features))
    if example is None:  # dropped (drop_invalid): never evaluated
      continue
    sizes = {k: len(example[k]) for k in longest if k in example}
    truncated += any(sizes[k] > cap for k, cap in zip(('inputs', 'targets'), caps) if k in sizes)
    for k, n in sizes.items():
      longest[k] = max(longest[k], n)
  fitted = [
      min(cap, scoring.round_up(longest[k])) if longest[k] else cap
      for k, cap in zip(('inputs', 'targets'), caps)
  ]
  return TaskLengths(fitted[0], fitted[1], longest['inputs'], longest['targets'], truncated)


def config_vocabulary(config):
  """The vocabulary config.data names, or None for each task's own (data.vocabulary='task')."""
  d = config.data
  return vocab_lib.get_vocabulary(d.vocabulary, d.sp_vocab_size)


def decode_config(config, targets_length: int) -> decoding.DecodeConfig:
  d = config.decode
  return decoding.DecodeConfig(method=d.method, max_decode_length=d.max_decode_length
                               or targets_length, temperature=d.temperature, top_k=d.top_k,
                               top_p=d.top_p, num_beams=d.num_beams,
                               length_penalty_alpha=d.length_penalty_alpha)


def postprocess(fn: Callable | None, text: str, example=None, is_target: bool = False):
  """seqio's convention `fn(text, example=..., is_target=...)`; keywords it lacks are left out."""
  if fn is None:
    return text
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    params = {}
  kwargs = {
      k: v for k, v in (('example', example), ('is_target', is_target))
      if k in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
  }
  return fn(text, **kwargs)


def _takes_example(fn: Callable | None) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return 'example' in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def split_examples(task, split: str, indices: Sequence[int], sequence_length=None,
                   vocabulary=None) -> list | None:
  """The example behind each evaluated row, for `postprocess_fn(text, example=...)`.

  seqio hands the postprocessor the example, so that e.g. SQuAD can score against every reference
  answer, not only the one the target holds. Here it is element `indices[i]` of
  `task.examples(split)`: the source's record after the task's dataset-level steps, before the
  per-example ones (for a TFDS task, the raw record). The ordered pass neither shuffles nor
  drops, so row k of the split is element k. None (every postprocess_fn gets example=None) when
  the fn takes no `example`, or the task may drop examples (drop_invalid), so that rows and
  elements need not line up.
  """
  if task.drop_invalid or not _takes_example(task.postprocess_fn):
    return None
  features = ({k: f.replace(vocabulary=vocabulary) for k, f in task.output_features.items()}
              if vocabulary is not None else None)
  elements = task.examples(split, sequence_length, features)  # the pipeline's cached list
  return [elements[int(i)] for i in indices]


def postprocess_all(task, texts: Sequence[str], examples: Sequence | None, is_target: bool) -> list:
  """`postprocess` of each detokenized text, with its example when there are examples."""
  examples = [None] * len(texts) if examples is None else examples
  return [
      postprocess(task.postprocess_fn, t, example=e, is_target=is_target)
      for t, e in zip(texts, examples)
  ]


@functools.lru_cache(maxsize=16)
def _log_likelihood_fn(model, mesh, rules):
  """jit of (params, batch) -> each row's summed target log-likelihood, replicated so every
  process reads all rows; one per (model, mesh, rules), as modules and meshes compare by value."""
  return partitioning.jit(
      lambda params, batch: scoring.token_log_likelihoods(model, params, batch).sum(-1), mesh,
      rules, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _strip(row: np.ndarray) -> np.ndarray:
  """Token ids of a padded row without trailing padding (EOS kept)."""
  nonzero = np.flatnonzero(row)
  return row[:nonzero[-1] + 1] if nonzero.size else row[:0]


class Evaluator:
  """Metric evaluation of `tasks` (default config.eval.tasks); see the module docstring."""

  def __init__(self, config, model, mesh, rules, *, workdir: str | None = None,
               tasks: Sequence[str] | None = None, verbose: bool = True):
    self.config, self.model, self.mesh = config, model, mesh
    self.rules = partitioning.rules_tuple(rules)
    self.workdir = workdir
    self.verbose = verbose
    names = config.eval.tasks if tasks is None else tasks
    self.tasks = [tasks_lib.get_task(n) for n in names]
    self.caps = (config.eval.max_inputs_length, config.eval.max_targets_length)
    self.batch_size = config.eval.batch_size or config.train.batch_size
    self.prefix_lm = config.data.converter == 'prefix_lm'
    self.vocabulary = config_vocabulary(config)
    self.batch_sharding = partitioning.batch_sharding(mesh, self.rules)
    self._log_likelihood = _log_likelihood_fn(model, mesh, self.rules)
    self._tb = None
    self._compiled: set = set()  # the jitted programs already run once (their compile logged)
    self._lengths: dict[str, TaskLengths] = {}

  def task_lengths(self, task) -> TaskLengths:
    """The task's evaluation lengths (measured once per task: its split does not change)."""
    if task.name not in self._lengths:
      # The ordered pass reads the split's first max_batches * batch_size examples (process p
      # takes elements p, p + count, ...; lockstep keeps the batches aligned). With drop_invalid
      # the rows evaluated are not the first elements: measure them all.
      limit = None
      if self.config.eval.max_batches and not task.drop_invalid:
        limit = self.config.eval.max_batches * self.batch_size
      found = task_lengths(task, self.config.eval.split, self.caps, self.vocabulary,
                           self.config.train.seed, limit, sized_by=lengths(self.config))
      if found.truncated:
        log.info(f'warning: eval {task.name}: {found.truncated} example(s) are longer than '
                 f'eval.max_inputs_length={self.caps[0]} / eval.max_targets_length='
                 f'{self.caps[1]} (the longest: {found.longest_inputs} input and '
                 f'{found.longest_targets} target tokens) and are truncated; raise the caps to '
                 'evaluate them whole')
      self._lengths[task.name] = found
    return self._lengths[task.name]

  def _first_run(self, key, what: str):
    """logs.compiling around the first call of a program (a large model's compile takes
    minutes, which would otherwise pass in silence); nothing on later calls."""
    if key in self._compiled:
      return contextlib.nullcontext()
    self._compiled.add(key)
    return logs.compiling(what, log)

  def _total(self, task, sequence_length) -> int | None:
    """How many examples one pass over the eval split holds (at most eval.max_batches batches),
    for the progress lines; None (no ETA) when examples may be dropped on the way."""
    if task.drop_invalid:
      return None
    features = ({k: f.replace(vocabulary=self.vocabulary) for k, f in task.output_features.items()}
                if self.vocabulary is not None else None)
    # The list the pipeline reads (cached in the task), after its dataset-level steps.
    total = len(task.examples(self.config.eval.split, sequence_length, features))
    if self.config.eval.max_batches:
      total = min(total, self.config.eval.max_batches * self.batch_size)
    return total

  # --- per-batch pieces ---------------------------------------------------------------------

  def _global(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return partitioning.host_to_global(arrays, self.batch_sharding)

  def _gather(self, x) -> np.ndarray:
    """All rows of a global array (every process gets them)."""
    if jax.process_count() == 1:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def decode_rows(self, params, local_inputs: np.ndarray, batch_number: int,
                  decode_cfg: decoding.DecodeConfig) -> np.ndarray:
    """Decoded tokens [global rows, max_decode_length] of each process's input rows."""
    key = ('encoder_input_tokens'
           if self.model.cfg.architecture == 'encoder_decoder' else 'decoder_prompt_tokens')
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.decode.seed), batch_number)
    out = decoding.decode(self.model, params, self._global({key: local_inputs}), decode_cfg, rng,
                          prefix_lm=self.prefix_lm, mesh=self.mesh, rules=self.rules)
    return self._gather(out.tokens)

  def _features(self, pairs: list[tuple[np.ndarray, np.ndarray] | None], inputs_length: int,
                targets_length: int):
    """Scoring features for (input ids, target ids) rows; None rows are all padding."""
    real = [i for i, p in enumerate(pairs) if p is not None]
    examples = [{'inputs': pairs[i][0], 'targets': pairs[i][1]} for i in real]
    if self.model.cfg.architecture == 'encoder_decoder':
      features = converters.encdec_features(examples, inputs_length, targets_length, False)
    else:
      features = converters.prefix_lm_features(examples, inputs_length, targets_length, False)
      if not self.prefix_lm:
        del features['decoder_causal_attention']
    out = {}
    for k, v in features.items():
      full = np.zeros((len(pairs),) + v.shape[1:], v.dtype)
      full[real] = v
      out[k] = full
    return out

  def score_rows(self, params, pairs, inputs_length: int, targets_length: int) -> np.ndarray:
    """Log-likelihood of each row's target ([global rows], replicated to every process)."""
    features = self._features(pairs, inputs_length, targets_length)
    scores = self._log_likelihood(params, self._global(features))
    return np.asarray(jax.device_get(scores))

  # --- one task -------------------------------------------------------------------------------

  def evaluate_task(self, task, params) -> TaskResult:
    start = time.perf_counter()
    fns = metrics_lib.resolve(task.metric_fns)
    predict_fns = [f for f in fns if not metrics_lib.takes_scores(f)]
    score_fns = [f for f in fns if metrics_lib.takes_scores(f)]
    options = task.rank_options if score_fns else None
    vocabulary = self.vocabulary or task.output_features['targets'].vocabulary
    option_ids = [
        np.asarray(list(vocabulary.encode(o)) + [vocabulary.eos_id], np.int32) for o in options
    ] if options else []
    option_length = scoring.round_up(max((len(o) for o in option_ids), default=1))
    found = self.task_lengths(task)
    inputs_length, targets_length = found.inputs, found.targets
    sequence_length = {'inputs': inputs_length, 'targets': targets_length}
    decode_cfg = decode_config(self.config, targets_length)
    iterator = pipeline.make_task_iterator(task, feature_lengths=sequence_length,
                                           global_batch_size=self.batch_size,
                                           seed=self.config.train.seed, pack=False,
                                           split=self.config.eval.split, shuffle=False,
                                           repeat=False, converter='encdec',
                                           vocabulary=self.vocabulary)
    p, count = jax.process_index(), jax.process_count()
    rows = self.batch_size // count
    zeros = {
        'encoder_input_tokens': np.zeros((rows, inputs_length), np.int32),
        'decoder_target_tokens': np.zeros((rows, targets_length), np.int32)
    }
    kept: dict[str, list[np.ndarray]] = {
        'index': [], 'inputs': [], 'targets': [], 'tokens': [], 'scores': []
    }
    seen, batches = 0, 0
    progress = logs.Progress(f'eval {task.name}', self._total(task, sequence_length), 'examples',
                             logger=log)
    for batch in multihost.lockstep(iterator, limit=self.config.eval.max_batches, padding=zeros):
      inputs, targets = batch['encoder_input_tokens'], batch['decoder_target_tokens']
      real = targets[:, 0] != 0
      # Global order: element k of process p is element k * count + p of the split.
      index = np.where(real, (seen + np.arange(rows)) * count + p, -1).astype(np.int32)
      seen += int(real.sum())
      local = {'index': index, 'inputs': inputs, 'targets': targets}
      if count > 1:
        local = {k: self._gather(v) for k, v in self._global(local).items()}
      for k, v in local.items():
        kept[k].append(v)
      if predict_fns:
        with self._first_run(('decode', inputs_length, targets_length), 'the decode step'):
          kept['tokens'].append(self.decode_rows(params, inputs, batches, decode_cfg))
      if options:
        pairs = [
            (_strip(inputs[r]), o) if real[r] else None for r in range(rows) for o in option_ids
        ]
        with self._first_run(('score', inputs_length, option_length), 'the scoring step'):
          kept['scores'].append(
              self.score_rows(params, pairs, inputs_length,
                              option_length).reshape(-1, len(options)))
      elif score_fns:
        pairs = [(_strip(inputs[r]), _strip(targets[r])) if real[r] else None for r in range(rows)]
        with self._first_run(('score', inputs_length, targets_length), 'the scoring step'):
          kept['scores'].append(self.score_rows(params, pairs, inputs_length, targets_length))
      batches += 1
      progress.update(int((local['index'] >= 0).sum()))  # every process's real rows
    progress.finish()
    if not kept['index']:
      raise ValueError(f'eval: task {task.name!r} split {self.config.eval.split!r} gave no '
                       'batches')
    index = np.concatenate(kept['index'])
    order = np.flatnonzero(index >= 0)
    order = order[np.argsort(index[order], kind='stable')]
    take = {k: np.concatenate(v)[order] for k, v in kept.items() if v}

    decode_text = vocabulary.decode
    in_vocab = self.vocabulary or task.output_features['inputs'].vocabulary
    inputs_text = [in_vocab.decode(r) for r in take['inputs']]
    examples = split_examples(task, self.config.eval.split, take['index'], sequence_length,
                              self.vocabulary)
    targets = postprocess_all(task, [decode_text(r) for r in take['targets']], examples, True)
    raw, predictions, scores, results = [], [], [], {}
    if predict_fns:
      raw = [decode_text(r) for r in take['tokens']]
      predictions = postprocess_all(task, raw, examples, False)
      for fn in predict_fns:
        results.update(fn(targets, predictions))
    if score_fns:
      if options and self.config.eval.length_normalize:
        # The mean log-likelihood per option token (EOS included), as scoring.rank_classification's
        # length_normalize ranks.
        take['scores'] = take['scores'] / np.asarray([len(o) for o in option_ids], np.float32)
      scores = [s.tolist() if np.ndim(s) else float(s) for s in take['scores']]
      score_targets = targets
      if options:
        labels = [postprocess(task.postprocess_fn, o, is_target=True) for o in options]
        missing = sorted({str(t) for t in targets if t not in labels})
        if missing:
          raise ValueError(f'eval: task {task.name!r}: targets {missing[:5]} are not among its '
                           f'rank options {list(options)}')
        score_targets = [labels.index(t) for t in targets]
      for fn in score_fns:
        results.update(fn(score_targets, scores))
    return TaskResult(task.name, {k: float(v) for k, v in results.items()}, inputs_text, targets,
                      predictions, raw, scores,
                      time.perf_counter() - start, dict(sequence_length), found.truncated)

  # --- all tasks, writing -------------------------------------------------------------------

  def evaluate(self, params, step: int) -> dict[str, TaskResult]:
    results = {task.name: self.evaluate_task(task, params) for task in self.tasks}
    if jax.process_index() == 0:
      if self.workdir:
        self.write(step, results)
      if self.verbose:
        log.info(format_table(step, results))
    return results

  def write(self, step: int, results: dict[str, TaskResult]) -> None:
    """WORKDIR/eval/<task>/step_<step>.json (written whole, then renamed) and TensorBoard."""
    shown = self.config.eval.num_examples_to_save
    for name, r in results.items():
      record = {
          'task': name,
          'step': int(step),
          'split': self.config.eval.split,
          'num_examples': r.num_examples,
          'metrics': r.metrics,
          'lengths': r.lengths,
          'truncated_examples': r.truncated_examples,
          'seconds': round(r.seconds, 3),
          'decode': {
              **dataclasses.asdict(decode_config(self.config, r.lengths['targets'])),
              'seed': self.config.decode.seed
          },
          'examples': [{
              'input': r.inputs[i], 'target': r.targets[i],
              **({'prediction': r.predictions[i], 'raw_prediction': r.raw_predictions[i]}
                 if r.predictions else {}), **({'scores': r.scores[i]} if r.scores else {})
          } for i in range(min(shown, r.num_examples))],
      }
      write_json(result_path(self.workdir, name, step), record)
    if self.config.reporting.tensorboard:
      if self._tb is None:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        # A gs:// logdir is written through google-cloud-storage by tensorboardX itself.
        self._tb = SummaryWriter(files.join(self.workdir, 'eval'))
      for name, r in results.items():
        for metric, value in r.metrics.items():
          self._tb.add_scalar(f'{name}/{metric}', value, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def result_path(workdir: str, task: str, step: int) -> str:
  """WORKDIR/eval/<task>/step_<step>.json; a gs:// workdir gives a gs:// URL."""
  return files.join(workdir, 'eval', task, f'step_{int(step)}.json')


def write_json(path: str, record: dict) -> None:
  """Atomic: a reader (eval --checkpoint all) never sees half a file (files.write_text)."""
  files.write_text(path, json.dumps(record, indent=1, default=str))


def format_table(step: int, results: dict[str, TaskResult]) -> str:
  lines = [f'eval at step {step}:', f'  {"task":<24} {"metric":<20} {"value":>9}  examples']
  for name, r in results.items():
    for i, (metric, value) in enumerate(sorted(r.metrics.items())):
      cut = f', {r.truncated_examples} truncated' if r.truncated_examples else ''
      lines.append(f'  {name if i == 0 else "":<24} {metric:<20} {value:>9.3f}'
                   + (f'  {r.num_examples} ({r.seconds:.1f}s{cut})' if i == 0 else ''))
  return '\n'.join(lines)


def build_metric_evaluation(config, model, mesh, rules, workdir: str):
  """For train.run: None when config.eval.tasks is empty, else fn(params, step) -> {
  'eval/<task>/<metric>': value} that also writes WORKDIR/eval/<task>/step_<step>.json."""
  if not config.eval.tasks:
    return None
  evaluator = Evaluator(config, model, mesh, rules, workdir=workdir)

  def evaluate(params, step: int) -> dict[str, float]:
    results = evaluator.evaluate(params, step)
    return {f'eval/{t}/{k}': v for t, r in results.items() for k, v in r.metrics.items()}

  evaluate.close = evaluator.close
  return evaluate
