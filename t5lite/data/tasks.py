"""Task and Mixture registry: named datasets that the pipeline and the evaluator look up.

A Task is a source + a list of preprocessing steps + the output features (vocabulary,
add_eos, required) + an optional postprocess fn, metric fns and rank options (used by
evaluation).
A Mixture samples several tasks (or mixtures) with rates. Both are registered by
name; `get(name)` finds either, and an unknown name is an error listing the
closest registered names. This module is the registry only: the built-in tasks are
registered by importing `t5lite.data.catalog` (the jobs and data tools do), as a user's own
task module is.

    add_task('my_task', JsonlSource({'train': 'data/*.jsonl'}),
             [partial(rekey, key_map={'inputs': 'question', 'targets': 'answer'}), tokenize],
             output_features={'inputs': Feature(vocab), 'targets': Feature(vocab)})
    add_mixture('my_mix', [('my_task', 2.0), ('embedded_span_corruption', 1.0)])

Steps are `step(example, ctx) -> example` (see t5lite.data.preprocessors). A step with
`dataset_level = True` maps the whole list of examples at once (e.g. ConcatAndSplit);
everything up to the last such step is applied eagerly and cached in memory, the rest
lazily per element with an rng keyed by (seed, element index). After the steps the task
trims each output feature to its length, appends EOS where add_eos, checks required
features are present and non-empty, and keeps only the output features.

Mixing rates (as in seqio's `mixing_rate_num_examples`, credited): a number, or
`rate_num_examples(temperature=T, maximum=M)`: rate = min(n, M) ** (1 / T), n the
number of examples of the split in the source; T=1 is proportional to size.
A sub-mixture's rate is shared among its tasks in its own proportions.
"""

from __future__ import annotations

import collections
import difflib
import importlib
import logging
import os
import sys
import threading
import traceback
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from t5lite.data import preprocessors as P
from t5lite.data.sources import Source
from t5lite.fields import ConfigError


class Feature:
  """An output feature: its vocabulary (or a zero-arg function making it), add_eos, required."""

  def __init__(self, vocabulary, add_eos: bool = True, required: bool = True):
    self._vocabulary = vocabulary
    self.add_eos = add_eos
    self.required = required

  @property
  def vocabulary(self):
    if callable(self._vocabulary) and not hasattr(self._vocabulary, 'encode'):
      self._vocabulary = self._vocabulary()  # lazy: e.g. the embedded vocabulary trains once
    return self._vocabulary

  def replace(self, **kw) -> 'Feature':
    args = dict(vocabulary=self._vocabulary, add_eos=self.add_eos, required=self.required)
    args.update(kw)
    return Feature(**args)

  def __repr__(self):
    return f'Feature(add_eos={self.add_eos}, required={self.required})'


class UnknownNameError(KeyError):
  """No task or mixture of that name; the message lists the closest names."""

  def __str__(self):
    return str(self.args[0])


# --- dropped-example accounting (per process; grain threads share it) --------------

_DROPPED: collections.Counter = collections.Counter()
_DROPPED_LOCK = threading.Lock()


def count_dropped(task_name: str, reason: str) -> None:
  with _DROPPED_LOCK:
    _DROPPED[task_name] += 1
    n = _DROPPED[task_name]
  if n & (n - 1) == 0:  # 1, 2, 4, 8...: visible without flooding the log
    logging.warning('task %r: dropped %d invalid example(s) so far; latest: %s', task_name, n,
                    reason)


_TRIMMED: collections.Counter = collections.Counter()


def trimmed_token_counts() -> dict[str, int]:
  """Tokens cut per task in this process by trimming to the feature lengths."""
  with _DROPPED_LOCK:
    return dict(_TRIMMED)


def dropped_counts() -> dict[str, int]:
  """Examples dropped per task in this process (tasks with drop_invalid=True)."""
  with _DROPPED_LOCK:
    return dict(_DROPPED)


class Task:
  """See the module docstring. Build with `add_task` to register it."""

  def __init__(self, name: str, source: Source, preprocessors: Sequence[Callable],
               output_features: Mapping[str, Feature], postprocess_fn: Callable | None = None,
               metric_fns: Sequence[Callable] = (), drop_invalid: bool = False,
               rank_options: Sequence[str] | None = None):
    if not output_features:
      raise ValueError(f'task {name!r}: needs at least one output feature.')
    self.name = name
    self.source = source
    self.preprocessors = list(preprocessors)
    self.output_features = dict(output_features)
    self.postprocess_fn = postprocess_fn
    self.metric_fns = list(metric_fns)
    self.drop_invalid = drop_invalid
    # Score-mode answers: the evaluator ranks them by log-likelihood (rank classification).
    self.rank_options = tuple(rank_options) if rank_options is not None else None
    last = max((i for i, p in enumerate(self.preprocessors) if getattr(p, 'dataset_level', False)),
               default=-1)
    self._eager_steps = self.preprocessors[:last + 1]
    self._lazy_steps = self.preprocessors[last + 1:]
    self._materialized: dict = {}

  def __repr__(self):
    return f'Task({self.name!r})'

  def __getstate__(self):
    return {**self.__dict__, '_materialized': {}}

  @property
  def splits(self):
    return self.source.splits

  def num_examples(self, split: str = 'train') -> int:
    return self.source.num_examples(split)

  def context(self, sequence_length=None, rng=None, output_features=None) -> P.Context:
    return P.Context(task_name=self.name, output_features=output_features or self.output_features,
                     sequence_length=dict(sequence_length) if sequence_length else None, rng=rng)

  def examples(self, split: str, sequence_length=None, output_features=None) -> Sequence:
    """Random-access examples after the eager (dataset-level) steps; cached per lengths."""
    if split not in self.splits:
      hint = getattr(self.source, 'split_hint', '')  # e.g. data.source's: how to add one
      raise ValueError(f'task {self.name!r} has no split {split!r}; it has {list(self.splits)}.'
                       f'{hint}')
    raw = self.source.get(split)
    if not self._eager_steps:
      return raw
    features = output_features or self.output_features
    key = (split, tuple(sorted((sequence_length or {}).items())),
           tuple((k, getattr(f.vocabulary, 'path', id(f.vocabulary))) for k, f in features.items()))
    if key not in self._materialized:
      examples: Any = raw
      for step in self._eager_steps:
        ctx = self.context(sequence_length, output_features=features)
        if getattr(step, 'dataset_level', False):
          examples = step(examples, ctx)
        else:
          examples = [
              step(ex, self.context(sequence_length, np.random.default_rng([0, i]), features))
              for i, ex in enumerate(examples)
          ]
      self._materialized[key] = list(examples)
    return self._materialized[key]

  def process(self, example, ctx: P.Context):
    """The lazy steps + finalisation for one example; None if dropped (drop_invalid)."""
    try:
      for step in self._lazy_steps:
        example = step(example, ctx)
      return self._finalize(example, ctx)
    except P.InvalidExampleError as e:
      if not self.drop_invalid:
        raise
      count_dropped(self.name, str(e))
      return None

  def _finalize(self, example, ctx: P.Context):
    out = {}
    for key, feature in ctx.output_features.items():
      if key not in example:
        if feature.required:
          raise P.InvalidExampleError(
              f'task {self.name!r}: example has no output feature {key!r} after preprocessing '
              f'(it has {sorted(example)}).')
        continue
      value = example[key]
      if isinstance(value, (str, bytes)):
        raise ValueError(f'task {self.name!r}: output feature {key!r} is still text; add a '
                         '`tokenize` step.')
      value = np.asarray(value, np.int32).reshape(-1)
      if feature.required and value.size == 0:
        raise P.InvalidExampleError(f'task {self.name!r}: output feature {key!r} is empty.')
      out[key] = value
    trimmed = P.trim(out, ctx)
    cut = sum(len(out[k]) - len(trimmed[k]) for k in out)
    if cut:
      with _DROPPED_LOCK:
        _TRIMMED[self.name] += cut
    return P.append_eos(trimmed, ctx)


def rate_num_examples(maximum: float | None = None, temperature: float = 1.0, scale: float = 1.0,
                      split: str = 'train') -> Callable[[Task], float]:
  """Rate fn: scale * min(n, maximum) ** (1 / temperature); n = examples in the split."""
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')

  def rate(task: Task) -> float:
    n = float(task.num_examples(split))
    if maximum is not None:
      n = min(n, maximum)
    return scale * n**(1.0 / temperature)

  return rate


class Mixture:
  """Tasks or mixtures with rates; see `add_mixture`."""

  def __init__(self, name: str, components: Sequence[Any], default_rate=None):
    self.name = name
    self._components = []
    for c in components:
      if isinstance(c, (tuple, list)):
        target, rate = c
      else:
        if default_rate is None:
          raise ValueError(f'mixture {name!r}: component {c!r} has no rate and there is no '
                           'default_rate.')
        target, rate = c, default_rate
      self._components.append((target, rate))
    if not self._components:
      raise ValueError(f'mixture {name!r} has no components.')

  def __repr__(self):
    return f'Mixture({self.name!r})'

  def components(self) -> list[tuple[Task | 'Mixture', float]]:
    out = []
    for target, rate in self._components:
      obj = get(target) if isinstance(target, str) else target
      r = rate(obj) if callable(rate) else float(rate)
      if r < 0:
        raise ValueError(f'mixture {self.name!r}: negative rate {r} for {obj.name!r}.')
      out.append((obj, r))
    return out

  def leaf_rates(self, _seen=()) -> list[tuple[Task, float]]:
    """(task, rate) with rates normalised to sum to 1; sub-mixtures flattened."""
    if self.name in _seen:
      raise ValueError(f'mixture {self.name!r} contains itself.')
    comps = self.components()
    total = sum(r for _, r in comps)
    if total <= 0:
      raise ValueError(f'mixture {self.name!r}: rates sum to {total}.')
    acc: dict[str, list] = {}
    for obj, r in comps:
      sub = obj.leaf_rates(_seen + (self.name,)) if isinstance(obj, Mixture) else [(obj, 1.0)]
      for task, w in sub:
        acc.setdefault(task.name, [task, 0.0])[1] += r / total * w
    return [(t, w) for t, w in acc.values() if w > 0]

  @property
  def tasks(self) -> list[Task]:
    return [t for t, _ in self.leaf_rates()]


_TASKS: dict[str, Task] = {}
_MIXTURES: dict[str, Mixture] = {}
_CATALOG = 't5lite.data.catalog'


def _check_new(name: str, overwrite: bool):
  if not overwrite and (name in _TASKS or name in _MIXTURES):
    raise ValueError(f'{name!r} is already registered; pass overwrite=True to replace it.')
  _TASKS.pop(name, None)
  _MIXTURES.pop(name, None)


def add_task(name: str, source: Source, preprocessors: Sequence[Callable],
             output_features: Mapping[str, Feature], *, overwrite: bool = False, **kwargs) -> Task:
  """Registers and returns a Task (kwargs: postprocess_fn, metric_fns, drop_invalid,
  rank_options)."""
  _check_new(name, overwrite)
  task = Task(name, source, preprocessors, output_features, **kwargs)
  _TASKS[name] = task
  return task


def add_mixture(name: str, components: Sequence[Any], default_rate=None, *,
                overwrite: bool = False) -> Mixture:
  """Registers a Mixture. components: names/objects with rates, e.g.
  [('a', 1.0), ('b', 3.0)], or names with default_rate=rate_num_examples(temperature=2)."""
  _check_new(name, overwrite)
  mixture = Mixture(name, components, default_rate)
  _MIXTURES[name] = mixture
  return mixture


def remove(name: str) -> None:
  _TASKS.pop(name, None)
  _MIXTURES.pop(name, None)


def names() -> list[str]:
  """Every registered task and mixture name, sorted."""
  return sorted(set(_TASKS) | set(_MIXTURES))


def get(name: str) -> Task | Mixture:
  """The task or mixture called `name`; UnknownNameError lists the closest names."""
  if name in _TASKS:
    return _TASKS[name]
  if name in _MIXTURES:
    return _MIXTURES[name]
  close = difflib.get_close_matches(name, names(), n=5, cutoff=0.5)
  hint = f' Did you mean: {", ".join(close)}?' if close else ''
  # Looked up, not imported: the registry never loads the catalog itself.
  if _CATALOG not in sys.modules:
    hint += (f' Nothing has imported {_CATALOG} yet: import {_CATALOG} to register the '
             'built-in tasks.')
  raise UnknownNameError(f'no task or mixture named {name!r}.{hint} '
                         f'({len(names())} registered; see t5lite.data.tasks.names().)')


def get_task(name: str) -> Task:
  obj = get(name)
  if not isinstance(obj, Task):
    raise ValueError(f'{name!r} is a mixture, not a task.')
  return obj


def get_mixture(name: str) -> Mixture:
  obj = get(name)
  if not isinstance(obj, Mixture):
    raise ValueError(f'{name!r} is a task, not a mixture.')
  return obj


# --- user task modules (--module_import, config.imports) ----------------------------------------

_IMPORT_ERROR = '--module_import / config.imports: module {name!r} failed to import: {error}{at}'


def import_modules(names: Sequence[str]) -> None:
  """Imports task modules in order, so the tasks and mixtures they register can be named (what
  T5X's --module_import does); ConfigError naming the module that cannot be imported, and where
  it failed when the module itself raised."""
  if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
    raise ConfigError(f'config.imports={names!r}: must be a tuple of module names, e.g. '
                      "('my_project.tasks',)")
  for name in names:
    try:
      importlib.import_module(name)
    except Exception as e:  # pylint: disable=broad-except  (the user's module: one line)
      missing = getattr(e, 'name', None) if isinstance(e, ModuleNotFoundError) else None
      if missing and (name == missing or name.startswith(missing + '.')):
        raise ConfigError(f'--module_import / config.imports: no module named {name!r} on the '
                          f'Python path (working folder {os.getcwd()}); put its folder on '
                          'PYTHONPATH, or install its package') from None
      frames = traceback.extract_tb(e.__traceback__)
      at = f' (at {frames[-1].filename}:{frames[-1].lineno})' if frames else ''
      first = (str(e).strip().splitlines() or [''])[0]
      raise ConfigError(_IMPORT_ERROR.format(name=name, error=f'{type(e).__name__}: {first}',
                                             at=at)) from None
