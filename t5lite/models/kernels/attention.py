"""The attention core, softmax(q k^T + bias, masked) v, with a hand-written backward pass.

Autodiff of `softmax(s) @ v` reduces dP * P over every key of every query in its backward pass:
one more full pass over the [batch, heads, q, k] scores. This core uses FlashAttention's identity
instead (Dao et al. 2022, "FlashAttention", Appendix B.2): the row sum of dP * P equals
rowsum(dO * O), a reduction over [batch, q, heads, d], k / d times smaller. The forward pass is
the plain one; it saves the weights in the compute dtype and the output in float32 (for an
unrounded rowsum(dO * O)).

The relative position bias ([1, heads, q, k], shared by the batch) gets its gradient summed over
the batch inside the backward pass, rather than autodiff summing a [batch, heads, q, k] gradient
over every layer that shares it. The mask is boolean and has no gradient.

When the scores are large, the backward pass runs a few examples at a time (a loop over batch
chunks of at most `CHUNK_BYTES` of float32 scores), so that one chunk's scores stay in the CPU's
caches between the dot that writes them and the passes that read them. T5.1.1-small's encoder
attention (8 x 6 heads x 512 x 512) on this project's 2-core VM, forward + backward:
139-149 -> 96-100 ms per layer against the plain formulation (docs/performance.md has the whole
step). A chunk takes every n-th example (a strided split), so a batch sharded over devices stays
sharded the same way in every chunk; the loop slices its inputs and writes its gradients in place,
with no transposing copies (T5.1.1-small bf16 step, interleaved A/B: 2.94 -> 2.52 s against
stacking a scan's outputs). (Chunking the forward pass too measured no faster.)

In bfloat16 every dot takes bfloat16 operands and accumulates in float32 (the operand orders of
`matmul.ATTENTION_*`, which XLA:CPU's bf16 kernels take); scores, softmax and sums are float32.

With `kernels='xla'` (t5lite/models/kernels/__init__.py, what 'auto' is on TPU and GPU)
`dot_product_attention` is `jax.nn.dot_product_attention` (`xla_attention`), differentiated by
autodiff: the same forward numbers (its logits are bf16 x bf16 -> f32 dots, its softmax float32,
its weights rounded to the operands' dtype), in the formulation its maintainers keep fused for
each backend. It has no dropout, so with attention dropout 'xla' is `reference_attention` on
plain einsums instead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from t5lite.models import kernels as kernels_lib
from t5lite.models.kernels import matmul

_F32 = jnp.float32
# Added to masked scores: finite, so that a fully masked (padding) row stays NaN-free.
MASK_BIAS = -1e10
# Upper bound on one chunk's float32 scores (bytes): a few MiB fit the caches of the CPUs this
# was measured on (1 MiB L2 per core, 32 MiB L3). Also the knob tests turn down to force chunking.
CHUNK_BYTES = 8 * 2**20


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
                          mask: jax.Array | None, dtype, dropout_keep: jax.Array | None = None,
                          kernels: str = 'auto') -> jax.Array:
  """softmax over keys of (q k^T + bias, -inf where not mask) times v.

  q [b, q, h, d]; k, v [b, k, h, d]; bias (float, differentiable) broadcastable to [b, h, q, k]
  with batch 1 or b; mask (bool) broadcastable to [b, h, q, k]; `dropout_keep` [b, h, q, k]
  multiplies the weights (0 where dropped, 1 / keep_rate elsewhere). Returns [b, q, h, d] in
  `dtype`. `kernels` selects this module's custom VJP ('tuned') or the plain formulations
  ('xla': `xla_attention`, or `reference_attention` with dropout); 'auto' is resolved by
  `kernels.plain` (normally `t5.make_model` has resolved it for the target platform).
  """
  if kernels_lib.plain(kernels):
    if dropout_keep is None:
      return xla_attention(q, k, v, bias, mask, dtype)
    return reference_attention(q, k, v, bias, mask, dtype, dropout_keep, kernels)
  dtype = jnp.dtype(dtype)
  if dtype != _F32 and not matmul.mixed_precision_supported():
    return reference_attention(q, k, v, bias, mask, dtype, dropout_keep)
  batch, q_len, heads, _ = q.shape
  bias = jnp.zeros((1, 1, 1, 1), _F32) if bias is None else bias.astype(_F32)
  mask = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask
  keep = jnp.ones((1, 1, 1, 1), dtype) if dropout_keep is None else dropout_keep.astype(dtype)
  chunks = num_chunks(batch, heads, q_len, k.shape[1])
  return _attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), bias, mask, keep, chunks)


def xla_attention(q, k, v, bias, mask, dtype):
  """`jax.nn.dot_product_attention` with T5's conventions: no 1 / sqrt(head_dim) scaling (T5
  folds it into the query initialisation), the float32 relative-position bias added to the
  float32 logits, the boolean mask. Autodiff differentiates it.

  A fully masked (padding) query row stays finite, as with MASK_BIAS: the function replaces
  masked logits (jnp.where) by -0.7 * float32 max rather than adding -inf, so such a row's
  logits are all equal and its softmax is uniform, as `_forward`'s is (tests/test_attention.py
  checks the values and gradients of such rows against the tuned path).

  `implementation='xla'`: the formulation checked against the tuned one here. (Left to choose,
  jax may pick cuDNN's fused kernel on GPUs in future; that one takes the bias in the operands'
  dtype and is untested here.)"""
  dtype = jnp.dtype(dtype)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  bias = None if bias is None else bias.astype(_F32)
  out = jax.nn.dot_product_attention(q, k, v, bias, mask, scale=1.0, implementation='xla')
  return out.astype(dtype)


def reference_attention(q, k, v, bias, mask, dtype, dropout_keep=None, kernels: str = 'auto'):
  """The plain formulation on einsums (autodiff backward of the softmax): the tests' reference,
  the path for CPUs without bfloat16 dots, and with `kernels='xla'` (its einsums plain too) the
  'xla' path when attention has dropout (which `xla_attention` lacks)."""
  logits = matmul.einsum(matmul.ATTENTION_LOGITS, q, k, dtype, _F32, kernels)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, MASK_BIAS)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  if dropout_keep is not None:
    weights = weights * dropout_keep.astype(dtype)
  return matmul.einsum(matmul.ATTENTION_OUTPUT, weights, v, dtype, kernels=kernels)


def num_chunks(batch: int, heads: int, q_len: int, k_len: int) -> int:
  """The fewest chunks (a divisor of batch) whose float32 scores fit CHUNK_BYTES each."""
  per_example = heads * q_len * k_len * 4
  for chunks in range(1, batch + 1):
    if batch % chunks == 0 and (batch // chunks) * per_example <= CHUNK_BYTES:
      return chunks
  return batch


# --- one chunk ---------------------------------------------------------------------------------


def _forward(q, k, v, bias, mask, keep):
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=_F32) + bias
  weights = jax.nn.softmax(jnp.where(mask, scores, MASK_BIAS), axis=-1).astype(q.dtype)
  out = jnp.einsum('bhqk,bkhd->bqhd', weights * keep, v, preferred_element_type=_F32)
  return out, weights


def _backward(q, k, v, mask, keep, weights, out, d_out):
  """Gradients of q, k, v and the scores (float32) of one chunk."""
  # rowsum(dP * P) = rowsum(dO * O) (FlashAttention): a reduction over d, not over the keys.
  delta = jnp.transpose(jnp.sum(d_out.astype(_F32) * out, axis=-1), (0, 2, 1))[..., None]
  # Operand orders as in matmul.ATTENTION_*'s backward specs (XLA:CPU's bf16 kernels take these).
  d_v = jnp.einsum('bhqk,bqhd->bkhd', weights * keep, d_out, preferred_element_type=_F32)
  d_weights = jnp.einsum('bqhd,bkhd->bhqk', d_out, v, preferred_element_type=_F32)
  # Masked scores are a constant, not a function of q and k. (Only a fully masked row needs
  # this: elsewhere their weights are exactly 0.)
  d_scores = jnp.where(mask, weights.astype(_F32) * (d_weights * keep - delta), 0.0)
  d_scores_low = d_scores.astype(q.dtype)
  d_q = jnp.einsum('bhqk,bkhd->bqhd', d_scores_low, k, preferred_element_type=_F32)
  d_k = jnp.einsum('bhqk,bqhd->bkhd', d_scores_low, q, preferred_element_type=_F32)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_scores


# --- chunking over the batch -------------------------------------------------------------------


def _chunk_view(x, chunks):
  """[b, ...] -> [b / chunks, chunks, ...], a free reshape: chunk j is [:, j], the examples
  j, j + chunks, ... (so a batch sharded over devices stays sharded the same way in every chunk)."""
  return _bits(x.reshape((x.shape[0] // chunks, chunks) + x.shape[1:]))


def _bits(x):
  """bfloat16 viewed as uint16. XLA:CPU widens a bfloat16 array that a loop slices to float32,
  whole, before the loop (a converting copy of every saved weight, 84 ms per T5.1.1-small
  step); integers it leaves alone."""
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _from_bits(x, dtype):
  """Undoes _bits."""
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _run_backward(q, k, v, bias, mask, keep, weights, out, d_out, chunks):
  if chunks == 1:
    d_q, d_k, d_v, d_scores = _backward(q, k, v, mask, keep, weights, out, d_out)
    return d_q, d_k, d_v, _sum_to(d_scores, bias.shape)
  bias_batched = bias.shape[0] != 1
  inputs = (q, k, v, mask, keep, weights, out, d_out)
  batched = [i for i, a in enumerate(inputs) if a.shape[0] != 1]  # the rest is broadcast
  views = [_chunk_view(inputs[i], chunks) for i in batched]
  # Gradients are written chunk by chunk into buffers of the same view, so that neither the
  # inputs nor the results are ever transposed (as stacking a scan's outputs would).
  results = [q, k, v] + ([bias] if bias_batched else [])
  buffers = [_chunk_view(jnp.zeros(a.shape, a.dtype), chunks) for a in results]

  def body(j, carry):
    d_bias_sum, buffers = carry
    slices = [jax.lax.dynamic_index_in_dim(x, j, 1, keepdims=False) for x in views]
    # The barrier keeps XLA from hoisting conversions of whole inputs out of the loop (done on
    # all chunks at once, in memory: the traffic the loop avoids).
    slices = jax.lax.optimization_barrier(slices)
    chunk = list(inputs)
    for i, s in zip(batched, slices):
      chunk[i] = _from_bits(s, inputs[i].dtype)
    d_q, d_k, d_v, d_scores = _backward(*chunk)
    grads = [d_q, d_k, d_v]
    if bias_batched:
      grads.append(_sum_to(d_scores, (d_scores.shape[0],) + bias.shape[1:]))
    else:
      d_bias_sum = d_bias_sum + _sum_to(d_scores, bias.shape)
    buffers = [
        jax.lax.dynamic_update_index_in_dim(b, _bits(g), j, 1) for b, g in zip(buffers, grads)
    ]
    return d_bias_sum, buffers

  d_bias, buffers = jax.lax.fori_loop(0, chunks, body, (jnp.zeros(bias.shape, _F32), buffers))
  grads = [_from_bits(b, a.dtype).reshape(a.shape) for b, a in zip(buffers, results)]
  return grads[0], grads[1], grads[2], (grads[3] if bias_batched else d_bias)


def _sum_to(grad, shape):
  """Sums a [b, h, q, k] gradient over the axes `shape` broadcasts (size 1 there).

  The batch axis is folded in halves first (x[:b/2] + x[b/2:], one elementwise pass): XLA:CPU's
  reduce kernel over a leading axis is pathologically slow (8 layers of [8, 6, 114, 114], the
  decoder's relative-position bias gradients: 25 ms as a reduce, 0.5 ms folded)."""
  if shape[0] == 1:
    while grad.shape[0] > 1 and grad.shape[0] % 2 == 0:
      half = grad.shape[0] // 2
      grad = grad[:half] + grad[half:]
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
  return jnp.sum(grad, axis=axes, keepdims=True)


# --- the custom VJP ----------------------------------------------------------------------------


def _attention_impl(q, k, v, bias, mask, keep, chunks):
  return _forward(q, k, v, bias, mask, keep)[0].astype(q.dtype)


_attention = jax.custom_vjp(_attention_impl, nondiff_argnums=(6,))


def _attention_fwd(q, k, v, bias, mask, keep, chunks):
  out, weights = _forward(q, k, v, bias, mask, keep)
  return out.astype(q.dtype), (q, k, v, bias, mask, keep, weights, out)


def _attention_bwd(chunks, residuals, d_out):
  q, k, v, bias, mask, keep, weights, out = residuals
  d_q, d_k, d_v, d_bias = _run_backward(q, k, v, bias, mask, keep, weights, out, d_out, chunks)
  d_mask = np.zeros(mask.shape, jax.dtypes.float0)  # boolean: no gradient
  return d_q, d_k, d_v, d_bias.astype(bias.dtype), d_mask, jnp.zeros_like(keep)


_attention.defvjp(_attention_fwd, _attention_bwd)
