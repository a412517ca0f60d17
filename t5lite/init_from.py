"""Fine-tuning's params: read another run's checkpoint (or a converted one) onto a new model.

`checkpoint.init_from` names a t5lite step directory, checkpoints directory or workdir,
`hf:DIR` (a HuggingFace T5, converted in memory by t5lite/hf.py) or `t5x:DIR/checkpoint_N` (a
T5X checkpoint, converted in memory by t5lite/t5x.py); checkpoints.resolve_init_path finds the
step. `load_params_for_init` reads only its params, renamed and filtered by
checkpoint.init_rename / init_ignore, checked name by name and shape by shape against the new
model, onto the new model's shardings; `merge_init_params` fills the ignored ones from a fresh
init. `load_params` is the same without renames, for eval and infer. With
checkpoint.init_new_rows the vocabulary params grow onto a larger vocabulary that extends the
checkpoint's (t5lite/vocab_expansion.py).

With checkpoint.init_from_state='params_and_optimizer' a t5lite checkpoint also gives its
optimizer state (`load_state_for_init`; 'full' also its step and data position), and a T5X
checkpoint, to a run whose optimizer is Adafactor, T5X's Adafactor statistics and step count
(`load_adafactor_for_init`): T5X's and optax's Adafactor keep the same second
moments, and its decay 1 - (t+1)^-0.8 only continues with the step it was at (from a step count
of 0 the first update would overwrite the statistics whole). The learning-rate schedule, the
run's step and its data start at 0, as for any init_from but 'full'.
"""
from __future__ import annotations

import json
import re

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from t5lite import checkpoints, files, optim, vocab_expansion
from t5lite.checkpoints import (HF_PREFIX, T5X_PREFIX, CheckpointError, _flat_shapes,
                                resolve_init_path, verify)

# 'encoder/layers_0/.../kernel' for a jax key path: the names init_rename/ignore see (and
# train.trainable's regexes: one definition).
_path_name = optim.param_name


def _matches(name: str, patterns) -> bool:
  return any(re.search(p, name) for p in patterns)


def _listing(title: str, items: list[str], first: int = 5) -> str:
  more = f'\n    ... and {len(items) - first} more' if len(items) > first else ''
  return f'\n  {len(items)} {title}:\n    ' + '\n    '.join(items[:first]) + more


def _renamed(saved, rename) -> tuple[dict[str, str], list[str]]:
  """({new name: checkpoint name}, collisions) after checkpoint.init_rename."""
  renamed = {}
  collisions = []
  for old in sorted(saved):
    new = old
    for pattern, replacement in rename:
      new = re.sub(pattern, replacement, new)
    if new in renamed:
      collisions.append(f'{renamed[new]} and {old} -> {new}')
    renamed[new] = old
  return renamed, collisions


def load_params_for_init(path: str, abstract_params, rename=(), ignore=(), expansion=None,
                         new_lora: bool = True, optional=()):
  """Reads only the params of the checkpoint at `path` (see resolve_init_path) onto the shardings
  that `abstract_params` (ShapeDtypeStructs) carry, for a fine-tuning run's first step.

  `rename`: (regex, replacement) pairs applied in order, with re.sub, to the checkpoint's
  '/'-joined parameter names before matching. `ignore`: regexes (re.search) over parameter names;
  a new-model parameter that matches keeps its fresh initialisation, and a (renamed) checkpoint
  parameter that matches is dropped. Every other parameter of the new model must be in the
  checkpoint with the same shape, and every other checkpoint parameter must be used: otherwise
  CheckpointError lists the first few of each problem. Unused checkpoint params are an error
  rather than silently dropped because they usually mean a rename that did not apply.

  `expansion` (a vocab_expansion.Expansion, checkpoint.init_new_rows): the vocabulary params may
  have fewer rows in the checkpoint than in the model; they are grown onto the new vocabulary
  (t5lite/vocab_expansion.py) after reading, every other dimension still has to match.

  `new_lora`: a model with LoRA factors (model.lora_rank > 0) takes a checkpoint without any
  (a base model's) as if init_ignore listed them: they come from the fresh init, whose B = 0
  computes the base model. A checkpoint with factors of its own must have all of them.

  `optional`: regexes of new-model params that the checkpoint may lack (prompt tuning's prompt,
  absent from the base model it tunes): taken from it when it has them, else kept fresh.

  Returns a tree with `abstract_params`' structure: arrays, and the ShapeDtypeStruct itself where
  a parameter was ignored or optional and absent (merge_init_params fills those from a fresh
  init).
  """
  step_dir = resolve_init_path(path)
  wanted = {_path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(abstract_params)}
  hf_params = None  # or T5X params: both converted in memory
  if step_dir.startswith(T5X_PREFIX):
    # A T5X checkpoint's params, converted in memory as t5x-to-t5lite does (t5lite/t5x.py).
    from t5lite import t5x  # pylint: disable=import-outside-toplevel
    scanned = any(re.match(r'(encoder|decoder)/layers/', n) for n in wanted)
    try:
      hf_params = t5x.load(step_dir[len(T5X_PREFIX):], scanned)[1]
    except t5x.T5XError as e:
      raise CheckpointError(f'checkpoint.init_from={step_dir}: {e}') from None
    saved = {k: tuple(v.shape) for k, v in hf_params.items()}
  elif step_dir.startswith(HF_PREFIX):
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

  renamed, collisions = _renamed(saved, rename)
  lora = re.compile(optim.LORA_FACTORS)
  fresh_lora = new_lora and not any(lora.search(n) for n in renamed)
  needed = {
      n for n in wanted if not _matches(n, ignore) and not (fresh_lora and lora.search(n)) and (
          n in renamed or not _matches(n, optional))
  }
  missing = sorted(n for n in needed if n not in renamed)
  extra = sorted(n if renamed[n] == n else f'{n} (from {renamed[n]})' for n in renamed
                 if n not in needed and not _matches(n, ignore))
  grow = _vocab_params(expansion, saved, renamed, wanted, needed)
  shapes = sorted(f'{n}: checkpoint {saved[renamed[n]]} vs model {tuple(wanted[n].shape)}'
                  for n in needed
                  if n in renamed and n not in grow and saved[renamed[n]] != tuple(wanted[n].shape))
  if collisions or missing or extra or shapes:
    message = f'checkpoint.init_from={step_dir}: its params do not fit this model:'
    if collisions:
      message += _listing('checkpoint params renamed to the same name', collisions)
    if missing:
      message += _listing('model params not in the checkpoint (after init_rename)', missing)
    if extra:
      message += _listing('checkpoint params the model has no place for', extra)
      if any(lora.search(n) for n in extra):
        message += ('\n(LoRA factors: set model.lora_rank, lora_alpha and lora_targets as the run '
                    'that wrote them had them, docs/adaptation.md)')
    if shapes:
      message += _listing('shape mismatches', shapes)
      if any(n.split(':')[0] in vocab_expansion.VOCAB_AXIS for n in shapes) and not expansion:
        message += ('\n(a larger vocabulary: set checkpoint.init_new_rows, docs/adaptation.md)')
    raise CheckpointError(
        message + '\nMap checkpoint names onto the model\'s with checkpoint.init_rename '
        '(regex, replacement) pairs, or keep model params fresh / drop checkpoint params with '
        'checkpoint.init_ignore regexes.')

  # Restore targets in the checkpoint's own names, carrying the new model's shardings (and
  # dtypes: orbax casts), so values land sharded; opt_state and step are never read.
  used = {renamed[n]: wanted[n] for n in needed}
  for n, old_shape in grow.items():  # read whole on every device, grown on the host below
    used[renamed[n]] = jax.ShapeDtypeStruct(old_shape, wanted[n].dtype,
                                            sharding=_replicated(wanted[n].sharding))
  if hf_params is not None:
    values = {}
    for old, s in used.items():
      values[old] = _place(hf_params[old], s)
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
  if grow:
    loaded.update(_expand(expansion, step_dir, {n: loaded[n] for n in grow}, wanted))
  return jax.tree_util.tree_map_with_path(lambda p, s: loaded.get(_path_name(p), s),
                                          abstract_params)


def _place(x, struct):
  """Host array `x` as `struct`'s dtype, on its sharding: every process holds the whole array and
  hands each of its devices its slice."""
  x = np.asarray(x).astype(struct.dtype)
  return (jax.make_array_from_callback(struct.shape, struct.sharding, lambda i: x[i])
          if struct.sharding is not None else jax.numpy.asarray(x))


def _replicated(sharding):
  """The whole array on every device of `sharding`'s mesh (None stays None)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return sharding if sharding is None or sharding.is_fully_replicated else None


def _vocab_params(expansion, saved, renamed, wanted, needed) -> dict[str, tuple]:
  """{model name: checkpoint shape} of the vocabulary params to grow: with an expansion, those of
  vocab_expansion.VOCAB_AXIS whose checkpoint shape differs from the model's on the vocabulary
  axis at most (rows also when equal in number: the sentinels still move); else none."""
  if not expansion:
    return {}
  grow = {}
  for n, axis in vocab_expansion.VOCAB_AXIS.items():
    if n in needed and n in renamed:
      have, want = list(saved[renamed[n]]), list(wanted[n].shape)
      if len(have) == len(want) and have[:axis] + have[axis + 1:] == want[:axis] + want[axis + 1:]:
        grow[n] = tuple(have)
  return grow


def _expand(expansion, step_dir, arrays, wanted) -> dict:
  """The vocabulary params `arrays` grown onto the run's vocabulary, on the model's shardings."""
  try:
    old = vocab_expansion.old_vocabulary(step_dir, expansion.old_vocabulary)
    rows = wanted[next(iter(arrays))].shape[vocab_expansion.VOCAB_AXIS[next(iter(arrays))]]
    grown = vocab_expansion.expand_params({n: np.asarray(x) for n, x in arrays.items()}, old,
                                          expansion.new_vocabulary, rows, expansion.new_rows,
                                          expansion.seed)
  except vocab_expansion.VocabExpansionError as e:
    raise CheckpointError(f'checkpoint.init_from={step_dir}: {e}') from None
  return {n: _place(x, wanted[n]) for n, x in grown.items()}


def load_params(path: str, abstract_params):
  """The params of the checkpoint at `path` (a step directory or hf:DIR, as resolve_steps gives)
  on `abstract_params`' shardings, for evaluation and inference: the names and shapes must match
  the model exactly (no rename, nothing ignored, LoRA factors included)."""
  return load_params_for_init(path, abstract_params, new_lora=False)


def merge_init_params(fresh, loaded):
  """`loaded` (from load_params_for_init) with its ignored leaves taken from `fresh`."""
  return jax.tree.map(lambda f, x: f if isinstance(x, jax.ShapeDtypeStruct) else x, fresh, loaded)


def load_state_for_init(path: str, abstract_state, mode: str):
  """(train state, data state) of the t5lite checkpoint at `path` for checkpoint.init_from_state
  `mode` (params_and_optimizer or full) onto the shardings `abstract_state` (a TrainState of
  structs) carries. The saved state must have the run's exact arrays: the same model, optimizer
  (optimizer.name, clipping by train.max_grad_norm, train.trainable); else CheckpointError lists
  what differs.

  full: the state as saved (its step) and this process's data-iterator state: a branch of the
  checkpoint's run. params_and_optimizer: step 0 and the schedule's counts (optax
  ScaleByScheduleState) fresh, the statistics and their own counts as saved (Adafactor's decay
  and Adam's bias correction go on); data state None. The counts that are not carried come back
  as the abstract's structs, for merge_init_params to fill from the fresh state."""
  step_dir = resolve_init_path(path)
  if step_dir.startswith((T5X_PREFIX, HF_PREFIX)):
    raise CheckpointError(
        f'checkpoint.init_from={step_dir} with checkpoint.init_from_state={mode!r}: only t5lite '
        'checkpoints hold a whole train state'
        + (" (t5x: takes 'params_and_optimizer' for its Adafactor statistics)"
           if mode == 'full' and step_dir.startswith(T5X_PREFIX) else
           "; an hf: model has params only: use init_from_state='params'"))
  state_dir = files.join(step_dir, 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(state_dir)
  saved = _flat_shapes(getattr(metadata, 'item_metadata', metadata))
  wanted = _flat_shapes(abstract_state)
  problems = [
      f'{n}: checkpoint {saved.get(n, "(none)")} vs this run {wanted.get(n, "(none)")}'
      for n in sorted(set(saved) | set(wanted)) if saved.get(n) != wanted.get(n)
  ]
  if problems:
    raise CheckpointError(
        f'checkpoint.init_from={step_dir} with checkpoint.init_from_state={mode!r}: its train '
        'state does not fit this run:' + _listing('arrays differ', problems)
        + '\nThe optimizer state comes over only to the same model with the same optimizer.name, '
        'train.max_grad_norm (clipping on or off) and train.trainable; or use '
        "checkpoint.init_from_state='params'.")
  state = ocp.StandardCheckpointer().restore(state_dir, abstract_state)
  verify(step_dir, state, f'checkpoint.init_from={step_dir}')
  if mode == 'full':
    data_file = files.to_path(step_dir) / 'data' / checkpoints.data_state_filename()
    if not data_file.exists():
      raise CheckpointError(f'checkpoint.init_from={step_dir}: no data-iterator state '
                            f'{data_file.name} for this process (written by another process '
                            "count?); init_from_state='params_and_optimizer' starts the data anew")
    return state, json.loads(data_file.read_text())
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  opt_state = jax.tree.map(lambda x, s: s if is_schedule(x) else x, state.opt_state,
                           abstract_state.opt_state, is_leaf=is_schedule)
  return state.replace(step=abstract_state.step, opt_state=opt_state), None


def load_adafactor_for_init(path: str, abstract_opt_state, abstract_params, rename=(), ignore=()):
  """(optimizer state, note) for a run initialised from the T5X checkpoint `path` (t5x:...), or
  (None, '') when there is nothing to carry: `path` is not a T5X checkpoint, or this run's
  optimizer is not Adafactor (its state holds no optax FactoredState).

  The state has `abstract_opt_state`'s structure: every FactoredState's count is T5X's step and
  its v_row / v_col / v hold T5X's statistics of the param loaded into each param
  (t5x.adafactor_stats; `rename` / `ignore` as for load_params_for_init), on the shardings the
  structs carry; every other leaf (an ignored param's statistics, the schedule's count) is the
  ShapeDtypeStruct itself, for merge_init_params to fill from the fresh state. `note` says what
  was not carried (T5X's first moment, which t5lite's Adafactor does not keep)."""
  step_dir = resolve_init_path(path)
  if not step_dir.startswith(T5X_PREFIX):
    return None, ''
  factored_state = optax.FactoredState
  is_factored = lambda x: isinstance(x, factored_state)
  if not any(is_factored(x) for x in jax.tree.leaves(abstract_opt_state, is_leaf=is_factored)):
    return None, ''
  from t5lite import t5x  # pylint: disable=import-outside-toplevel
  try:
    ckpt = t5x.Checkpoint(step_dir[len(T5X_PREFIX):])
    fields = t5x.model_fields(ckpt.shapes, '', ckpt.path)
    step = t5x.step(ckpt)
    renamed, _ = _renamed(_t5lite_names(ckpt, abstract_params), rename)
    params = {_path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(abstract_params)}

    def place(x, struct):
      x = x.astype(struct.dtype)
      return (jax.make_array_from_callback(struct.shape, struct.sharding, lambda i: x[i])
              if struct.sharding is not None else jax.numpy.asarray(x))

    def fill(node):
      if not is_factored(node):
        return node
      stats = {'v': {}, 'v_row': {}, 'v_col': {}}
      leaves = {k: _by_name(getattr(node, k)) for k in stats}
      for name, param in params.items():
        if _matches(name, ignore) or name not in renamed:
          continue
        if all(name not in leaves[k] for k in stats):
          continue  # frozen by train.trainable: no statistics kept
        if any(name not in leaves[k] for k in stats):
          raise CheckpointError(f'the Adafactor state has no statistics for {name}')
        structs = {k: leaves[k][name] for k in stats}
        shapes = {k: s.shape for k, s in structs.items()}
        values = t5x.adafactor_stats(ckpt, renamed[name], fields['num_heads'],
                                     {'param': param.shape, **shapes})
        for k in stats:
          stats[k][name] = place(values[k], structs[k])
      filled = {
          k: jax.tree_util.tree_map_with_path(lambda p, s, k=k: stats[k].get(_path_name(p), s),
                                              getattr(node, k)) for k in stats
      }
      count = node.count
      count = place(np.asarray(step, np.int32), count) if hasattr(count, 'shape') else count
      return node._replace(count=count, **filled)

    state = jax.tree.map(fill, abstract_opt_state, is_leaf=is_factored)
    note = ('; T5X\'s first moment m is not carried (t5lite\'s Adafactor keeps none)'
            if t5x.first_moment_used(ckpt) else '')
  except t5x.T5XError as e:
    raise CheckpointError(f'checkpoint.init_from={step_dir}: {e}') from None
  return state, note


def _t5lite_names(ckpt, abstract_params) -> list[str]:
  """The T5X checkpoint's params under their t5lite names, stacked when the model scans."""
  from t5lite import t5x  # pylint: disable=import-outside-toplevel
  names = list(t5x.param_map(ckpt.shapes))
  scanned = any(
      re.match(r'(encoder|decoder)/layers/', _path_name(p))
      for p, _ in jax.tree_util.tree_leaves_with_path(abstract_params))
  if scanned:
    names = sorted({re.sub(r'^(encoder|decoder)/layers_\d+/', r'\1/layers/', n) for n in names})
  return names


def _by_name(tree) -> dict:
  return {_path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(tree)}
