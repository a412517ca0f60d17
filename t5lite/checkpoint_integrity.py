"""What keeps checkpoints honest and quiet: array checksums, and orbax's noise filtered out.

Split from t5lite/checkpoints.py, which re-exports every name here (use it from there).

- Checksums: every saved array has a fingerprint in the step's `checksums` item (checksums.json),
  computed on the device at save and again after each restore; a mismatch, or a non-finite value
  in a restored state, raises CorruptCheckpointError. Tensorstore's zarr chunks carry no checksum
  of their own (only the shard index has a crc32c), so a flipped bit in array data would
  otherwise restore silently.
- Quiet: orbax's harmless warnings, its tracebacks of a failed background save (reported once,
  as CheckpointSaveError, by the Checkpointer), and asyncio's and tensorstore's leftovers of an
  abandoned read are dropped; installed on import.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from t5lite import files

CHECKSUMS_ITEM = 'checksums'  # an item of each step, next to `state`: its arrays' fingerprints
CHECKSUMS_FILE = 'checksums.json'
CHECKSUMS_FORMAT = ('t5lite checksums v1: per array, [sum, sum weighted by 2*position+1] of its '
                    'bits as uint32, modulo 2**32')

log = logging.getLogger('t5lite.checkpoints')  # the lines read as the checkpoints module's


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used; the message says which one, why, and what to do."""


class CorruptCheckpointError(CheckpointError):
  """A step reads back, but an array differs from the checksum written with it, or the state holds
  non-finite values. restore_latest sets such a step aside and falls back to the previous one."""


# ---------------------------------------------------------------------------------------------
# Quiet: orbax's harmless warnings, and asyncio's unretrieved errors of a failed read


class _OrbaxNoise(logging.Filter):
  """Drops two kinds of orbax log records (logged through absl), and nothing else:

  - the warning 'Metadata file does not exist', from every read of a t5lite step's `state` folder
    as a tree of its own (load_params_for_init): orbax looks for step metadata there, finds that
    it lives one folder up, and carries on without it. Harmless.
  - the errors, each with a traceback, that orbax logs from its threads when a background save
    fails: the same exception reaches the Checkpointer, which raises (or, in close(), logs) it as
    one CheckpointSaveError line naming the step, the folder and the cause.
  """
  HARMLESS_WARNINGS = ('Metadata file does not exist',)
  SAVE_FAILURES = ('_SignalingThread.run() raised an exception',
                   'Handler Commit operations or the Commit callback in background save thread',
                   '[wait_until_finished] Save Finalize thread', 'Checkpointer failed: one or more '
                   'items may not be finalized')

  def filter(self, record: logging.LogRecord) -> bool:
    message = str(record.msg)
    if record.levelno == logging.WARNING:
      return not message.startswith(self.HARMLESS_WARNINGS)
    if record.levelno == logging.ERROR:
      return not any(part in message for part in self.SAVE_FAILURES)
    return True


def _is_late_tensorstore_callback(unraisable) -> bool:
  """Orbax runs each read or write in an asyncio loop of its own and closes it when the first
  array fails; tensorstore's reads and writes still in flight then complete into that closed
  loop, and each prints 'RuntimeError: Event loop is closed' with a traceback through
  sys.unraisablehook: thousands of lines for one truncated checkpoint. Nothing waits for those
  results any more; the failure itself is reported once, by the Checkpointer."""
  exc = unraisable.exc_value
  if not (isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'):
    return False
  tb = unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and tb.tb_frame.f_code.co_name == '_check_closed'


def _is_abandoned_orbax_coroutine(unraisable) -> bool:
  """When one array of a restore fails, orbax stops waiting for the others: their coroutines are
  closed (GeneratorExit) when collected, orbax's reader turns that into an Exception carrying
  the whole TensorStore spec, and Python prints each through sys.unraisablehook, a few dozen lines
  per array shard. The failure itself reaches restore_latest, which reports it in one line."""
  code = getattr(unraisable.object, 'cr_code', None)  # a coroutine
  exc = unraisable.exc_value
  return (code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename and exc is not None
          and isinstance(exc.__cause__ or exc.__context__, GeneratorExit))


class _AbandonedOrbaxTask(logging.Filter):
  """The same abandoned reads as _is_abandoned_orbax_coroutine, when they finished as asyncio
  Tasks instead: asyncio logs each ('Task exception was never retrieved', with the TensorStore
  spec and a traceback) when the task is collected. Only tasks whose traceback runs through
  orbax are dropped; the failure itself reaches restore_latest, which reports it in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not str(record.msg).startswith(
        ('Task exception was never retrieved', 'Future exception was never retrieved')):
      return True
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
      if f'{os.sep}orbax{os.sep}' in tb.tb_frame.f_code.co_filename:
        return False
      tb = tb.tb_next
    return True


def _install_log_filters() -> None:
  absl_logger = logging.getLogger('absl')  # absl.logging's calls go through this logger
  if not any(isinstance(f, _OrbaxNoise) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxNoise())
  asyncio_logger = logging.getLogger('asyncio')
  if not any(isinstance(f, _AbandonedOrbaxTask) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedOrbaxTask())
  previous = sys.unraisablehook
  if not getattr(previous, 't5lite_checkpoints', False):

    def hook(unraisable):
      if not (_is_late_tensorstore_callback(unraisable)
              or _is_abandoned_orbax_coroutine(unraisable)):
        previous(unraisable)

    hook.t5lite_checkpoints = True
    sys.unraisablehook = hook


_install_log_filters()

# ---------------------------------------------------------------------------------------------
# Checksums: a fingerprint of every array, the same on any mesh


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """[sum, position-weighted sum, non-finite count] of one array's bits, as uint32.

  Unsigned integer addition wraps modulo 2**32 and gives the same result in any order, so every
  mesh and sharding (and XLA's choice of reduction tree) gives the same numbers, which a float
  sum would not. Flipping any one bit changes the sum by +-2**k, never 0 modulo 2**32; the odd
  weights 2*position+1 (invertible modulo 2**32) also change with it, and catch values moved to
  other positions, which the plain sum cannot see."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize, jnp.uint32)
    # 8-byte types bitcast to uint32 gain a last axis of 2: both halves are summed.
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  position = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):  # row-major flat index, wrapping like the sums
    position += jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * np.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  if jnp.issubdtype(x.dtype, jnp.inexact):
    nonfinite = jnp.sum(~jnp.isfinite(x), dtype=jnp.uint32)
  else:
    nonfinite = jnp.uint32(0)
  return jnp.stack([
      jnp.sum(bits, dtype=jnp.uint32),
      jnp.sum(bits * (2 * position + 1), dtype=jnp.uint32), nonfinite
  ])


@jax.jit
def _fingerprint_arrays(arrays: list) -> jax.Array:
  # One program and one transfer for the whole tree, [n_arrays, 3]. (One program per array
  # compiles less, but many small collective programs in flight at once can deadlock XLA's CPU
  # backend, seen on 8 simulated devices.)
  return jnp.stack([_leaf_fingerprint(x) for x in arrays]).reshape(len(arrays), 3)


def _flat_arrays(tree) -> dict[str, Any]:
  """'params/encoder/.../kernel' -> array: the names orbax gives the saved tree (as _flat_shapes
  does), so a TrainState and a tree read back from metadata name their arrays alike."""
  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True), sep='/',
                               is_leaf=lambda x: hasattr(x, 'shape'))
  return {k: v for k, v in sorted(flat.items()) if hasattr(v, 'dtype') and hasattr(v, 'shape')}


def fingerprints(tree) -> dict[str, dict]:
  """name -> {'dtype', 'shape', 'sum', 'weighted', 'nonfinite'} for every array of `tree`, on
  whatever mesh it lives: the checksums a save writes and a restore compares."""
  arrays = _flat_arrays(tree)
  if not arrays:
    return {}
  values = _fingerprint_arrays(list(arrays.values()))
  # Fully reduced, so every device (and every process) holds the whole result.
  values = np.asarray(values.addressable_data(0)).astype(np.int64)
  return {
      name: {
          'dtype': str(x.dtype), 'shape': list(x.shape), 'sum': int(v[0]), 'weighted': int(v[1]),
          'nonfinite': int(v[2])
      } for (name, x), v in zip(arrays.items(), values)
  }


_told_no_checksums: set[str] = set()


def read_checksums(step_dir: str) -> dict[str, dict] | None:
  """The checksums saved in the step at `step_dir`, or None for a step written before t5lite
  saved them."""
  path = files.to_path(step_dir) / CHECKSUMS_ITEM / CHECKSUMS_FILE
  if not path.exists():
    return None
  return json.loads(path.read_text())['arrays']


def verify(step_dir: str, tree, label: str) -> None:
  """Raises CorruptCheckpointError (its message starts with `label`) when an array of `tree`, read
  from the step at `step_dir`, differs from the checksum saved with it, or holds non-finite
  values. Arrays read with another dtype than they were saved in (orbax casts to the target's)
  are checked for finiteness only; saved arrays that `tree` does not hold are not checked."""
  actual = fingerprints(tree)
  expected = read_checksums(step_dir)
  if expected is None:
    parent = os.path.dirname(step_dir)
    if parent not in _told_no_checksums:
      _told_no_checksums.add(parent)
      log.info(f'checkpoints: {step_dir} was written without checksums (before t5lite saved '
               'them): its arrays are checked for finite values only')
  else:
    differ = [
        name for name, got in actual.items()
        if name in expected and (expected[name]['dtype'],
                                 expected[name]['shape']) == (got['dtype'], got['shape']) and
        (expected[name]['sum'], expected[name]['weighted']) != (got['sum'], got['weighted'])
    ]
    if differ:
      more = f' (and {len(differ) - 1} more)' if len(differ) > 1 else ''
      raise CorruptCheckpointError(
          f'{label}: array {differ[0]}{more} differs from the checksum written at save: its '
          'files were changed or damaged since')
  nonfinite = [name for name, got in actual.items() if got['nonfinite']]
  if nonfinite:
    first = actual[nonfinite[0]]
    more = f' (and {len(nonfinite) - 1} more arrays)' if len(nonfinite) > 1 else ''
    raise CorruptCheckpointError(
        f'{label}: array {nonfinite[0]} holds {first["nonfinite"]} non-finite value(s) of '
        f'{int(np.prod(first["shape"]))}{more}')
