"""Per-token log-likelihoods and cross-entropy sums: one arithmetic for training, eval and scoring.

Everything is computed from float32 logits as logsumexp - target logit, with the logsumexp written
out by hand (`log_softmax_parts`) so that training (`cross_entropy_sums`) and scoring
(`token_log_likelihoods`) run the very same operations. A leaf module: jax only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Batch features that are not model inputs (what the loss reads besides the logits).
_LOSS_ONLY = ('decoder_loss_weights',)


def model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The features of a converter batch that `model.apply` takes (all but the loss weights)."""
  return {k: v for k, v in batch.items() if k not in _LOSS_ONLY}


def log_softmax_parts(logits: jax.Array, targets: jax.Array):
  """(max logit [..., 1], log Z [...], target logit [...], max other logit [...]) of float32
  logits [..., V].

  log p(target) = target logit - log Z. The max over the classes other than the target gives the
  accuracy: a token is right when its target is the unique largest logit (a tie is wrong, so a
  dead model whose logits all tie scores 0, not 1). It is computed in the pass that the logsumexp
  needs for its max anyway (the overall max is max(target, max other)): a separate argmax pass over
  [batch, length, vocab] cost ~4% of a T5.1.1-small step (docs/performance.md). The max carries no
  gradient (it cancels out of log Z), as in jax.nn.logsumexp.
  """
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
  max_other = jax.lax.stop_gradient(jnp.max(jnp.where(is_target, -jnp.inf, logits), axis=-1))
  max_logit = jnp.maximum(max_other, jax.lax.stop_gradient(target_logit))[..., None]
  log_z = max_logit[..., 0] + jnp.log(jnp.sum(jnp.exp(logits - max_logit), axis=-1))
  return max_logit, log_z, target_logit, max_other


def token_log_likelihoods(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """[...] float32: log p(target) at every position times its weight (0 where the weight is 0).

  where(), not a product: a padding row of a fully masked sequence may hold NaN/inf logits, and
  0 * NaN would leak them into any sum over the row.
  """
  _, log_z, target_logit, _ = log_softmax_parts(logits.astype(jnp.float32), targets)
  log_p = target_logit - log_z
  return jnp.where(weights > 0, log_p * weights.astype(jnp.float32), 0.0)


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
  _, log_z, target_logit, max_other = log_softmax_parts(logits, targets)
  if label_smoothing > 0:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    normaliser = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    cross_entropy = (log_z -
                     (confidence - low) * target_logit - low * jnp.sum(logits, -1) - normaliser)
  else:
    cross_entropy = log_z - target_logit
  weights = weights.astype(jnp.float32)
  # Right only when the target is the unique maximum: a tie (e.g. all logits equal) is wrong.
  correct = (target_logit > max_other).astype(jnp.float32)
  return {
      'loss_sum': jnp.sum(cross_entropy * weights),
      'z_loss_sum': jnp.sum(z_loss * jnp.square(log_z) * weights),
      'correct_sum': jnp.sum(correct * weights),
      'weight_sum': jnp.sum(weights),
  }


def kl_divergence_sum(teacher_logits: jax.Array, student_logits: jax.Array, weights: jax.Array,
                      temperature: float = 1.0) -> jax.Array:
  """sum over positions of weight * KL(teacher || student), both softmaxes at `temperature`.

  Knowledge distillation's soft-target term (Hinton et al. 2015; word-level KD of Kim & Rush
  2016): KL = sum_v p_t(v) (log p_t(v) - log p_s(v)) with p = softmax(logits / T), in float32.
  Its gradient w.r.t. the student logits is (p_s - p_t) / T, so callers multiply by T^2 to keep
  the gradient scale independent of T. where(), not a product, as in token_log_likelihoods: a
  padding row may hold non-finite logits.
  """
  t = teacher_logits.astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return jnp.sum(jnp.where(weights > 0, kl * weights.astype(jnp.float32), 0.0))
