"""Fine-tuning's params: read another run's checkpoint (or a converted one) onto a new model.

`checkpoint.init_from` names a t5lite step directory, checkpoints directory or workdir, or
`hf:DIR` (a HuggingFace T5, converted in memory by t5lite/hf.py); checkpoints.resolve_init_path
finds the step. `load_params_for_init` reads only its params, renamed and filtered by
checkpoint.init_rename / init_ignore, checked name by name and shape by shape against the new
model, onto the new model's shardings; `merge_init_params` fills the ignored ones from a fresh
init. `load_params` is the same without renames, for eval and infer.
"""
from __future__ import annotations

import re

import jax
import orbax.checkpoint as ocp

from t5lite import files
from t5lite.checkpoints import (HF_PREFIX, CheckpointError, _flat_shapes, resolve_init_path,
                                verify)

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
    state_dir = files.join(step_dir, 'state')
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
    # The params only: opt_state is not read, so its checksums are not compared.
    verify(step_dir, {'params': restored}, f'checkpoint.init_from={step_dir}')
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
