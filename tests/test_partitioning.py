"""partitioning: the jit that enters mesh and rules itself, and abstract params that allocate
nothing yet match what initialisation really makes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import t5lite.data.catalog  # noqa: F401  (registers the tasks small_config names)
from t5lite import config as config_lib
from t5lite import optim, partitioning, trainer
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model
from t5lite.partitioning import DEFAULT_RULES

from test_training import small_config, synthetic_batches


def _rows_doubled(x):
  # The constraint resolves only against the rules in scope while tracing.
  return nn.with_logical_constraint(x * 2, ('batch', None))


def test_jit_enters_mesh_and_rules_itself():
  mesh = partitioning.make_mesh((4, 2, 1), jax.devices()[:8])
  x = jnp.arange(32.0).reshape(8, 4)  # on one device; the caller enters nothing
  want = partitioning.batch_sharding(mesh, DEFAULT_RULES)
  assert want.spec == P(('data', 'fsdp'), None)

  jitted = partitioning.jit(_rows_doubled, mesh, DEFAULT_RULES)
  y = jitted(x)
  assert y.sharding.is_equivalent_to(want, 2)
  np.testing.assert_array_equal(y, 2 * np.arange(32.0).reshape(8, 4))
  # Nothing leaks out of the call: the rules are in scope only around it.
  assert not nn.get_logical_axis_rules()
  # Ahead of time, from shapes only, under the same scope.
  compiled = jitted.lower(jax.ShapeDtypeStruct((8, 4), jnp.float32)).compile()
  assert compiled.output_shardings.is_equivalent_to(want, 2)
  # A plain jit of the same function, without the rules in scope, leaves the rows unsplit.
  assert len(jax.jit(_rows_doubled)(x).sharding.device_set) == 1


def test_jit_passes_shardings_and_donation():
  mesh = partitioning.make_mesh((8, 1, 1), jax.devices()[:8])
  batch = partitioning.batch_sharding(mesh, DEFAULT_RULES)
  replicated = jax.sharding.NamedSharding(mesh, P())
  jitted = partitioning.jit(lambda x: (x + 1, x.sum()), mesh, DEFAULT_RULES, in_shardings=(batch,),
                            out_shardings=(batch, replicated), donate_argnums=(0,))
  x = jax.device_put(jnp.zeros((8, 2)), batch)
  y, total = jitted(x)
  assert y.sharding.is_equivalent_to(batch, 2) and total.sharding.is_fully_replicated
  assert x.is_deleted()  # donated
  assert float(total) == 0.0 and isinstance(jitted.jitted, type(jax.jit(lambda v: v)))


def _setup(mesh_shape):
  config = small_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  shape = config_lib.validate(config, 8)
  mesh = partitioning.make_mesh(shape, jax.devices()[:8])
  model = make_model(ModelConfig.from_config(config.model))
  tx, _ = optim.make_optimizer(config)
  return config, mesh, model, tx, next(synthetic_batches(1, config.train.batch_size))


def test_abstract_params_allocate_nothing_and_match_init():
  config, mesh, model, tx, example = _setup((2, 2, 2))
  rules = config.partitioning.rules
  before = len(jax.live_arrays())
  # No host-to-device transfer at all: not even a PRNG key is made outside the trace.
  with jax.transfer_guard('disallow'):
    abstract, shardings = partitioning.abstract_params(model, mesh, rules)
    from_batch, _ = partitioning.abstract_params(
        model, mesh, rules, {k: v for k, v in example.items() if k != 'decoder_loss_weights'})
    abstract_state, _ = trainer.abstract_train_state(model, tx, mesh, rules, example, 0)
  assert len(jax.live_arrays()) == before
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))

  state, state_shardings = trainer.init_train_state(model, tx, mesh, rules, example, 0)
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))  # really split
  for a, b, real, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(from_batch),
                                  jax.tree.leaves(state.params),
                                  jax.tree.leaves(state_shardings.params)):
    assert a.shape == b.shape == real.shape and a.dtype == b.dtype == real.dtype
    assert a.sharding == b.sharding == sharding
    assert real.sharding.is_equivalent_to(a.sharding, real.ndim)
  assert jax.tree.structure(abstract) == jax.tree.structure(state.params)
  for a, real in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(state)):
    assert a.shape == real.shape and a.dtype == real.dtype
    assert real.sharding.is_equivalent_to(a.sharding, real.ndim)
