"""Train state, loss, and the jit-sharded train / eval steps.

`make_train_step` returns a pure function `(state, batch) -> (state, metrics)`, jitted with
in/out shardings derived from the logical rules and with the state donated. Gradients are
accumulated over `train.microbatches` slices of the batch; the loss is a sum over target tokens
divided by the number of target tokens of the whole batch, so k microbatches give the same
update as one full batch.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5lite import partitioning


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       z_loss: float = 0.0, label_smoothing: float = 0.0) -> dict[str, jax.Array]:
  """Weighted sums of cross-entropy, z-loss and correct predictions over the target tokens.

  Label smoothing puts 1 - s on the target and s / (V - 1) on every other class; the constant
  entropy of that distribution is subtracted so a perfect prediction scores 0 (as in T5X).
  z-loss adds z * log(Z)^2 per token to keep the softmax normaliser near 1 (PaLM, Chowdhery et al.
  2022). Computed without materialising one-hot targets.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  # logsumexp by hand so that its max also gives the accuracy: a token is right when its logit is
  # the largest. A separate argmax pass over [batch, length, vocab] cost ~4% of a T5.1.1-small
  # step (docs/performance.md). Unlike argmax, an exact tie with the target counts as right; float
  # logits tie only in degenerate cases (e.g. all zero).
  max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  log_z = max_logit[..., 0] + jnp.log(jnp.sum(jnp.exp(logits - max_logit), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  if label_smoothing > 0:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    normaliser = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    cross_entropy = (log_z - (confidence - low) * target_logit - low * jnp.sum(logits, -1)
                     - normaliser)
  else:
    cross_entropy = log_z - target_logit
  weights = weights.astype(jnp.float32)
  correct = (target_logit >= max_logit[..., 0]).astype(jnp.float32)
  return {
      'loss_sum': jnp.sum(cross_entropy * weights),
      'z_loss_sum': jnp.sum(z_loss * jnp.square(log_z) * weights),
      'correct_sum': jnp.sum(correct * weights),
      'weight_sum': jnp.sum(weights),
  }


def _model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: v for k, v in batch.items() if k != 'decoder_loss_weights'}


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
                         example_batch: dict[str, Any], seed: int):
  """(ShapeDtypeStructs carrying this mesh's shardings, shardings) of the train state.

  Traced with jax.eval_shape, so nothing is allocated: the shardings for `init_train_state`, and
  restore targets that put every checkpointed array straight into this mesh's layout.
  `example_batch` only lends shapes (arrays or ShapeDtypeStructs).
  """
  inputs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in _model_inputs(example_batch).items()}
  with activate(mesh, rules):
    boxed = jax.eval_shape(lambda key, x: model.init(key, **x), jax.random.PRNGKey(seed), inputs)
    param_shardings = partitioning.logical_shardings(boxed['params'], mesh, rules)
  params = nn.meta.unbox(boxed)['params']
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = partitioning.optimizer_state_shardings(tx, opt_state, param_shardings, mesh)
  shardings = TrainState(step=NamedSharding(mesh, P()), params=param_shardings,
                         opt_state=opt_shardings)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=opt_state)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
                     example_batch: dict[str, Any], seed: int, shardings: TrainState | None = None):
  """Initialises parameters and optimizer state directly in their shardings (computed here
  unless the caller already has them from `abstract_train_state`). Returns (state, shardings).
  """
  if shardings is None:
    _, shardings = abstract_train_state(model, tx, mesh, rules, example_batch, seed)
  inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in _model_inputs(example_batch).items()}
  with activate(mesh, rules):
    params = jax.jit(lambda key: nn.meta.unbox(model.init(key, **inputs))['params'],
                     out_shardings=shardings.params)(jax.random.PRNGKey(seed))
    # jit(tx.init) alone would not carry the parameter shardings over: give out_shardings.
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state), shardings


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """Mesh and logical rules in scope, so the model's activation constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.rules_tuple(rules)):
    yield


def _split_microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...] taking every k-th row, so each microbatch stays spread over all
  data-parallel devices (rows i, i+k, ... rather than a contiguous block held by few devices)."""
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, train_cfg, dropout: bool) -> Callable:
  """The pure train step (unjitted): (state, batch) -> (state, metrics)."""
  k = int(train_cfg.microbatches)
  z_loss, smoothing = float(train_cfg.z_loss), float(train_cfg.label_smoothing)
  dropout_key = jax.random.PRNGKey(int(train_cfg.seed) + 1)

  def loss_fn(params, batch, rng):
    logits = model.apply({'params': params}, **_model_inputs(batch), deterministic=not dropout,
                         rngs={'dropout': rng})
    sums = cross_entropy_sums(logits, batch['decoder_target_tokens'],
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
          'loss_sum': 0.0, 'z_loss_sum': 0.0, 'correct_sum': 0.0, 'weight_sum': 0.0}))
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


def make_eval_step(model: nn.Module, param_shardings, mesh: Mesh, rules) -> Callable:
  """jitted (params, batch) -> summed loss / correct / weight over the batch's target tokens, with
  the params in their training shardings; dropout off, no z-loss or label smoothing (so the
  validation loss is the plain cross-entropy per target token, comparable across configs)."""
  def eval_step(params, batch):
    logits = model.apply({'params': params}, **_model_inputs(batch), deterministic=True)
    return cross_entropy_sums(logits, batch['decoder_target_tokens'],
                              batch['decoder_loss_weights'])

  jitted = jax.jit(eval_step, in_shardings=(param_shardings, partitioning.batch_sharding(mesh, rules)),
                   out_shardings=NamedSharding(mesh, P()))

  def call(params, batch):
    with activate(mesh, rules):
      return jitted(params, batch)
  return call


def jit_train_step(train_step: Callable, state_shardings: TrainState, mesh: Mesh, rules):
  """jax.jit with shardings (this is pjit); the input state is donated."""
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())),
                   donate_argnums=(0,))

  def call(state, batch):
    with activate(mesh, rules):
      return jitted(state, batch)
  call.jitted = jitted
  return call
