"""Train state, the train / eval steps, and the run's initial state (resume | init_from | fresh).

`make_train_step` returns a pure function `(state, batch) -> (state, metrics)`, jitted by
`jit_train_step` with in/out shardings derived from the logical rules and with the state donated
(`partitioning.jit`: the call enters mesh and rules itself). Gradients are accumulated over
`train.microbatches` slices of the batch; the loss is a sum over target tokens divided by the
number of target tokens of the whole batch, so k microbatches give the same update as one full
batch. The loss arithmetic is `t5lite.losses`.

`initial_state` decides where a run starts: the newest readable checkpoint of the run's own
workdir, else a fresh initialisation, with its params then taken from `init_from` if given
(fine-tuning: optimizer state and step stay fresh; the workdir's own checkpoints always win).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5lite import checkpoints, losses, partitioning


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
                         example_batch: dict[str, Any], seed: int):
  """(ShapeDtypeStructs carrying this mesh's shardings, shardings) of the train state.

  Traced with jax.eval_shape, so nothing is allocated: the shardings for `init_train_state`, and
  restore targets that put every checkpointed array straight into this mesh's layout.
  `example_batch` only lends shapes (arrays or ShapeDtypeStructs); `seed` changes no shape.
  """
  del seed
  params, param_shardings = partitioning.abstract_params(model, mesh, rules,
                                                         losses.model_inputs(example_batch))
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), params)
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = partitioning.optimizer_state_shardings(tx, opt_state, param_shardings, mesh)
  shardings = TrainState(step=NamedSharding(mesh, P()), params=param_shardings,
                         opt_state=opt_shardings)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                          shardings)
  return abstract, shardings


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
                     example_batch: dict[str, Any], seed: int, shardings: TrainState | None = None):
  """Initialises parameters and optimizer state directly in their shardings (computed here
  unless the caller already has them from `abstract_train_state`). Returns (state, shardings).
  """
  if shardings is None:
    _, shardings = abstract_train_state(model, tx, mesh, rules, example_batch, seed)
  inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in losses.model_inputs(example_batch).items()}
  init_params = partitioning.jit(lambda key: nn.meta.unbox(model.init(key, **inputs))['params'],
                                 mesh, rules, out_shardings=shardings.params)
  params = init_params(jax.random.PRNGKey(seed))
  # jit(tx.init) alone would not carry the parameter shardings over: give out_shardings.
  opt_state = partitioning.jit(tx.init, mesh, rules, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state), shardings


@dataclasses.dataclass
class InitialState:
  """Where a run starts. `step`: the step of `state` (0 unless resumed); `data_state`: this
  process's data-iterator state to `set_state` (None unless resumed); `source`: one line for
  the log saying which of resume / init_from / fresh it was."""
  state: TrainState
  shardings: TrainState
  step: int
  data_state: Any
  source: str


def initial_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
                  example_batch: dict[str, Any], seed: int, checkpointer, config_dict: dict,
                  init_from: str = '', init_rename=(), init_ignore=()) -> InitialState:
  """The newest readable checkpoint of `checkpointer` (a checkpoints.Checkpointer, or None for
  none), else a fresh initialisation from `seed` whose params come from `init_from` when given.

  init_from is read only when nothing was resumed: once a fine-tune has saved, resuming takes
  precedence. `config_dict` is checked against the checkpoint's config (restore_latest).
  """
  abstract, shardings = abstract_train_state(model, tx, mesh, rules, example_batch, seed)
  restored = checkpointer.restore_latest(abstract, config_dict) if checkpointer else None
  if restored is not None:
    return InitialState(
        restored.state, shardings, restored.step, restored.data_state,
        f'resumed from the checkpoint of step {restored.step} in '
        f'{checkpointer.directory}')
  state, _ = init_train_state(model, tx, mesh, rules, example_batch, seed, shardings)
  if not init_from:
    return InitialState(state, shardings, 0, None, 'fresh initialisation')
  source = checkpoints.resolve_init_path(init_from)
  loaded = checkpoints.load_params_for_init(source, abstract.params, init_rename, init_ignore)
  state = state.replace(params=checkpoints.merge_init_params(state.params, loaded))
  fresh = sum(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(loaded))
  return InitialState(
      state, shardings, 0, None,
      f'initialised params from {source} ({fresh} kept fresh by init_ignore); '
      'optimizer state and step start fresh')


def _split_microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...] taking every k-th row, so each microbatch stays spread over all
  data-parallel devices (rows i, i+k, ... rather than a contiguous block held by few devices)."""

  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    train_cfg, dropout: bool) -> Callable:
  """The pure train step (unjitted): (state, batch) -> (state, metrics). Reads only
  train_cfg.microbatches, z_loss, label_smoothing and seed."""
  k = int(train_cfg.microbatches)
  z_loss, smoothing = float(train_cfg.z_loss), float(train_cfg.label_smoothing)
  dropout_key = jax.random.PRNGKey(int(train_cfg.seed) + 1)

  def loss_fn(params, batch, rng):
    logits = model.apply({'params': params}, **losses.model_inputs(batch),
                         deterministic=not dropout, rngs={'dropout': rng})
    sums = losses.cross_entropy_sums(logits, batch['decoder_target_tokens'],
                                     batch['decoder_loss_weights'], z_loss, smoothing)
    return sums['loss_sum'] + sums['z_loss_sum'], sums

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(dropout_key, state.step)
    if k == 1:
      grads, sums = grad_fn(state.params, batch, rng)
    else:
      micro = _split_microbatches(batch, k)

      def accumulate(carry, xs):
        i, mb = xs
        mb = {key: nn.with_logical_constraint(v, ('batch', None)) for key, v in mb.items()}
        g, s = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, s)), None

      zeros = jax.tree.map(jnp.zeros_like, (state.params, {
          'loss_sum': 0.0, 'z_loss_sum': 0.0, 'correct_sum': 0.0, 'weight_sum': 0.0
      }))
      zeros = jax.tree.map(lambda z: z.astype(jnp.float32), zeros)
      (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
    denominator = jnp.maximum(sums['weight_sum'], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': sums['loss_sum'] / denominator,
        'z_loss': sums['z_loss_sum'] / denominator,
        'accuracy': sums['correct_sum'] / denominator,
        'target_tokens': sums['weight_sum'],
        'grad_norm': optax.tree.norm(grads),
        'learning_rate': jnp.asarray(schedule(state.step), jnp.float32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module, param_shardings, mesh: Mesh,
                   rules) -> partitioning.Partitioned:
  """jitted (params, batch) -> summed loss / correct / weight over the batch's target tokens, with
  the params in their training shardings; dropout off, no z-loss or label smoothing (so the
  validation loss is the plain cross-entropy per target token, comparable across configs)."""

  def eval_step(params, batch):
    logits = model.apply({'params': params}, **losses.model_inputs(batch), deterministic=True)
    return losses.cross_entropy_sums(logits, batch['decoder_target_tokens'],
                                     batch['decoder_loss_weights'])

  return partitioning.jit(eval_step, mesh, rules,
                          in_shardings=(param_shardings, partitioning.batch_sharding(mesh, rules)),
                          out_shardings=NamedSharding(mesh, P()))


def jit_train_step(train_step: Callable, state_shardings: TrainState, mesh: Mesh,
                   rules) -> partitioning.Partitioned:
  """The train step jitted with shardings (this is pjit), entering mesh and rules on each call;
  the input state is donated. `.lower(state, batch)` compiles ahead of time."""
  return partitioning.jit(train_step, mesh, rules,
                          in_shardings=(state_shardings, partitioning.batch_sharding(mesh, rules)),
                          out_shardings=(state_shardings, NamedSharding(mesh,
                                                                        P())), donate_argnums=(0,))


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf is free of inf and nan."""
  leaves = [
      jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
