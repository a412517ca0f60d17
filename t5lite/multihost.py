"""Cross-process agreement for multi-process runs, written once.

Every process of a run executes the same program, but each reads its own files and its own slice
of the data, so they can disagree: one got SIGTERM, one sees a new checkpoint a moment earlier,
one ran out of eval batches first. These helpers settle such questions with one tiny collective
(a few bytes) and are plain pass-throughs in a single-process run, where they cost nothing:

  any_process(flag)    True on every process when `flag` holds on at least one
  all_processes(flag)  True on every process when `flag` holds on all of them
  agree(values)        process 0's list of ints, on every process
  lockstep(batches)    an ordered pass in which every process runs the same number of steps
  PreemptionWatcher    SIGTERM on any process -> every process stops at the same step

Every process must make the same calls in the same order: each is a collective.
"""
from __future__ import annotations

import signal
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

# An all-gather over processes: this process's int32 array -> every process's, stacked.
Gather = Callable[[np.ndarray], np.ndarray]


def _flags(flag: bool, gather: Gather | None) -> np.ndarray | None:
  """Every process's `flag` as an array, or None in a single-process run without `gather`."""
  if gather is None:
    if jax.process_count() == 1:
      return None
    gather = multihost_utils.process_allgather
  return np.asarray(gather(np.array([flag], np.int32)))


def any_process(flag: bool, gather: Gather | None = None) -> bool:
  """True when `flag` holds on at least one process (the same answer on every process).
  `gather` replaces the all-gather, for tests."""
  flags = _flags(flag, gather)
  return bool(flag) if flags is None else bool(np.any(flags))


def all_processes(flag: bool, gather: Gather | None = None) -> bool:
  """True when `flag` holds on every process (the same answer on every process)."""
  flags = _flags(flag, gather)
  return bool(flag) if flags is None else bool(np.all(flags))


AGREE_MAX = 4096  # values agree() carries: the newest ones of a longer list


def agree(values: list[int]) -> list[int]:
  """Process 0's `values` on every process, e.g. the checkpoint steps to evaluate: file listings
  can differ in time between hosts, and every process must take the same steps.

  Values must be >= 0 (-1 marks the unused end of a fixed-size buffer); of a list longer than
  AGREE_MAX only the last AGREE_MAX values are kept.
  """
  if jax.process_count() == 1:
    return values
  tail = values[-AGREE_MAX:]
  buffer = np.full((AGREE_MAX,), -1, np.int32)
  buffer[:len(tail)] = tail
  buffer = multihost_utils.broadcast_one_to_all(buffer)
  return [int(v) for v in buffer if v >= 0]


def lockstep(batches: Iterable[dict], limit: int = 0, padding: dict | None = None,
             gather: Gather | None = None) -> Iterator[dict]:
  """The batches of an ordered pass (evaluation), with every process taking the same steps.

  With several processes each reads its own slice of the data, and the slices may run out at
  different batches; but each step is a collective over all devices, so every process must run
  it. Before each batch the processes agree (one tiny all-gather) on whether anyone still has
  data: if so, a process that has run out yields `padding` (default: all zeros shaped like its
  last batch), which carries no loss weight and no real example; if not, the pass ends. A single
  process just yields its batches.

  `limit`: at most this many batches (0: all); the next batch is not read once it is reached.
  `gather` replaces the all-gather, for tests.
  """
  iterator = iter(batches)
  last, count = None, 0
  while not limit or count < limit:
    batch = next(iterator, None)
    if not any_process(batch is not None, gather):
      return
    if batch is None:
      if padding is None and last is None:
        raise ValueError('lockstep: this process has no batch at all while another still has '
                         'data; pass `padding`, the batch to run in its place')
      batch = padding if padding is not None else {k: np.zeros_like(v) for k, v in last.items()}
    last = batch
    count += 1
    yield batch


class PreemptionWatcher:
  """SIGTERM (what TPU and cluster schedulers send before killing a job) -> stop at a step boundary.

  The handler only sets a flag; the loop reads it between steps, where the state is consistent.
  With several processes one may get the signal before the others, so every step they all-gather
  their flags (a few bytes; the only per-step cross-process sync this adds) and stop together
  at the same step. A single process just reads its flag.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. run() called from a worker thread): no handler
      pass

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self) -> bool:
    return any_process(self.requested)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
