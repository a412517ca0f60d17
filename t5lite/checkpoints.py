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

Every job finds checkpoints here: `complete_steps` is the one scan for commit markers (resume,
`init_from`, eval), `resolve_steps` turns eval's and infer's --checkpoint into steps and paths,
and `load_params` / `load_params_for_init` read only the params onto any mesh.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import options as ocp_options

COMMIT_MARKER = 'commit_success.txt'  # orbax writes it last, just before the final rename
TMP_MARKER = '.orbax-checkpoint-tmp'  # orbax's suffix for a step still being written
REJECTED_DIR = 'checkpoints_rejected'  # unreadable steps are moved here, next to checkpoints/

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used; the message says which one, why, and what to do."""


class MissingCheckpointError(RuntimeError):
  """The checkpoint asked for does not exist (exit code 2). Not a CheckpointError, which means
  one that exists but cannot be read (exit code 1)."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any  # TrainState on the target shardings
  data_state: dict  # this process's data-iterator state, for iterator.set_state


def _scan(directory: str) -> tuple[list[int], list[int], list[str]]:
  """(complete steps, step folders without the commit marker, interrupted saves' folder names)
  in `directory`, each sorted; all empty when it does not exist."""
  complete, incomplete, interrupted = [], [], []
  if os.path.isdir(directory):
    for name in sorted(os.listdir(directory)):
      if TMP_MARKER in name:
        interrupted.append(name)
      elif name.isdigit() and os.path.isdir(os.path.join(directory, name)):
        marked = os.path.exists(os.path.join(directory, name, COMMIT_MARKER))
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
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
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
        },
        # The train loop decides when to save and calls save(force=True), so none of orbax's save
        # policies (interval, its own preemption check) runs; this only sets retention and async.
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save,
                                             preservation_policy=policy, create=True, **track))

  # -------------------------------------------------------------------------------------------
  # Saving

  def save(self, step: int, state, data_state: dict, config: dict,
           metrics: dict[str, float] | None = None) -> bool:
    """Starts writing `state` as step `step` and returns after the device-to-host copy (async) or
    when it is on disk (sync). Every process must call it. False if that step already exists.
    `metrics` (e.g. {'eval/loss': 2.3}) rank checkpoints for keep-best."""
    if step in self.manager.all_steps():
      return False
    return self.manager.save(
        step, force=True, metrics=metrics,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_state),
                                config=ocp.args.JsonSave(config)))

  def wait(self) -> None:
    """Blocks until the in-flight save, if any, is finalised on disk."""
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def close(self) -> None:
    self.manager.close()  # waits for an in-flight save first

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
      skipped.append(f'step {step}: no {COMMIT_MARKER} (incomplete or partially copied)')
      log.warning(f'checkpoints: skipping step {step}: it has no {COMMIT_MARKER}, so it is '
                  'incomplete (e.g. a partial copy)')
    return complete, skipped

  def check_compatible(self, step: int, abstract_state, config: dict | None = None) -> None:
    """Raises CheckpointError naming the parameters whose shapes differ from `abstract_state`
    (and the config.model fields that differ, when the saved config is readable)."""
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

  def _read_config(self, step: int) -> dict:
    return self.manager.restore(step,
                                args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

  def restore(self, step: int, abstract_state) -> Restored:
    """Reads step `step` into the shardings that `abstract_state`'s structs carry."""
    data_dir = os.path.join(self.directory, str(step), 'data')
    if os.path.isdir(data_dir) and not os.path.exists(os.path.join(data_dir,
                                                                   data_state_filename())):
      written = sorted(n for n in os.listdir(data_dir) if n.startswith('process_'))
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} holds data-iterator states {written}, '
          f'none for this process ({data_state_filename()}): the data position is per process, '
          'so resume with the process count that wrote it (the model state itself restores on '
          'any mesh).')
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return Restored(step=step, state=restored['state'], data_state=restored['data'])

  def restore_latest(self, abstract_state, config: dict | None = None) -> Restored | None:
    """The newest checkpoint that reads back, or None when there is none at all.

    Steps that fail to read are reported, moved to WORKDIR/checkpoints_rejected/ (so the run can
    write that step again) and the previous one is tried. An incompatible model config raises at
    once: an older step of the same run would not fit either.
    """
    steps, skipped = self._complete_steps()
    failures = list(skipped)
    for step in reversed(steps):
      try:
        self.check_compatible(step, abstract_state, config)
        restored = self.restore(step, abstract_state)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any read error: try an older step)
        reason = f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
        failures.append(f'step {step}: {reason}')
        log.warning(f'checkpoints: step {step} cannot be read ({reason}); trying an older one')
        continue
      newer = [s for s in self.manager.all_steps() if s > step]
      if newer:
        self._set_aside(newer)
      if failures:
        log.info(f'checkpoints: resuming from step {step}, the newest readable checkpoint')
      return restored
    if failures:
      raise CheckpointError(f'checkpoints exist in {self.directory} but none can be read:\n  '
                            + '\n  '.join(failures)
                            + '\nRefusing to start from scratch over them: move the folder '
                            'away (or use another --workdir) to start a new run.')
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable steps out of checkpoints/ so that orbax can save those steps again;
    kept rather than deleted, for a post-mortem."""
    if jax.process_index() == 0:
      rejected = os.path.join(self.workdir, REJECTED_DIR)
      os.makedirs(rejected, exist_ok=True)
      for step in steps:
        target = os.path.join(rejected, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
        shutil.move(os.path.join(self.directory, str(step)), target)
        log.warning(f'checkpoints: moved unreadable step {step} to {target}')
    _barrier('t5lite_checkpoints_set_aside')
    self.manager.reload()


def restore_as_numpy(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, the saved TrainState as nested dicts of numpy arrays), without building a model.

  For inspection and tests: targets come from the checkpoint's own metadata, placed on one device,
  so it reads any checkpoint whatever mesh wrote it.
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
    return step, jax.tree.map(np.asarray, state)
  finally:
    ckpt.close()


# ---------------------------------------------------------------------------------------------
# Initialising a new run's params from another run's checkpoint (fine-tuning)

HF_PREFIX = 'hf:'  # checkpoint.init_from=hf:DIR: a HuggingFace T5 model directory (t5lite/hf.py)


def resolve_init_path(path: str) -> str:
  """The step directory that `checkpoint.init_from` names: a step directory itself, or a
  checkpoints directory (or the workdir above it), whose newest complete step is used.
  'hf:DIR' (a HuggingFace model directory) comes back as 'hf:' + its absolute path."""
  if path.startswith(HF_PREFIX):
    hf_dir = os.path.abspath(os.path.expanduser(path[len(HF_PREFIX):]))
    if not os.path.isfile(os.path.join(hf_dir, 'config.json')):
      raise CheckpointError(f'checkpoint.init_from={path}: no HuggingFace model there (want a '
                            'directory with config.json and model.safetensors or '
                            'pytorch_model.bin)')
    return HF_PREFIX + hf_dir
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'state')):
    if not os.path.exists(os.path.join(path, COMMIT_MARKER)):
      raise CheckpointError(f'checkpoint.init_from={path}: it has no {COMMIT_MARKER}, so it is '
                            'incomplete (an interrupted save or a partial copy)')
    return path
  directory = path
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    directory = os.path.join(path, 'checkpoints')
  steps = complete_steps(directory)
  if not steps:
    raise CheckpointError(f'checkpoint.init_from={path}: no complete t5lite checkpoint there (want '
                          'a step directory, WORKDIR/checkpoints or WORKDIR)')
  return os.path.join(directory, str(steps[-1]))


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
    where = os.path.join(os.path.abspath(workdir), 'checkpoints')
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
    return [(s, os.path.join(where, str(s))) for s in steps]
  try:
    path = resolve_init_path(spec)
  except CheckpointError as e:
    raise MissingCheckpointError(str(e).replace('checkpoint.init_from=', '--checkpoint ')) from None
  name = os.path.basename(path)
  return [(int(name) if name.isdigit() else 0, path)]


def _path_name(path) -> str:
  """'encoder/layers_0/.../kernel' for a jax key path: the names that init_rename/ignore see."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '/'.join(parts)


def _matches(name: str, patterns) -> bool:
  return any(re.search(p, name) for p in patterns)


def _listing(title: str, items: list[str], first: int = 5) -> str:
  more = f'\n    ... and {len(items) - first} more' if len(items) > first else ''
  return f'\n  {len(items)} {title}:\n    ' + '\n    '.join(items[:first]) + more


def load_params_for_init(path: str, abstract_params, rename=(), ignore=()):
  """Reads only the params of the checkpoint at `path` (see resolve_init_path) onto the shardings
  that `abstract_params` (ShapeDtypeStructs) carry, for a fine-tuning run's first step.

  `rename`: (regex, replacement) pairs applied in order, with re.sub, to the checkpoint's
  '/'-joined parameter names before matching. `ignore`: regexes (re.search) over parameter names;
  a new-model parameter that matches keeps its fresh initialisation, and a (renamed) checkpoint
  parameter that matches is dropped. Every other parameter of the new model must be in the
  checkpoint with the same shape, and every other checkpoint parameter must be used: otherwise
  CheckpointError lists the first few of each problem. Unused checkpoint params are an error
  rather than silently dropped because they usually mean a rename that did not apply.

  Returns a tree with `abstract_params`' structure: arrays, and the ShapeDtypeStruct itself where
  a parameter was ignored (merge_init_params fills those from a fresh init).
  """
  step_dir = resolve_init_path(path)
  wanted = {_path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(abstract_params)}
  hf_params = None
  if step_dir.startswith(HF_PREFIX):
    # HuggingFace weights, converted in memory to t5lite names in this model's layout (scanned
    # or not); then the same rename/ignore/shape checks and placement as a t5lite checkpoint.
    from t5lite import hf  # pylint: disable=import-outside-toplevel  (the optional [hf] extra)
    scanned = any(re.match(r'(encoder|decoder)/layers/', n) for n in wanted)
    try:
      hf_params = hf.load_flat_for_init(step_dir[len(HF_PREFIX):], scanned)
    except hf.HFConversionError as e:
      raise CheckpointError(f'checkpoint.init_from={step_dir}: {e}') from None
    saved = {k: tuple(v.shape) for k, v in hf_params.items()}
  else:
    state_dir = os.path.join(step_dir, 'state')
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(state_dir)
    metadata = getattr(metadata, 'item_metadata', metadata)  # orbax 0.12 wraps it in StepMetadata
    saved = {
        k[len('params/'):]: v for k, v in _flat_shapes(metadata).items() if k.startswith('params/')
    }

  renamed = {}  # new name -> checkpoint name
  collisions = []
  for old in sorted(saved):
    new = old
    for pattern, replacement in rename:
      new = re.sub(pattern, replacement, new)
    if new in renamed:
      collisions.append(f'{renamed[new]} and {old} -> {new}')
    renamed[new] = old
  needed = {n for n in wanted if not _matches(n, ignore)}
  missing = sorted(n for n in needed if n not in renamed)
  extra = sorted(n if renamed[n] == n else f'{n} (from {renamed[n]})' for n in renamed
                 if n not in needed and not _matches(n, ignore))
  shapes = sorted(f'{n}: checkpoint {saved[renamed[n]]} vs model {tuple(wanted[n].shape)}'
                  for n in needed if n in renamed and saved[renamed[n]] != tuple(wanted[n].shape))
  if collisions or missing or extra or shapes:
    message = f'checkpoint.init_from={step_dir}: its params do not fit this model:'
    if collisions:
      message += _listing('checkpoint params renamed to the same name', collisions)
    if missing:
      message += _listing('model params not in the checkpoint (after init_rename)', missing)
    if extra:
      message += _listing('checkpoint params the model has no place for', extra)
    if shapes:
      message += _listing('shape mismatches', shapes)
    raise CheckpointError(
        message + '\nMap checkpoint names onto the model\'s with checkpoint.init_rename '
        '(regex, replacement) pairs, or keep model params fresh / drop checkpoint params with '
        'checkpoint.init_ignore regexes.')

  # Restore targets in the checkpoint's own names, carrying the new model's shardings (and
  # dtypes: orbax casts), so values land sharded; opt_state and step are never read.
  used = {renamed[n]: wanted[n] for n in needed}
  if hf_params is not None:
    values = {}
    for old, s in used.items():
      x = hf_params[old].astype(s.dtype)
      # Every process holds the whole host array and hands each of its devices its slice.
      values[old] = (jax.make_array_from_callback(s.shape, s.sharding, lambda i, x=x: x[i])
                     if s.sharding is not None else jax.numpy.asarray(x))
  else:
    target = {}
    for old, struct in used.items():
      node = target
      *parents, leaf = old.split('/')
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=struct.sharding)
    restored = checkpointer.restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item={'params': target},
            restore_args={'params': ocp.checkpoint_utils.construct_restore_args(target)},
            partial_restore=True))['params']
    values = {_path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(restored)}
  names_back = {old: new for new, old in renamed.items()}
  loaded = {names_back[old]: x for old, x in values.items()}
  return jax.tree_util.tree_map_with_path(lambda p, s: loaded.get(_path_name(p), s),
                                          abstract_params)


def load_params(path: str, abstract_params):
  """The params of the checkpoint at `path` (a step directory or hf:DIR, as resolve_steps gives)
  on `abstract_params`' shardings, for evaluation and inference: the names and shapes must match
  the model exactly (no rename, nothing ignored)."""
  return load_params_for_init(path, abstract_params)


def merge_init_params(fresh, loaded):
  """`loaded` (from load_params_for_init) with its ignored leaves taken from `fresh`."""
  return jax.tree.map(lambda f, x: f if isinstance(x, jax.ShapeDtypeStruct) else x, fresh, loaded)
