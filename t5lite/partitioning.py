"""Mesh (data, fsdp, tensor), logical-axis rules -> shardings, host-local -> global arrays.

The single place where logical axis names meet mesh axes. Parameter shardings come from the
logical names that `nn.with_logical_partitioning` attaches to every parameter; optimizer-state
shardings follow the parameter they belong to; batches are split over data+fsdp.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
import flax.linen as nn
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5lite.config import MESH_AXES

Rules = Sequence[tuple[str, Any]]


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A GSPMD-style (Auto axis types) mesh over `devices` (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  if jax.process_count() > 1 or devices[0].platform != 'cpu':
    # Orders devices so that the inner axes stay within a host / ICI ring.
    grid = mesh_utils.create_device_mesh(tuple(shape), devices=devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def rules_tuple(rules: Rules) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_shardings(boxed_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree whose leaves carry logical names (flax LogicallyPartitioned)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def optimizer_state_shardings(tx: optax.GradientTransformation, abstract_opt_state,
                              param_shardings, mesh: Mesh):
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

  return optax.tree_map_params(tx, leaf_sharding, abstract_opt_state, param_shardings,
                               transform_non_params=lambda _: replicated)


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
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
