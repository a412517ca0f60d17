"""Checkpoints: write a run's state with orbax, and read it back onto any mesh, or refuse clearly.

    WORKDIR/checkpoints/<step>/
      state/    TrainState (step, params, opt_state): orbax StandardSave, i.e. tensorstore array
                files + JSON metadata. The dropout RNG is fold_in(train.seed, step): nothing to save.
      data/     process_<i>-of-<n>.json: each process's data-iterator state (grain get_state())
      config/   metadata: the resolved config as JSON (for people and for mismatch messages)
      commit_success.txt, _CHECKPOINT_METADATA: orbax's markers

Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>/` and renames it when every process has
finished, so a crash mid-save leaves a tmp folder, never a half-written `<step>/`. Before restoring,
`Checkpointer.restore_latest` also skips step folders without orbax's commit marker (a partial copy)
and falls back to the previous step when reading fails (a truncated file); it raises
`CheckpointError` rather than start from scratch when checkpoints exist but none can be read.
Reading uses orbax's standard handlers (tensorstore, JSON) and `json` only: no pickle.

WORKDIR may be a URL (gs://bucket/run): every path goes through t5lite.files (etils.epath). On
GCS orbax writes a step in place and its commit marker last (no rename); a step set aside is
copied, then deleted (`_move_step`).

Every job finds checkpoints here: `complete_steps` is the one scan for commit markers (resume,
`init_from`, eval), `resolve_steps` turns eval's and infer's --checkpoint into steps and paths;
t5lite/init_from.py reads only the params onto any mesh (fine-tuning, eval, infer).

Nothing lost, nothing silently wrong:
- A failed save (permissions, a full disk, a storage error) raises CheckpointSaveError, one line
  naming the step, the path and the cause: from `save` itself (a synchronous save, or the
  previous asynchronous one found failed when the next starts), from `check_save` (cheap, called
  every step) or from `wait`. Directories are created synchronously, in `save`, so that a folder
  that cannot be written fails there rather than leaving orbax's background threads waiting
  forever for a directory that never comes (the process would hang at exit).
- Every saved array has a fingerprint in the step's `checksums` item (checksums.json), computed
  on the device at save and again after each restore; a mismatch, or a non-finite value in a
  restored state, rejects the step like an unreadable one (CorruptCheckpointError). The
  checksums, and the filters that keep orbax's noise out of the logs, are in
  t5lite/checkpoint_integrity.py; their names are re-exported here.
- `reject_from` moves steps whose params turned out bad (a non-finite loss after them) aside.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import options as ocp_options

from t5lite import files
from t5lite.models import presets
# Checksums and the quiet logs live in checkpoint_integrity; their names are this module's too.
from t5lite.checkpoint_integrity import (CHECKSUMS_FILE, CHECKSUMS_FORMAT, CHECKSUMS_ITEM,
                                         CheckpointError, CorruptCheckpointError, _OrbaxNoise,
                                         fingerprints, read_checksums, verify)

COMMIT_MARKER = 'commit_success.txt'  # orbax writes it last, just before the final rename
TMP_MARKER = '.orbax-checkpoint-tmp'  # orbax's suffix for a step still being written
REJECTED_DIR = 'checkpoints_rejected'  # unreadable steps are moved here, next to checkpoints/
REASON_FILE = 'REASON.txt'  # in each rejected step's folder: why it was set aside

log = logging.getLogger(__name__)


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed (permissions, a full disk, a storage error): the message names
  the step, the folder, the cause and the newest complete checkpoint, which is left intact. The
  run must stop: the next saves would fail the same way."""


class MissingCheckpointError(RuntimeError):
  """The checkpoint asked for does not exist (exit code 2). Not a CheckpointError, which means
  one that exists but cannot be read (exit code 1)."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any  # TrainState on the target shardings
  data_state: dict  # this process's data-iterator state, for iterator.set_state


def _describe(e: BaseException) -> str:
  """'TypeName: the first line of the message', shortened in the middle to at most ~500
  characters: storage errors name the file first and the cause (e.g. 'File too large') last."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ''
  if len(text) > 500:
    text = f'{text[:200]} ... {text[-250:]}'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def _scan(directory: str) -> tuple[list[int], list[int], list[str]]:
  """(complete steps, step folders without the commit marker, interrupted saves' folder names)
  in `directory` (a local path or a URL), each sorted; all empty when it does not exist."""
  complete, incomplete, interrupted = [], [], []
  folder = files.to_path(directory)
  if folder.is_dir():
    for name in sorted(entry.name for entry in folder.iterdir()):
      if TMP_MARKER in name:
        interrupted.append(name)
      elif name.isdigit() and (folder / name).is_dir():
        marked = (folder / name / COMMIT_MARKER).exists()
        (complete if marked else incomplete).append(int(name))
  return sorted(complete), sorted(incomplete), interrupted


def complete_steps(directory: str) -> list[int]:
  """The steps in a checkpoints directory (WORKDIR/checkpoints) that orbax finished writing (their
  folder has the commit marker), oldest first; [] when there is no such directory."""
  return _scan(directory)[0]


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def data_state_filename() -> str:
  # Per process: grain's iterator state describes this process's slice of the data. JsonSave's
  # default handler writes on process 0 only, so the `data` item gets a handler with
  # primary_host=None (every process writes) and a file name carrying the process index.
  return f'process_{jax.process_index()}-of-{jax.process_count()}.json'


def _flat_shapes(tree) -> dict[str, tuple]:
  """'params/encoder/.../kernel' -> shape, for a tree of arrays or structs, or for orbax's saved
  metadata (already the nested dicts/lists that orbax.tree.serialize_tree makes of a tree)."""
  if hasattr(tree, 'tree'):  # orbax TreeMetadata
    tree = tree.tree
  else:
    tree = ocp.tree.serialize_tree(tree, keep_empty_nodes=True)
  flat = ocp.tree.to_flat_dict(tree, sep='/', is_leaf=lambda x: hasattr(x, 'shape'))
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, 'shape')}


class Checkpointer:
  """Saves (async) and restores one run's checkpoints under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, keep: int = 0, async_save: bool = True, best_metric: str = '',
               best_mode: str = 'min', best_n: int = 1):
    self.workdir = files.join(workdir)  # absolute, or a URL as it is
    self.directory = files.join(self.workdir, 'checkpoints')
    self._pending: int | None = None  # the step of the last save not yet known to have ended
    self._error: CheckpointSaveError | None = None  # sticky: every later call raises it again
    self._error_raised = False
    policy = ocp.checkpoint_managers.LatestN(n=keep or None)  # None keeps all
    if best_metric and keep:
      # Also keep the best_n by `best_metric` (a value passed to save(metrics=...)); orbax keeps
      # each step's metrics in its metadata, so the ranking survives restarts. BestN sorts
      # ascending and keeps the tail, so a loss to minimise sorts in reverse.
      best = ocp.checkpoint_managers.BestN(get_metric_fn=lambda metrics: metrics[best_metric],
                                           reverse=best_mode == 'min', n=best_n,
                                           keep_checkpoints_without_metrics=False)
      policy = ocp.checkpoint_managers.AnyPreservationPolicy([policy, best])
    # best_fn only makes orbax write each step's metrics (a `metrics` JSON item) and read them
    # back when it starts; retention is the preservation policy above.
    track = {'best_fn': (lambda metrics: metrics[best_metric]), 'best_mode': best_mode
            } if best_metric and keep else {}
    every_process = ocp_options.MultiprocessingOptions(primary_host=None)
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'data': ocp.JsonCheckpointHandler(filename=data_state_filename(),
                                              multiprocessing_options=every_process),
            'config': ocp.JsonCheckpointHandler(),
            CHECKSUMS_ITEM: ocp.JsonCheckpointHandler(filename=CHECKSUMS_FILE),
        },
        # The train loop decides when to save and calls save(force=True), so none of orbax's save
        # policies (interval, its own preemption check) runs; this only sets retention and async.
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=policy,
            create=True,
            # The step's folder is made in save() itself, not in a background thread: when it
            # cannot be made (no permission, no space), orbax's writer threads would otherwise
            # wait for it until their 20-minute timeout, and the process hang at exit.
            async_options=ocp_options.AsyncOptions(create_directories_asynchronously=False),
            **track))

  # -------------------------------------------------------------------------------------------
  # Saving

  def save(self, step: int, state, data_state: dict, config: dict,
           metrics: dict[str, float] | None = None) -> bool:
    """Starts writing `state` as step `step` and returns after the device-to-host copy (async) or
    when it is on disk (sync). Every process must call it. False if that step already exists.
    `metrics` (e.g. {'eval/loss': 2.3}) rank checkpoints for keep-best.

    CheckpointSaveError when this save fails synchronously, or when the previous one (which
    orbax waits for before starting this one) failed in the background."""
    self._finish_save()
    if step in self.manager.all_steps():
      return False
    checksums = {'format': CHECKSUMS_FORMAT, 'arrays': fingerprints(state)}
    self._pending = step
    try:
      return self.manager.save(
          step, force=True, metrics=metrics,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(config),
                                  **{CHECKSUMS_ITEM: ocp.args.JsonSave(checksums)}))
    except Exception as e:  # pylint: disable=broad-except  (any storage error: one line)
      self._pending = None
      self._error = self._save_failed(step, e)
      self._error_raised = True
      raise self._error from e

  def check_save(self) -> None:
    """Raises CheckpointSaveError when a save has failed; otherwise returns at once, never
    waiting for a save in flight. Cheap (no I/O, no device work): call it every step."""
    if self._error is not None:
      self._error_raised = True
      raise self._error
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._finish_save()  # ended: collect how (joining a finished thread)

  def wait(self) -> None:
    """Blocks until the save in flight, if any, is finalised on disk; CheckpointSaveError if it
    (or an earlier one) failed."""
    self._finish_save()

  def _finish_save(self) -> None:
    if self._error is not None:
      self._error_raised = True
      raise self._error
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()  # re-raises the background save's exception, once
    except Exception as e:  # pylint: disable=broad-except
      self._error = self._save_failed(step, e)
      self._error_raised = True
      raise self._error from e

  def _save_failed(self, step: int, e: BaseException) -> CheckpointSaveError:
    try:
      done = complete_steps(self.directory)
    except Exception:  # pylint: disable=broad-except  (a local OSError or a storage client's error)
      done = []
    newest = (f'the newest complete checkpoint, step {done[-1]} in {self.directory}, is intact'
              if done else 'no complete checkpoint was written before it')
    return CheckpointSaveError(
        f'saving the checkpoint of step {step} to {self.directory} failed: {_describe(e)}; '
        f'{newest}. Fix the cause (permissions, free space, the storage) and run the same '
        'command again to resume')

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def close(self) -> None:
    """Waits for a save in flight and releases orbax's threads. Never raises, as it runs in
    `finally` blocks: a failed save not reported yet is logged as an error (call wait() first to
    have it raised)."""
    try:
      self._finish_save()
    except CheckpointSaveError as e:
      if not self._error_raised:
        log.error(f'checkpoints: {e}')
      self._error_raised = True
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if self._error is None:
        raise
      log.debug(f'checkpoints: closing after a failed save: {_describe(e)}')

  # -------------------------------------------------------------------------------------------
  # Rejecting checkpoints whose params turned out bad

  def reject_from(self, step: int, reason: str) -> int | None:
    """Moves every complete step >= `step` to WORKDIR/checkpoints_rejected/<step>-<time>/ (with a
    REASON.txt saying `reason`), one log line each, and returns the newest step left in
    checkpoints/ (None when none is). For a run whose loss went non-finite after step `step`:
    that step's params, and any later, are not a good place to resume. Waits for the save in
    flight first (CheckpointSaveError if it failed). Every process must call it."""
    self.wait()
    bad = [s for s in complete_steps(self.directory) if s >= step]
    if bad:
      self._set_aside({s: f'step {s} rejected ({reason})' for s in bad})
    left = complete_steps(self.directory)
    return left[-1] if left else None

  # -------------------------------------------------------------------------------------------
  # Restoring

  def _complete_steps(self) -> tuple[list[int], list[str]]:
    """(steps with orbax's commit marker, descriptions of what was skipped)."""
    self.manager.reload()  # restore() reads through the manager: let it see the same folders
    complete, incomplete, interrupted = _scan(self.directory)
    for name in interrupted:
      # Orbax deletes these itself; an interrupted save, never a checkpoint. Not an error.
      log.info(f'checkpoints: ignoring {name}: a save that never finished (interrupted)')
    skipped = []
    for step in incomplete:
      if files.is_url(self.directory):
        # On an object store orbax writes a step in place and adds the marker last (there is no
        # rename): a folder without it is a save that never finished, which orbax replaces when
        # it saves that step again. Not an error, as the tmp folders above.
        log.info(f'checkpoints: ignoring step {step}: it has no {COMMIT_MARKER}, a save that '
                 'never finished (interrupted)')
        continue
      skipped.append(f'step {step}: no {COMMIT_MARKER} (incomplete or partially copied)')
      log.warning(f'checkpoints: skipping step {step}: it has no {COMMIT_MARKER}, so it is '
                  'incomplete (e.g. a partial copy)')
    return complete, skipped

  def check_compatible(self, step: int, abstract_state, config: dict | None = None) -> None:
    """Raises CheckpointError naming the parameters whose shapes differ from `abstract_state`
    (and the config.model fields that differ, when the saved config is readable)."""
    if config is not None:
      self._check_activation(step, config.get('model', {}))
    saved = _flat_shapes(self.manager.item_metadata(step)['state'])
    expected = _flat_shapes(abstract_state)
    problems = []
    # Parameters first: they say more than the optimizer statistics that follow them.
    for name in sorted(set(saved) | set(expected), key=lambda n: (not n.startswith('params/'), n)):
      if name not in saved:
        problems.append(f'{name}: not in the checkpoint (config wants {expected[name]})')
      elif name not in expected:
        problems.append(f'{name}: in the checkpoint {saved[name]} but not in this config')
      elif saved[name] != expected[name]:
        problems.append(f'{name}: checkpoint {saved[name]} vs config {expected[name]}')
    if not problems:
      return
    hint = ''
    if config is not None:
      try:
        saved_model = self._read_config(step).get('model', {})
        diffs = [
            f'{k}={saved_model[k]!r} (now {v!r})' for k, v in config.get('model', {}).items()
            if k in saved_model and saved_model[k] != v
        ]
        if diffs:
          hint = '\nIt was written with config.model ' + ', '.join(diffs) + '.'
      except Exception:  # pylint: disable=broad-except  (the hint is optional)
        pass
    shown = '\n  '.join(problems[:5])
    more = f'\n  ... and {len(problems) - 5} more' if len(problems) > 5 else ''
    raise CheckpointError(
        f'checkpoint step {step} in {self.directory} does not fit this model config: '
        f'{len(problems)} array(s) differ:\n  {shown}{more}{hint}\n'
        'Use the config it was written with, or another --workdir to start a new run.')

  def _check_activation(self, step: int, model: dict) -> None:
    """The gated MLP activations share their shapes: resuming gated-SiLU weights as gated-GELU
    would read back without a shape error, so the saved activation is compared by name."""
    try:
      saved = presets.activation_of(self._read_config(step).get('model', {}))
    except Exception:  # pylint: disable=broad-except  (no readable saved config: shapes decide)
      return
    wanted = presets.activation_of(model)
    if saved and wanted and saved != wanted:
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} was trained with the MLP activation '
          f'{saved}, but this config computes {wanted}; set --config.model.mlp_activation={saved}'
          ' (or another --workdir to start a new run)')

  def _read_config(self, step: int) -> dict:
    return self.manager.restore(step,
                                args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

  def restore(self, step: int, abstract_state) -> Restored:
    """Reads step `step` into the shardings that `abstract_state`'s structs carry, and checks it
    against its checksums and for non-finite values (CorruptCheckpointError)."""
    step_dir = files.join(self.directory, str(step))
    data_dir = files.to_path(step_dir) / 'data'
    if data_dir.is_dir() and not (data_dir / data_state_filename()).exists():
      written = sorted(e.name for e in data_dir.iterdir() if e.name.startswith('process_'))
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} holds data-iterator states {written}, '
          f'none for this process ({data_state_filename()}): the data position is per process, '
          'so resume with the process count that wrote it (the model state itself restores on '
          'any mesh).')
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    verify(step_dir, restored['state'], f'checkpoint step {step} in {self.directory}')
    return Restored(step=step, state=restored['state'], data_state=restored['data'])

  def restore_latest(self, abstract_state, config: dict | None = None) -> Restored | None:
    """The newest checkpoint that reads back intact, or None when there is none at all.

    Steps that fail to read, differ from their checksums or hold non-finite values are moved to
    WORKDIR/checkpoints_rejected/ (so the run can write that step again), one line each, and the
    previous one is tried. An incompatible model config raises at once: an older step of the
    same run would not fit either.
    """
    steps, skipped = self._complete_steps()
    failures = list(skipped)
    reasons = {}
    for step in reversed(steps):
      try:
        self.check_compatible(step, abstract_state, config)
        restored = self.restore(step, abstract_state)
      except CorruptCheckpointError as e:
        reasons[step] = f'step {step} rejected ({str(e).split(": ", 1)[-1]})'
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any read error: try an older step)
        reasons[step] = f'step {step} cannot be read ({_describe(e)})'
      else:
        newer = [s for s in self.manager.all_steps() if s > step]
        if newer:
          self._set_aside(
              {s: reasons.get(s, f'step {s} cannot be read (incomplete)') for s in newer})
        if failures or reasons:
          log.info(f'checkpoints: resuming from step {step}, the newest readable checkpoint')
        return restored
      failures.append(reasons[step])
    if failures:
      raise CheckpointError(f'checkpoints exist in {self.directory} but none can be read:\n  '
                            + '\n  '.join(failures)
                            + '\nRefusing to start from scratch over them: move the folder '
                            'away (or use another --workdir) to start a new run.')
    return None

  def _set_aside(self, reasons: dict[int, str]) -> None:
    """Moves steps out of checkpoints/ so that orbax can save those steps again, one log line
    each (`reasons[step]` says why, also in the folder's REASON.txt); kept rather than deleted,
    for a post-mortem. Process 0 moves; every process waits for it."""
    if jax.process_index() == 0:
      rejected = files.to_path(self.workdir) / REJECTED_DIR
      rejected.mkdir(parents=True, exist_ok=True)
      for step, reason in sorted(reasons.items()):
        target = rejected / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
        n = 1
        while target.exists():  # the same step rejected twice within a second
          target = rejected / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}-{n}'
          n += 1
        _move_step(files.to_path(self.directory) / str(step), target, reason)
        log.warning(f'checkpoints: {reason}; moved it to {target}')
    _barrier('t5lite_checkpoints_set_aside')
    # Every process's orbax must see the moved steps gone, or one would skip a save of that step
    # that the others make (listings are never cached: t5lite/files.py).
    self.manager.reload()


def _move_step(source, target, reason: str) -> None:
  """Moves the step folder `source` to `target` and writes REASON.txt there.

  Locally one move (a rename). An object store has no rename, so the step is copied, REASON.txt written,
  and only then is the original deleted, its commit marker first: at every moment one whole copy
  exists, and if the deletion is cut short what is left in checkpoints/ has no marker, so it is
  never restored (orbax replaces it when it saves that step again)."""
  if not files.is_url(source):
    shutil.move(source, target)
    files.write_text(target / REASON_FILE, reason + '\n')
    return
  files.copy_tree(source, target)
  files.write_text(target / REASON_FILE, reason + '\n')
  (source / COMMIT_MARKER).unlink(missing_ok=True)
  source.rmtree(missing_ok=True)


def restore_as_numpy(workdir: str, step: int | None = None, check: bool = True) -> tuple[int, dict]:
  """(step, the saved TrainState as nested dicts of numpy arrays), without building a model.

  For inspection and tests: targets come from the checkpoint's own metadata, placed on one device,
  so it reads any checkpoint whatever mesh wrote it. Verified against its checksums and for
  finite values (CorruptCheckpointError) unless `check` is False (to look at a bad one).
  """
  ckpt = Checkpointer(workdir)
  try:
    steps, _ = ckpt._complete_steps()  # pylint: disable=protected-access
    if not steps:
      raise CheckpointError(f'no complete checkpoint in {ckpt.directory}')
    step = steps[-1] if step is None else step
    metadata = ckpt.manager.item_metadata(step)['state']
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata.tree, is_leaf=lambda x: hasattr(x, 'shape'))
    state = ckpt.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
    if check:
      verify(files.join(ckpt.directory, str(step)), state,
             f'checkpoint step {step} in {ckpt.directory}')
    return step, jax.tree.map(np.asarray, state)
  finally:
    ckpt.close()


# ---------------------------------------------------------------------------------------------
# Initialising a new run's params from another run's checkpoint (fine-tuning)

HF_PREFIX = 'hf:'  # checkpoint.init_from=hf:DIR: a HuggingFace T5 model directory (t5lite/hf.py)
T5X_PREFIX = 't5x:'  # checkpoint.init_from=t5x:DIR/checkpoint_N: a T5X checkpoint (t5lite/t5x.py)


def resolve_init_path(path: str) -> str:
  """The step directory that `checkpoint.init_from` names: a step directory itself, or a
  checkpoints directory (or the workdir above it), whose newest complete step is used.
  'hf:DIR' (a HuggingFace model directory) comes back as 'hf:' + its absolute path, and so does
  't5x:DIR' (a T5X checkpoint_N, or the folder of them: init_from.py reads it with t5lite/t5x.py,
  which says what is wrong with one that is not a T5X checkpoint)."""
  if path.startswith(T5X_PREFIX):
    t5x_dir = files.join(path[len(T5X_PREFIX):])
    if not files.to_path(t5x_dir).is_dir():
      raise CheckpointError(f'checkpoint.init_from={path}: no such directory (want a T5X '
                            'checkpoint directory, T5X_DIR/checkpoint_N)')
    return T5X_PREFIX + t5x_dir
  if path.startswith(HF_PREFIX):
    hf_dir = files.join(path[len(HF_PREFIX):])  # absolute, or a URL as it is (hf.py reads it)
    if not (files.to_path(hf_dir) / 'config.json').is_file():
      raise CheckpointError(f'checkpoint.init_from={path}: no HuggingFace model there (want a '
                            'directory with config.json and model.safetensors or '
                            'pytorch_model.bin)')
    return HF_PREFIX + hf_dir
  path = files.join(path)
  if (files.to_path(path) / 'state').is_dir():
    if not (files.to_path(path) / COMMIT_MARKER).exists():
      raise CheckpointError(f'checkpoint.init_from={path}: it has no {COMMIT_MARKER}, so it is '
                            'incomplete (an interrupted save or a partial copy)')
    return path
  directory = path
  if (files.to_path(path) / 'checkpoints').is_dir():
    directory = files.join(path, 'checkpoints')
  steps = complete_steps(directory)
  if not steps:
    raise CheckpointError(f'checkpoint.init_from={path}: no complete t5lite checkpoint there (want '
                          'a step directory, WORKDIR/checkpoints or WORKDIR)')
  return files.join(directory, str(steps[-1]))


def resolve_steps(spec: str, workdir: str | None) -> list[tuple[int, str]]:
  """(step, path) pairs that eval's and infer's --checkpoint names, oldest first:

    latest   the newest complete checkpoint in WORKDIR/checkpoints
    all      every complete checkpoint there
    N        step N there
    PATH     a step directory, a checkpoints directory or a workdir (its newest step), or hf:DIR
             (a HuggingFace T5, step 0)

  MissingCheckpointError when there is none.
  """
  spec = str(spec)
  if spec in ('latest', 'all') or spec.isdigit():
    if not workdir:
      raise MissingCheckpointError(f'--checkpoint {spec} needs --workdir (the run whose '
                                   'checkpoints to read)')
    where = files.join(workdir, 'checkpoints')
    steps = complete_steps(where)
    if spec.isdigit():
      if int(spec) not in steps:
        have = ', '.join(map(str, steps[-10:])) or 'none'
        raise MissingCheckpointError(f'no complete checkpoint of step {spec} in {where} '
                                     f'(complete steps: {have})')
      steps = [int(spec)]
    elif not steps:
      raise MissingCheckpointError(f'no complete checkpoint in {where}')
    elif spec == 'latest':
      steps = steps[-1:]
    return [(s, files.join(where, str(s))) for s in steps]
  try:
    path = resolve_init_path(spec)
  except CheckpointError as e:
    raise MissingCheckpointError(str(e).replace('checkpoint.init_from=', '--checkpoint ')) from None
  name = os.path.basename(path)
  return [(int(name) if name.isdigit() else 0, path)]
