"""Sharding in one place: mesh axes, logical rules, abstract params, a jit that enters them.

The single place where logical axis names meet mesh axes. Parameter shardings come from the
logical names that `nn.with_logical_partitioning` attaches to every parameter (traced abstractly
by `abstract_params`, nothing allocated); optimizer-state shardings follow the parameter they
belong to; batches are split over data+fsdp. `jit` is T5X's partitioner idea: the jitted
function enters the mesh and the rules itself, so no caller wraps a call in `activate` by hand.

A leaf of the package (layer 1): it imports neither config nor the models.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axes. First matching rule whose mesh axes are still free wins (flax).
# Parameters: fsdp shards the embed dimension (ZeRO-3 style), tensor shards heads / mlp / vocab.
# Activations use act_* names so the batch can take data+fsdp while weights use fsdp for embed.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('act_batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('kv', None),
    ('act_kv', None),
    ('act_embed', None),
    ('act_length', None),
    ('length', None),
    ('layers', None),
    ('relpos_buckets', None),
    ('lora_rank', None),  # LoRA factors' rank axis (t5lite/models/lora.py): small, replicated
)


def make_mesh(
    shape: Sequence[int], devices: Sequence[jax.Device] | None = None,
    dcn_shape: Sequence[int] = (1, 1, 1)) -> Mesh:
  """A GSPMD-style (Auto axis types) mesh over `devices` (default: all) with axes MESH_AXES of
  sizes `shape`. `dcn_shape` > 1 (multislice): axis i spans dcn_shape[i] slices, each holding
  shape[i] / dcn_shape[i] devices of it, so the inner (ICI) part of every axis stays in a slice."""
  devices = list(devices if devices is not None else jax.devices())
  dcn_shape = tuple(int(n) for n in dcn_shape)
  if any(n > 1 for n in dcn_shape):
    ici_shape = tuple(s // n for s, n in zip(shape, dcn_shape))
    grid = _physical_layout(mesh_utils.create_hybrid_device_mesh, ici_shape, dcn_shape,
                            devices=devices)
  elif jax.process_count() > 1 or devices[0].platform != 'cpu':
    # Orders devices so that the inner axes stay within a host / ICI ring.
    grid = _physical_layout(mesh_utils.create_device_mesh, tuple(shape), devices=devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _physical_layout(create, *args, devices):
  """`create(*args, devices=...)` (a mesh_utils layout of the devices by their physical
  coordinates); when no product of whole physical axes matches an axis (fsdp=64 on a 16x16
  slice), again with a physical axis split between two mesh axes, which jax allows on request."""
  try:
    return create(*args, devices=devices)
  except NotImplementedError:
    return create(*args, devices=devices, allow_split_physical_axes=True)


def num_slices(devices: Sequence[jax.Device]) -> int:
  """How many slices (ICI domains joined by DCN) `devices` form: distinct `slice_index`es (TPU
  multislice); 1 for devices without one (CPU, GPU, a single slice)."""
  return len({getattr(d, 'slice_index', 0) or 0 for d in devices})


def rules_tuple(rules: Rules) -> tuple:
  """Rules as nested tuples (hashable: usable as a cache key; what flax expects)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  """Mesh and logical rules in scope, so the model's activation constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_tuple(rules)):
    yield


class Partitioned:
  """A jitted function that runs under its mesh and logical rules (see `jit`).

  Calling it or lowering it enters `activate(mesh, rules)` around the jitted call, because the
  model's logical constraints resolve against whatever rules are in scope at trace time.
  `.jitted` is the plain jax.jit object (e.g. for `.lower` under a scope of the caller's own).
  """

  def __init__(self, jitted, mesh: Mesh | None, rules: Rules | None):
    self.jitted = jitted
    self.mesh = mesh
    self.rules = None if rules is None else rules_tuple(rules)

  def _scope(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return activate(self.mesh, self.rules)

  def __call__(self, *args, **kwargs):
    with self._scope():
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    """Ahead-of-time lowering (arguments may be ShapeDtypeStructs); `.compile()` the result."""
    with self._scope():
      return self.jitted.lower(*args, **kwargs)


def jit(fn: Callable, mesh: Mesh | None, rules: Rules | None, *, in_shardings=None,
        out_shardings=None, donate_argnums=(), static_argnums=()) -> Partitioned:
  """jax.jit of `fn` (with shardings: this is pjit) that enters `mesh` and `rules` on every call.

  `in_shardings` / `out_shardings` None leave the choice to jax.jit (inputs keep their own
  shardings, the compiler picks the outputs'). `mesh` None: a plain jit, nothing entered (for
  single-device use, where there are no rules to apply).
  """
  if mesh is not None and rules is None:
    raise ValueError('partitioning.jit: pass the logical axis `rules` together with `mesh`.')
  kwargs = {}
  if in_shardings is not None:
    kwargs['in_shardings'] = in_shardings
  if out_shardings is not None:
    kwargs['out_shardings'] = out_shardings
  jitted = jax.jit(fn, donate_argnums=donate_argnums, static_argnums=static_argnums, **kwargs)
  return Partitioned(jitted, mesh, rules)


def logical_shardings(boxed_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree whose leaves carry logical names (flax LogicallyPartitioned)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def example_inputs(model: nn.Module, rows: int, length: int = 8) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a small batch of model inputs, enough to trace `model.init`: the
  parameter shapes do not depend on the batch, only the tokens the architecture reads do."""
  inputs = {'decoder_input_tokens': jax.ShapeDtypeStruct((rows, length), jnp.int32)}
  if model.cfg.architecture == 'encoder_decoder':
    inputs['encoder_input_tokens'] = jax.ShapeDtypeStruct((rows, length), jnp.int32)
  return inputs


def abstract_params(model: nn.Module, mesh: Mesh, rules: Rules, inputs=None):
  """(params as ShapeDtypeStructs carrying this mesh's shardings, the param shardings).

  Fully abstract: `model.init` is traced with jax.eval_shape, its PRNG key made inside the traced
  function, so no array is created; the same code serves topologies that cannot execute (AOT).
  `inputs`: the model's inputs as arrays or ShapeDtypeStructs (only their shapes and dtypes are
  read); default `example_inputs` with one row per device.
  """
  if inputs is None:
    inputs = example_inputs(model, mesh.devices.size)
  inputs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in inputs.items()}
  with activate(mesh, rules):
    boxed = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), **x), inputs)['params']
    shardings = logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def optimizer_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_shardings,
                              mesh: Mesh):
  """Shardings for the optimizer state: a leaf shaped like its parameter shares its sharding;
  anything else (step counts, Adafactor's factored row/column statistics) is replicated, since
  those are vectors or scalars and cheap to keep whole on every device."""
  replicated = NamedSharding(mesh, P())

  def leaf_sharding(state_leaf, param_sharding):
    shape = getattr(state_leaf, 'shape', ())
    spec = param_sharding.spec
    if len(shape) == len(spec) and len(shape) > 0 and _divisible(shape, spec, mesh):
      return param_sharding
    return replicated

  # optax finds the parameter-shaped parts by calling init on a placeholder; under eval_shape, so
  # that not even its step counters are created as arrays.
  # Frozen params (train.trainable) hold an empty optax.MaskedNode: it stays as it is.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return optax.tree_map_params(lambda p: jax.eval_shape(tx.init, p), lambda s, sh: s
                               if masked(s) else leaf_sharding(s, sh), abstract_opt_state,
                               param_shardings, transform_non_params=lambda _: replicated,
                               is_leaf=masked)


def _divisible(shape, spec, mesh: Mesh) -> bool:
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      continue
    size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
    if dim % size:
      return False
  return True


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """[batch, length] arrays: batch over whatever the `batch` rule names (data+fsdp by default)."""
  spec = nn.logical_to_mesh_axes(('batch', None), rules_tuple(rules))
  return NamedSharding(mesh, spec)


def host_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Each process passes its own rows; the result is one global array per feature."""
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }
