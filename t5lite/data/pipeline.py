"""Input pipelines on grain: a registered task or mixture -> host-local feature batches.

    task source -> shuffle (seeded, reshuffled every epoch) -> repeat
      -> the task's preprocessors, rng = f(seed, global element index)
      -> this process's slice [process_index::process_count]
      -> feature converter (+ packing) -> batches of exactly global_batch_size / process_count

Everything is a grain `MapDataset`, i.e. random access by index, so the
pipeline is a pure function of (seed, step): the iterator's state is just the
next index, `get_state()`/`set_state()` resume exactly, and the result does not
depend on thread or worker counts. Because randomness is keyed by the *global*
element index before per-process slicing, process p of P sees elements
p, p+P, p+2P... and the union over processes of one step's batches is the same
set of examples whatever P is.

Mixtures use grain's deterministic weighted mix of the tasks' iterators
(training) or their concatenation in order (evaluation: repeat=False). The
packer (PackedBatches) packs greedily in order as many examples as fill the
rows; it keeps at most one example it pulled but could not place, and its state
is the upstream state *before* that example, so get_state()/set_state() stay
exact.

The iterator's state also carries a fingerprint of the pipeline (task or mixture
with its tasks and rates, lengths, converter, packing, seed, rows per process,
process and worker counts, vocabulary). A position only means something in the
pipeline that wrote it, so set_state() refuses another pipeline's state with a
DataStateMismatchError saying what changed, instead of grain's KeyError or, worse,
resuming silently at positions of other tasks. A state written before fingerprints
is accepted when its structure fits and refused the same way when it does not.

Transforms are top-level classes (no lambdas) so grain worker processes can
pickle them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Any, Mapping

import grain
import numpy as np

from t5lite.data import converters, embedded
from t5lite.data import tasks as tasks_lib
from t5lite.data.sources import DataSourceError
from t5lite.data.vocab import ByteVocabulary, SentencePieceVocabulary


@functools.lru_cache(maxsize=4)
def _tokenized_corpus(vocab_path: str, extra_ids: int) -> tuple[np.ndarray, ...]:
  """Token ids of every corpus document, cached per vocabulary file."""
  vocab = (ByteVocabulary(extra_ids) if vocab_path == 'byte' else SentencePieceVocabulary(
      vocab_path, extra_ids=extra_ids))
  return tuple(np.asarray(vocab.encode(doc), np.int32) for doc in embedded.corpus_documents())


def _derived_seed(seed: int, stream: int) -> int:
  """A 32-bit seed for one use of the user's seed.

    grain's shuffle uses seed + epoch for each epoch, so feeding it `seed`
    directly would make seed 1's first epoch equal seed 0's second.
    """
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _resolve_processes(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel  (only when not given)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count='
                     f'{process_count}).')
  return process_index, process_count


class ProcessExample(grain.transforms.MapWithIndex):
  """A task's lazy steps on one example; rng keyed by (seed, global index[, stream])."""

  def __init__(self, task, seed: int, stream, sequence_length, output_features):
    self.task = task
    self.seed = seed
    self.stream = stream
    self.sequence_length = dict(sequence_length)
    self.output_features = output_features

  def map_with_index(self, index: int, element):
    key = [self.seed, 2, index] + ([] if self.stream is None else [self.stream])
    ctx = self.task.context(self.sequence_length, np.random.default_rng(key), self.output_features)
    return self.task.process(element, ctx)


class NotNone(grain.transforms.Filter):

  def filter(self, element) -> bool:
    return element is not None


class PackStats:
  """Running packing statistics of one iterator (what `inspect` prints)."""

  def __init__(self):
    self.batches = self.rows = self.examples = 0
    self.tokens: dict[str, int] = {}
    self.slots: dict[str, int] = {}

  def add(self, features: Mapping[str, np.ndarray], n_examples: int, n_rows: int):
    self.batches += 1
    self.examples += n_examples
    self.rows += n_rows
    for name, x in features.items():
      if name in ('encoder_input_tokens', 'decoder_target_tokens'):
        self.tokens[name] = self.tokens.get(name, 0) + int((x != 0).sum())
        self.slots[name] = self.slots.get(name, 0) + x.size

  def fill_ratio(self) -> dict[str, float]:
    return {k: self.tokens[k] / self.slots[k] for k in self.tokens}

  def examples_per_row(self) -> float:
    return self.examples / max(self.rows, 1)


# --- the pipeline's fingerprint in the iterator state --------------------------------

log = logging.getLogger(__name__)


class DataStateMismatchError(ValueError):
  """A saved data position (iterator state) that does not belong to this pipeline.

    The message is one line: what changed, and how to go on on purpose.
    """


RESET_HINT = ('set --config.data.reset_position=True to start the data afresh from this step, '
              'or resume with the data config the checkpoint was written with')

# A fingerprint entry -> the setting that changes it, for the message.
_LABELS = {
    'data': 'data.task',
    'split': 'the split',
    'shuffle': 'shuffle',
    'repeat': 'repeat',
    'feature_lengths': 'data.inputs_length/data.targets_length',
    'converter': 'data.converter',
    'pack': 'data.pack',
    'seed': 'train.seed',
    'rows': 'train.batch_size (rows per process)',
    'process_count': 'the number of processes',
    'num_workers': 'data.num_workers',
    'vocabulary': 'data.vocabulary',
    # The shuffle is a permutation of each task's examples: another count (a data file that
    # grew or shrank) puts other examples at the saved positions.
    'examples': "the tasks' data (examples per task)",
}


def _vocabulary_identity(v) -> str:
  """Type, size and (SentencePiece) a hash of the model: the same ids for the same text."""
  text = f'{type(v).__name__} ({getattr(v, "vocab_size", "?")} ids, ' \
         f'{getattr(v, "extra_ids", "?")} sentinels'
  sp = getattr(v, '_sp', None)
  if sp is not None:  # the model's bytes, not its path: a cache dir may differ between hosts
    text += f', model sha256 {hashlib.sha256(sp.serialized_model_proto()).hexdigest()[:12]}'
  return text + ')'


def _fingerprint(obj, leaves, vocabulary, **settings) -> dict:
  """What a data position depends on, as plain JSON (it is saved in the checkpoint as JSON).

    Mixtures are recorded by their flattened tasks and normalised rates in order, which is
    what the mix draws from (each task's stream is keyed by its position in that list).
    """
  if vocabulary is not None:
    vocab_id = _vocabulary_identity(vocabulary)
  else:  # data.vocabulary=task: every feature's own vocabulary
    vocab_id = '; '.join(
        sorted({
            _vocabulary_identity(f.vocabulary) for t, _ in leaves
            for f in t.output_features.values()
        }))
  data = {
      'kind': 'mixture' if isinstance(obj, tasks_lib.Mixture) else 'task', 'name': obj.name,
      'tasks': [[t.name, float(f'{w:.12g}')] for t, w in leaves]
  }
  fingerprint = {'data': data, **settings, 'vocabulary': vocab_id}  # settings: plain values
  return json.loads(json.dumps(fingerprint))  # the form it comes back in from a checkpoint


def _describe(key: str, value) -> str:
  if value is None:
    return 'nothing recorded'
  if key == 'data' and isinstance(value, dict):
    if value.get('kind') == 'mixture':
      tasks = ', '.join(f'{t}@{w:.4g}' for t, w in value.get('tasks', []))
      return f"mixture {value.get('name')!r} (tasks {tasks})"
    return f"task {value.get('name')!r}"
  if key in ('feature_lengths', 'examples') and isinstance(value, dict):
    return ', '.join(f'{k}={v}' for k, v in sorted(value.items()))
  return repr(value)


def describe_changes(saved: Mapping, current: Mapping) -> list[str]:
  """What differs between two fingerprints, one phrase per setting ([] when none does)."""
  out = []
  for key in list(current) + [k for k in saved if k not in current]:
    old, new = saved.get(key), current.get(key)
    if old == new or (key == 'examples' and saved.get('data') != current.get('data')):
      continue  # (examples differ anyway when the tasks do: said once, as data.task)
    label = _LABELS.get(key, key)
    if key == 'data':
      out.append(f'{label}: the checkpoint was written reading {_describe(key, old)}; this config '
                 f'reads {_describe(key, new)}')
    else:
      out.append(f'{label}: the checkpoint was written with {_describe(key, old)}; this config has '
                 f'{_describe(key, new)}')
  return out


def _structure_mismatch(saved, fresh, where: str = 'state') -> str | None:
  """Where `saved` lacks the shape of `fresh` (dict keys, list lengths), or None if it fits.

    For states saved before fingerprints: grain's set_state assumes the shape (KeyError when
    it lacks a key, and a mix silently zips a shorter list of task states).
    """
  if isinstance(fresh, dict):
    if not isinstance(saved, dict):
      return f'{where} is a {type(saved).__name__}, not a mapping'
    keys = set(saved) | set(fresh)
    if not fresh or all(str(k).isdigit() for k in keys):
      return None  # a map with variable keys (e.g. grain's future_states by index)
    if set(saved) != set(fresh):
      return f'{where} has keys {sorted(saved)}, this pipeline {sorted(fresh)}'
    for k in fresh:
      if (found := _structure_mismatch(saved[k], fresh[k], f'{where}.{k}')) is not None:
        return found
  elif isinstance(fresh, (list, tuple)):
    if not isinstance(saved, (list, tuple)):
      return f'{where} is a {type(saved).__name__}, not a list'
    if len(saved) != len(fresh):
      return f'{where} has {len(saved)} entries, this pipeline {len(fresh)}'
    for i, (a, b) in enumerate(zip(saved, fresh)):
      if (found := _structure_mismatch(a, b, f'{where}[{i}]')) is not None:
        return found
  return None


class _PackedBatchesIterator(grain.DatasetIterator):

  def __init__(self, parent, converter, rows: int, pack: bool, fingerprint: dict | None = None):
    super().__init__(parent)
    self._fingerprint = fingerprint
    self._converter = converter
    self._rows = rows
    self._pack = pack
    self._budgets = converter.budgets()
    self._pending = None
    self._pending_state = None
    self.stats = PackStats()

  def __next__(self):
    examples, groups, used = [], [], None
    while True:
      if not self._pack and len(groups) == self._rows:
        break
      if self._pending is not None:
        ex, state = self._pending, self._pending_state
        self._pending = self._pending_state = None
      else:
        state = self._parent.get_state() if self._pack else None
        try:
          ex = next(self._parent)
        except StopIteration:
          break
      size = self._converter.sizes(ex)
      if (self._pack and groups and all(u + s <= b for u, s, b in zip(used, size, self._budgets))):
        groups[-1].append(len(examples))
        used = [u + s for u, s in zip(used, size)]
      elif len(groups) < self._rows:
        groups.append([len(examples)])
        used = list(size)
      else:
        self._pending, self._pending_state = ex, state
        break
      examples.append(ex)
    if not examples:
      raise StopIteration
    features = self._converter(examples, groups, self._pack)
    self.stats.add(features, len(examples), len(groups))
    return converters.pad_rows(features, self._rows)

  def get_state(self):
    upstream = self._pending_state if self._pending is not None else self._parent.get_state()
    if self._fingerprint is None:
      return {'upstream': upstream}
    return {'upstream': upstream, 'pipeline': self._fingerprint}

  def set_state(self, state):
    """Resumes at `state`; DataStateMismatchError if it is another pipeline's (see above)."""
    upstream = state.get('upstream') if isinstance(state, Mapping) else None
    if upstream is None:
      raise DataStateMismatchError(f'the saved data position is not an iterator state of this '
                                   f'pipeline (got {str(state)[:80]!r}). To go on, {RESET_HINT}.')
    saved = state.get('pipeline')
    if saved is not None and self._fingerprint is not None:
      if changes := describe_changes(saved, self._fingerprint):
        raise DataStateMismatchError('the data pipeline changed since the checkpoint: '
                                     + '; '.join(changes) + f'. To go on, {RESET_HINT}.')
    elif self._fingerprint is not None:
      # Written before fingerprints: at least its shape must be this pipeline's.
      fresh = json.loads(json.dumps(self._parent.get_state(), default=str))
      if (found := _structure_mismatch(upstream, fresh, 'upstream')) is not None:
        raise DataStateMismatchError(
            'the checkpoint\'s data position has no record of its data pipeline (written before '
            't5lite kept one) and does not fit this pipeline: another task or mixture, other '
            f'rates or another data.num_workers ({found}). To go on, {RESET_HINT}.')
      log.warning('the checkpoint\'s data position has no record of its data pipeline (written '
                  'before t5lite kept one): resuming it unchecked')
    try:
      self._parent.set_state(upstream)
    except DataSourceError:
      raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
      # Whatever the fingerprint missed: still one line, never grain's bare KeyError.
      raise DataStateMismatchError(
          f'the checkpoint\'s data position does not fit this pipeline ({type(e).__name__}: '
          f'{e}). To go on, {RESET_HINT}.') from e
    self._pending = self._pending_state = None


class PackedBatches(grain.IterDataset):
  """Batches of exactly `rows` rows of converter features (see above)."""

  def __init__(self, parent: grain.IterDataset, converter, rows: int, pack: bool,
               fingerprint: dict | None = None):
    super().__init__(parent)
    self._converter = converter
    self._rows = rows
    self._pack = pack
    self._fingerprint = fingerprint

  @property
  def fingerprint(self) -> dict | None:
    """What a position of this pipeline depends on (see the top), as saved in its states."""
    return self._fingerprint

  def __iter__(self):
    return _PackedBatchesIterator(self._parent.__iter__(), self._converter, self._rows, self._pack,
                                  self._fingerprint)


def _task_map_dataset(task, split, sequence_length, output_features, seed, stream, shuffle, repeat,
                      process_index, process_count) -> tuple[grain.MapDataset, int]:
  """The task's examples as this process reads them, and how many examples the split has."""
  ds = grain.MapDataset.source(task.examples(split, sequence_length, output_features))
  size = len(ds)
  if size == 0:
    raise DataSourceError(f'task {task.name!r} split {split!r} has no examples.')
  if shuffle:
    shuffle_seed = (_derived_seed(seed, 1) if stream is None else int(
        np.random.SeedSequence([seed, 1, stream]).generate_state(1)[0]))
    ds = ds.shuffle(seed=shuffle_seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map_with_index(ProcessExample(task, seed, stream, sequence_length, output_features))
  return ds[process_index::process_count], size


def _override_vocabulary(task, vocabulary):
  if vocabulary is None:
    return task.output_features
  return {k: f.replace(vocabulary=vocabulary) for k, f in task.output_features.items()}


def make_task_dataset(task_or_mixture_name, *, feature_lengths: Mapping[str, int],
                      global_batch_size: int, seed: int, pack: bool = True, split: str = 'train',
                      shuffle: bool = True, repeat: bool = True, converter: str = 'encdec',
                      loss_on_targets_only: bool = True, vocabulary=None,
                      process_index: int | None = None, process_count: int | None = None,
                      read_options: grain.ReadOptions | None = None,
                      num_workers: int = 0) -> grain.IterDataset:
  """The IterDataset behind `make_task_iterator` (same arguments)."""
  process_index, process_count = _resolve_processes(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be >= 1 and divisible '
                     f'by process_count={process_count}.')
  rows = global_batch_size // process_count
  conv = converters.Converter(converter, feature_lengths, loss_on_targets_only)
  obj = (tasks_lib.get(task_or_mixture_name)
         if isinstance(task_or_mixture_name, str) else task_or_mixture_name)
  if isinstance(obj, tasks_lib.Mixture):
    leaves = obj.leaf_rates()
    streams = list(range(len(leaves)))
  else:
    leaves, streams = [(obj, 1.0)], [None]
  read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
  maps, sizes = zip(*[
      _task_map_dataset(t, split, feature_lengths, _override_vocabulary(t, vocabulary), seed, s,
                        shuffle, repeat, process_index, process_count)
      for (t, _), s in zip(leaves, streams)
  ])
  if len(maps) == 1:
    ds = maps[0].to_iter_dataset(read_options).filter(NotNone())
  elif not repeat:  # evaluation: every task once, in order
    ds = grain.MapDataset.concatenate(maps).to_iter_dataset(read_options).filter(NotNone())
  else:
    ds = grain.IterDataset.mix([m.to_iter_dataset(read_options).filter(NotNone()) for m in maps],
                               [w for _, w in leaves])
  if num_workers > 0:
    # Preprocessing in worker processes (grain mp_prefetch): each worker takes every n-th
    # element and grain interleaves them back in order, so the batches are the same as
    # with none, and the iterator state (every worker's position) still resumes exactly.
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when it starts workers; t5lite has its own command
      # line, so mark absl's as parsed (their defaults) rather than crash.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  fingerprint = _fingerprint(obj, leaves, vocabulary, split=split, shuffle=shuffle, repeat=repeat,
                             feature_lengths=dict(feature_lengths), converter=converter, pack=pack,
                             seed=seed, rows=rows, process_count=process_count,
                             num_workers=num_workers,
                             examples={t.name: n for (t, _), n in zip(leaves, sizes)})
  return PackedBatches(ds, conv, rows, pack, fingerprint)


def make_task_iterator(task_or_mixture_name, *, feature_lengths: Mapping[str, int],
                       global_batch_size: int, seed: int, pack: bool = True, split: str = 'train',
                       shuffle: bool = True, repeat: bool = True, converter: str = 'encdec',
                       loss_on_targets_only: bool = True, vocabulary=None,
                       process_index: int | None = None, process_count: int | None = None,
                       read_options: grain.ReadOptions | None = None,
                       num_workers: int = 0) -> grain.DatasetIterator:
  """Host-local batches of a registered task or mixture, with exact resumption.

    feature_lengths: e.g. {'inputs': 512, 'targets': 114} (encdec, prefix_lm) or
    {'targets': 1024} (decoder). Each `next()` returns int32 arrays of
    [global_batch_size // process_count, length] with seqio/T5X names (see
    converters). converter: 'encdec' | 'decoder' | 'prefix_lm'. Training is
    shuffle=True, repeat=True (endless, reshuffled each epoch); evaluation is
    shuffle=False, repeat=False: one ordered pass, the last batch zero-padded,
    then StopIteration. `vocabulary` replaces every output feature's vocabulary
    (e.g. an embedded vocabulary of another size). The iterator has
    get_state()/set_state() and `.stats` (PackStats: fill ratio, examples/row);
    set_state raises DataStateMismatchError for another pipeline's state (see the top).
    """
  ds = make_task_dataset(task_or_mixture_name, feature_lengths=feature_lengths,
                         global_batch_size=global_batch_size, seed=seed, pack=pack, split=split,
                         shuffle=shuffle, repeat=repeat, converter=converter,
                         loss_on_targets_only=loss_on_targets_only, vocabulary=vocabulary,
                         process_index=process_index, process_count=process_count,
                         read_options=read_options, num_workers=num_workers)
  return iter(ds)
