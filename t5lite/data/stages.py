"""Stage-wise mixtures (`data.stages`): a data mixture that changes at given training steps.

    --config.data.stages="('0:embedded_span_corruption', '300:data.task=0.3,domain_task=0.7')"

Each entry is 'START:SPEC'. START is the training step from which the stage's batches feed the
model: the stage's first batch is the batch of step START + 1 (steps count from 1; batch i, from
0, is the batch of step i + 1), so a stage starting at 300 is read from the 301st batch on and a
checkpoint of step 300 is the last one of the stage before. The first stage starts at 0; starts
strictly increase. SPEC is a registered task or mixture name, or rates over registered tasks and
mixtures 'name=rate,name=rate' (rates > 0, normalised to sum 1; a mixture's rate is shared among
its tasks in its own proportions, as in add_mixture). The word `data.task` in a SPEC stands for
the task or mixture data.task names, which is also data.source's task when data.source is set.
data.stages=() (the default) reads data.task alone.

The clock is the number of batches this run's data has delivered, which is the training step:
a resumed run restores it from its checkpoint (as checkpoint.init_from with init_from_state=full
does from its source); init_from without the state starts at step 0 and so at the first stage.
schedule.step_offset moves the learning-rate schedule only, not the stages.

Each stage has its own pipeline (t5lite/data/pipeline.py: shuffle, process slicing, packing),
with its own seed: train.seed for stage 0, so that ('0:X',) reads exactly what data.task=X does,
and a seed derived from (train.seed, stage index) for the others, so that a stage's content
depends on nothing but its own settings. A stage reads its tasks from their start: a task in two
stages is not continued from where the earlier stage left it (its second reading is reshuffled).

The iterator state (saved per process in each checkpoint) holds the batch count and, for every
stage that has started (start < the count), its start, spec, pipeline fingerprint and data
position. On resume the stages that have started must be the same (start and pipeline); a
change is refused with DataStateMismatchError naming the stage and what changed. Stages that
have not started (start >= the count) may be added, removed or changed freely. With
data.reset_position=True such a refusal becomes a fresh start of the data at the checkpoint's
step: the stage that step is in reads from its start, earlier stages are marked unread.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from t5lite.data import pipeline
from t5lite.data import tasks as tasks_lib
from t5lite.fields import ConfigError

DATA_TASK = 'data.task'  # in a SPEC: the task or mixture data.task names
EXAMPLE = "('0:embedded_span_corruption', '300:data.task=0.3,my_task=0.7')"


class Stage:
  """One parsed entry of data.stages: its start step, its SPEC as written and what it reads."""

  def __init__(self, index: int, start: int, spec: str, target):
    self.index = index
    self.start = start
    self.spec = spec
    self.target = target  # a Task or Mixture (an unregistered one for rates)

  def __repr__(self):
    return f'stage {self.index} ({self.start}:{self.spec})'


def _error(field_name: str, index: int, entry, what: str) -> ConfigError:
  return ConfigError(f'config.{field_name}[{index}]={entry!r}: {what}. data.stages is a tuple '
                     f"of 'START:SPEC' strings, e.g. {EXAMPLE} (docs/data.md)")


def parse(value, field_name: str = 'data.stages') -> list[tuple[int, str]]:
  """The (start, spec) pairs of data.stages, checked for form only (no registry lookups):
  ConfigError naming the entry that is wrong and how to write it."""
  if isinstance(value, str) or not isinstance(value, (tuple, list)):
    raise ConfigError(f'config.{field_name}={value!r}: must be a tuple of \'START:SPEC\' '
                      f'strings, e.g. {EXAMPLE}, or () for data.task alone')
  out = []
  for i, entry in enumerate(value):
    if not isinstance(entry, str):
      raise _error(field_name, i, entry, 'not a string')
    start_text, colon, spec = entry.partition(':')
    if not colon or not start_text.strip().isdigit():
      raise _error(field_name, i, entry, 'START (a step number >= 0) and a colon come first')
    start, spec = int(start_text), spec.strip()
    if not spec:
      raise _error(
          field_name, i, entry, 'no SPEC after the colon (a task or mixture name, or '
          "rates such as 'a=0.3,b=0.7')")
    if i == 0 and start != 0:
      raise _error(field_name, i, entry, f'the first stage must start at 0, not {start} (step 0: '
                   'the first batch)')
    if out and start <= out[-1][0]:
      raise _error(field_name, i, entry, f'starts must strictly increase; the stage before '
                   f'starts at {out[-1][0]}')
    _parse_spec(spec, field_name, i, entry)  # the form of the rates too
    out.append((start, spec))
  return out


def _parse_spec(spec: str, field_name: str, index: int, entry) -> list[tuple[str, float]] | None:
  """None for a bare name, else [(name, rate)] of 'name=rate,...'."""
  if '=' not in spec:
    if ',' in spec:
      raise _error(field_name, index, entry, "several names need rates: 'a=0.3,b=0.7'")
    return None
  rates = []
  for part in spec.split(','):
    name, eq, rate_text = (x.strip() for x in part.partition('='))
    try:
      rate = float(rate_text)
    except ValueError:
      rate = math.nan
    if not eq or not name or not math.isfinite(rate) or rate <= 0:
      raise _error(field_name, index, entry, f'{part.strip()!r} is not name=rate with a rate > 0')
    if name in [n for n, _ in rates]:
      raise _error(field_name, index, entry, f'{name!r} is named twice')
    rates.append((name, rate))
  return rates


def _lookup(name: str, data_task: str, field_name: str, index: int, entry):
  try:
    return tasks_lib.get(data_task if name == DATA_TASK else name)
  except tasks_lib.UnknownNameError as e:
    raise _error(field_name, index, entry, e.args[0].rstrip('.')) from None


def resolve(value, data_task: str, field_name: str = 'data.stages') -> list[Stage]:
  """The stages of data.stages with what each reads; ConfigError for an unknown name (listing
  the closest registered ones) or a mixture that cannot be mixed (e.g. rates summing to 0)."""
  stages = []
  for i, (start, spec) in enumerate(parse(value, field_name)):
    entry = value[i]
    rates = _parse_spec(spec, field_name, i, entry)
    if rates is None:
      target = _lookup(spec, data_task, field_name, i, entry)
    else:
      components = [(_lookup(n, data_task, field_name, i, entry), r) for n, r in rates]
      # Named by its place, not its text: 'a=1,b=3' and 'a=0.25,b=0.75' are the same stage.
      target = tasks_lib.Mixture(f'{field_name}[{i}]', components)
    try:
      if isinstance(target, tasks_lib.Mixture):
        target.leaf_rates()
    except ValueError as e:
      raise _error(field_name, i, entry, str(e).rstrip('.')) from None
    stages.append(Stage(i, start, spec, target))
  return stages


def check_config(c) -> None:
  """The config rule of data.stages (t5lite/config_rules.py): every name exists, before any
  compute. Its form is the per-field check's (`parse`)."""
  d = c.data
  if d.stages:
    resolve(d.stages, d.task)


def stage_seed(seed: int, index: int) -> int:
  """Stage 0 reads with train.seed itself (('0:X',) is data.task=X); stage k > 0 with a 32-bit
  seed of its own from (seed, k)."""
  if index == 0:
    return seed
  return int(np.random.SeedSequence([seed, 0x57A6E, index]).generate_state(1)[0])


def make_staged_iterator(stages: Sequence[Stage], *, seed: int, **kwargs) -> 'StagedIterator':
  """One pipeline per stage (pipeline.make_task_dataset with `kwargs`), built now so that a
  stage's data problem shows at start-up, read from when its stage comes."""
  datasets = [
      pipeline.make_task_dataset(s.target, seed=stage_seed(seed, s.index), **kwargs) for s in stages
  ]
  return StagedIterator(stages, datasets)


def _stage_text(record: Mapping) -> str:
  return f"{record.get('start')}:{record.get('spec')}"


class StagedIterator:
  """Batches of the stage the batch count is in; get_state()/set_state() as described above.
  One next() is one training step's batch (this process's rows of the global batch)."""

  def __init__(self, stages: Sequence[Stage], datasets: Sequence[pipeline.PackedBatches]):
    if not stages or len(stages) != len(datasets) or stages[0].start != 0:
      raise ValueError('StagedIterator: one dataset per stage, the first stage starting at 0')
    self._stages = list(stages)
    self._datasets = list(datasets)
    self._count = 0  # batches delivered: the training step of the last one
    self._current = 0  # the stage of the last batch (0 before any)
    self._iterator = None  # the current stage's, made when first read
    self._positions: list[Any] = []  # the final positions of the stages before the current one

  @property
  def stage(self) -> Stage:
    """The stage of the last batch delivered (the first before any)."""
    return self._stages[self._current]

  @property
  def batches(self) -> int:
    return self._count

  @property
  def stats(self) -> pipeline.PackStats:
    """The current stage's packing statistics."""
    return self._current_iterator().stats

  def _current_iterator(self):
    if self._iterator is None:
      self._iterator = iter(self._datasets[self._current])
    return self._iterator

  def __iter__(self):
    return self

  def __next__(self):
    # Batch number `count` (from 0) belongs to the last stage with start <= count.
    while (self._current + 1 < len(self._stages)
           and self._stages[self._current + 1].start <= self._count):
      # (None: a stage that data.reset_position skipped over, never read)
      self._positions.append(None if self._iterator is None else self._iterator.get_state())
      self._close_current()
      self._current += 1
    batch = next(self._current_iterator())
    self._count += 1
    return batch

  def _close_current(self):
    if self._iterator is not None:
      close = getattr(self._iterator, 'close', None)
      if close is not None:
        close()
      self._iterator = None

  def close(self):
    self._close_current()

  def get_state(self) -> dict:
    records = []
    if self._count:
      for i in range(self._current + 1):
        s = self._stages[i]
        position = (self._positions[i]
                    if i < self._current else self._current_iterator().get_state())
        records.append({
            'start': s.start, 'spec': s.spec, 'pipeline': self._datasets[i].fingerprint,
            'position': position
        })
    return {'batches': self._count, 'stages': records}

  def _refuse(self, what: str):
    raise pipeline.DataStateMismatchError(
        f'data.stages: {what}. Stages that have not started yet (START >= the checkpoint\'s step) '
        f'may change; to change the past, {pipeline.RESET_HINT}.')

  def _check(self, count: int, saved: Sequence[Mapping]) -> None:
    """The started stages of this config against the checkpoint's: same starts, same pipelines."""
    started = [s for s in self._stages if s.start < count]
    for i, record in enumerate(saved):
      if not isinstance(record, Mapping):
        self._refuse(f'the checkpoint\'s record of stage {i} is not a stage ({record!r:.80})')
      if i >= len(started):
        self._refuse(f'stage {i} ({_stage_text(record)}) was read up to the checkpoint (step '
                     f'{count}), and this config has no stage {i} starting before step {count}')
      s = started[i]
      if record.get('start') != s.start:
        self._refuse(f'stage {i} ({_stage_text(record)}) was read up to the checkpoint (step '
                     f'{count}); this config starts it at {s.start} ({s.start}:{s.spec})')
      # (the pipeline calls its tasks data.task: here they are the stage's)
      changes = [
          c.replace('data.task: ', 'its data: ', 1) for c in pipeline.describe_changes(
              record.get('pipeline') or {}, self._datasets[i].fingerprint)
      ]
      if changes:
        self._refuse(f'stage {i} ({_stage_text(record)}) has started (the checkpoint is at step '
                     f'{count}) and changed since: ' + '; '.join(changes))
    if len(started) > len(saved):
      s = started[len(saved)]
      self._refuse(f'{s} starts before the checkpoint\'s step {count}, but the checkpoint did '
                   f'not read it (its last stage started at {saved[-1].get("start")})'
                   if saved else f'{s} would have started before the checkpoint\'s step {count}')

  def set_state(self, state, step: int | None = None) -> None:
    """Resumes at `state` (get_state's); DataStateMismatchError when a started stage changed or
    the state is not a staged one. `step`, the checkpoint's training step, lets a run written
    without data.stages (a one-stage run) go on with stages: its position is stage 0's at that
    step, so stage 0 must read what it read and later stages start after `step`."""
    if isinstance(state, Mapping) and 'upstream' in state and 'stages' not in state:
      if step is None or not isinstance(state.get('pipeline'), Mapping):
        self._refuse('the checkpoint was written without data.stages, this config has them')
      data = state['pipeline'].get('data') or {}
      record = {
          'start': 0, 'spec': f"{data.get('name')} (data.task, written without data.stages)",
          'pipeline': state['pipeline'], 'position': dict(state)
      }
      state = {'batches': step, 'stages': [record] if step else []}
    if not isinstance(state, Mapping) or 'stages' not in state:
      self._refuse(f'the checkpoint was written by another data pipeline ({str(state)[:80]!r})')
    count, saved = state.get('batches'), state.get('stages')
    if (not isinstance(count, int) or count < 0 or not isinstance(saved, list)
        or bool(count) != bool(saved)):
      self._refuse(f'the checkpoint\'s data position is not a staged one ({str(state)[:80]!r})')
    self._check(count, saved)
    self._close_current()
    self._count = count
    self._current = max(len(saved) - 1, 0)
    self._positions = [r['position'] for r in saved[:-1]]
    position = saved[-1]['position'] if saved else None
    if position is not None:
      self._current_iterator().set_state(position)

  def start_at(self, step: int) -> None:
    """Fresh data at training step `step` (data.reset_position): the stage of batch `step` reads
    from its start; the stages before are marked unread (position None)."""
    self._close_current()
    self._count = step
    self._current = max(i for i, s in enumerate(self._stages) if s.start <= max(step - 1, 0))
    self._positions = [None] * self._current
