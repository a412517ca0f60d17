"""Weight matmuls in a low-precision compute dtype with float32 accumulation, forward and backward.

`dense(x, kernel, dtype)` is `x[..., d] @ kernel[d, f]` (or `kernel[f, d]` transposed, for tied
logits). Its three matmuls (output, input gradient, kernel gradient) go through a custom VJP
whose backward layouts are chosen (below), in float32 as in bfloat16. In bfloat16 all three take
bfloat16 operands and accumulate in float32 (the usual mixed-precision recipe, as torch.autocast
and TPU MXUs do), because:

- `jnp.einsum` on bfloat16 operands returns bfloat16; on XLA:CPU such a dot is computed by
  converting to float32 (about 400 GFLOP/s on this project's 2-core AVX512-BF16 machine), while
  bfloat16 x bfloat16 -> float32 dots run on the native bf16 kernels (about 850 GFLOP/s);
- autodiff of a `preferred_element_type=float32` einsum would feed a float32 cotangent into the
  backward dots, making them float32 x bfloat16, i.e. float32 matmuls again;
- the kernel gradient is accumulated in float32 straight from the dot, never rounded to bfloat16
  (the parameters are float32), so it is no less accurate than autodiff's.

The backward dots use operand orders and layouts the CPU's fast kernels take (see the specs
below). `einsum` does the same for attention's activation x activation einsums. Measured with
benchmarks/train_throughput.py (docs/performance.md). On GPU and TPU the same formulation is what
the hardware does anyway.

Each function takes `kernels` (t5lite/models/kernels/__init__.py): 'tuned' (what 'auto' is on
CPU) is the above; 'xla' (what 'auto' is on TPU and GPU) is the same einsum, operands in `dtype`
and a float32 result (`plain_einsum`), differentiated by JAX's autodiff, with no probe.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from t5lite.models import kernels as kernels_lib

_F32 = jnp.float32

# Each einsum is (forward, (grad of a: equation, operands), (grad of b: equation, operands)),
# g = the cotangent. The backward operand orders are spelled out, not derived: XLA:CPU's
# bf16 x bf16 -> f32 kernels take some orders and not their mirror images (which fail with
# UNIMPLEMENTED), and some layouts run twice as fast as others.
# Weights, x [B, L, d]: `dense` folds x's leading dims into two, so the kernel gradient contracts
# over a [batch, length] pair (618 GFLOP/s here; as one flattened 2-D contraction, 332).
DENSE = ('bld,df->blf', ('blf,df->bld', 'gb'), ('bld,blf->df', 'ag'))
DENSE_TRANSPOSED = ('bld,fd->blf', ('blf,fd->bld', 'gb'), ('blf,bld->fd', 'ga'))  # kernel [f, d]
# Attention: scores from queries and keys, outputs from weights and values.
ATTENTION_LOGITS = ('bqhd,bkhd->bhqk', ('bhqk,bkhd->bqhd', 'gb'), ('bhqk,bqhd->bkhd', 'ga'))
ATTENTION_OUTPUT = ('bhqk,bkhd->bqhd', ('bqhd,bkhd->bhqk', 'gb'), ('bhqk,bqhd->bkhd', 'ag'))


def dense(x: jax.Array, kernel: jax.Array, dtype, transpose_kernel: bool = False, out_dtype=None,
          kernels: str = 'auto') -> jax.Array:
  """x[..., d] @ kernel[d, f] -> [..., f] computed in `dtype` (kernel[f, d] with
  `transpose_kernel`); the result in `out_dtype` (default `dtype`; float32 keeps the
  accumulator unrounded, as the output logits want)."""
  y = einsum(DENSE_TRANSPOSED if transpose_kernel else DENSE, _as_3d(x), kernel, dtype, out_dtype,
             kernels)
  return y.reshape(x.shape[:-1] + y.shape[-1:])


def _as_3d(x: jax.Array) -> jax.Array:
  """x[..., d] as [batch, length, d] (leading dims folded into two, for the DENSE specs)."""
  return x.reshape((-1,) + x.shape[-2:]) if x.ndim >= 3 else x.reshape((1, -1, x.shape[-1]))


# The gated MLPs' activations (HF T5Config's dense_act_fn of the `gated-X` forms; T5.1.1's GELU is
# the tanh approximation, HF's "gelu_new").
GATE_ACTIVATIONS = {
    'gelu': functools.partial(jax.nn.gelu, approximate=True),
    'silu': jax.nn.silu,
    'relu': jax.nn.relu,
}


def gated(x: jax.Array, w0: jax.Array, w1: jax.Array, dtype, activation: str = 'gelu',
          kernels: str = 'auto') -> jax.Array:
  """A gated MLP's hidden layer, act(x @ w0) * (x @ w1), x[..., d], w [d, f], `activation` a
  GATE_ACTIVATIONS key (gelu: T5.1.1; silu: UL2): both matmuls in `dtype` with float32
  accumulation, the gate applied to the float32 results, the result in `dtype`.

  One custom VJP for the pair: the forward pass saves both pre-activations rounded to `dtype`
  (as two `dense` calls would) but gates the unrounded ones, and the backward pass computes both
  pre-activation gradients in one elementwise pass. Against two `dense` calls and autodiff of the
  gate: T5.1.1-small bf16 step 2.38 -> 2.26 s (interleaved A/B in one process).

  'xla' gates the two float32 results of `plain_einsum`: the same forward numbers."""
  if activation not in GATE_ACTIVATIONS:
    raise ValueError(f'unknown gate activation {activation!r}; valid: '
                     f'{", ".join(GATE_ACTIVATIONS)}')
  dtype = jnp.dtype(dtype)
  if kernels_lib.plain(kernels):
    x3 = _as_3d(x)
    h = _gate(plain_einsum(DENSE, x3, w0, dtype, _F32), plain_einsum(DENSE, x3, w1, dtype, _F32),
              activation).astype(dtype)
    return h.reshape(x.shape[:-1] + h.shape[-1:])
  if dtype != _F32 and not mixed_precision_supported():
    return _gate(dense(x, w0, dtype), dense(x, w1, dtype), activation).astype(dtype)
  h = _gated(_as_3d(x), w0, w1, dtype.name, activation)
  return h.reshape(x.shape[:-1] + h.shape[-1:])


def gated_gelu(x: jax.Array, w0: jax.Array, w1: jax.Array, dtype,
               kernels: str = 'auto') -> jax.Array:
  """T5.1.1's gated GELU, gelu(x @ w0) * (x @ w1) (tanh approximation): `gated` with gelu."""
  return gated(x, w0, w1, dtype, 'gelu', kernels)


def _gate(a0, a1, activation):
  return GATE_ACTIVATIONS[activation](a0) * a1


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gated(x, w0, w1, dtype_name, activation):
  return _gated_fwd(x, w0, w1, dtype_name, activation)[0]


def _gated_fwd(x, w0, w1, dtype_name, activation):
  xc, w0c, w1c = (a.astype(dtype_name) for a in (x, w0, w1))
  a0 = jnp.einsum(DENSE[0], xc, w0c, preferred_element_type=_F32)
  a1 = jnp.einsum(DENSE[0], xc, w1c, preferred_element_type=_F32)
  h = _gate(a0, a1, activation).astype(dtype_name)
  saved = (xc, w0c, w1c, a0.astype(dtype_name), a1.astype(dtype_name))
  return h, (saved, jnp.zeros((), x.dtype))


def _gated_bwd(dtype_name, activation, residuals, d_h):
  (xc, w0c, w1c, a0, a1), x_like = residuals
  _, gate_pullback = jax.vjp(lambda u, v: _gate(u, v, activation), a0.astype(_F32), a1.astype(_F32))
  d_a0, d_a1 = (g.astype(dtype_name) for g in gate_pullback(d_h.astype(_F32)))
  (d_x_spec, _), (d_w_spec, _) = DENSE[1], DENSE[2]  # operand orders 'gb' and 'ag'
  d_x = (jnp.einsum(d_x_spec, d_a0, w0c, preferred_element_type=_F32)
         + jnp.einsum(d_x_spec, d_a1, w1c, preferred_element_type=_F32))
  d_w0 = jnp.einsum(d_w_spec, xc, d_a0, preferred_element_type=_F32)
  d_w1 = jnp.einsum(d_w_spec, xc, d_a1, preferred_element_type=_F32)
  return d_x.astype(x_like.dtype), d_w0, d_w1


_gated.defvjp(_gated_fwd, _gated_bwd)


def einsum(spec, a: jax.Array, b: jax.Array, dtype, out_dtype=None,
           kernels: str = 'auto') -> jax.Array:
  """The einsum `spec[0]` of a and b in `dtype`: its forward and both backward einsums take
  `dtype` operands and accumulate in float32, and the gradients come back in a's and b's own
  dtypes. The result in `out_dtype` (default `dtype`).

  Float32 goes through the same custom VJP for its backward layouts: autodiff's own backward of
  these einsums made XLA:CPU write transposed float32 gradients (e.g. the gated-GELU gradient as
  [d_ff, tokens], 71 ms per T5.1.1-small encoder layer); T5.1.1-small float32 step 7.29 -> 5.50 s
  (interleaved A/B in one process). 'xla': `plain_einsum`."""
  if kernels_lib.plain(kernels):
    return plain_einsum(spec, a, b, dtype, out_dtype)
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if dtype != _F32 and not mixed_precision_supported():
    return jnp.einsum(spec[0], a.astype(dtype), b.astype(dtype)).astype(out_dtype)
  return _mixed_einsum(a, b, spec, dtype.name, out_dtype.name)


def plain_einsum(spec, a: jax.Array, b: jax.Array, dtype, out_dtype=None) -> jax.Array:
  """The einsum `spec[0]` of a and b cast to `dtype`, accumulated and returned in float32, then
  cast to `out_dtype` (default `dtype`): `einsum`'s forward numbers, with autodiff's backward.

  On a CPU without bf16 x bf16 -> f32 dots, bfloat16 fails here at run time ('tuned' probes)."""
  dtype = jnp.dtype(dtype)
  return jnp.einsum(spec[0], a.astype(dtype), b.astype(dtype),
                    preferred_element_type=_F32).astype(out_dtype or dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mixed_einsum(a, b, spec, dtype_name, out_dtype_name):
  return jnp.einsum(spec[0], a.astype(dtype_name), b.astype(dtype_name),
                    preferred_element_type=_F32).astype(out_dtype_name)


def _mixed_einsum_fwd(a, b, spec, dtype_name, out_dtype_name):
  ac, bc = a.astype(dtype_name), b.astype(dtype_name)
  out = jnp.einsum(spec[0], ac, bc, preferred_element_type=_F32).astype(out_dtype_name)
  return out, (ac, bc, jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))


def _mixed_einsum_bwd(spec, dtype_name, out_dtype_name, residuals, g):
  del out_dtype_name
  ac, bc, a_like, b_like = residuals
  operands = {'a': ac, 'b': bc, 'g': g.astype(dtype_name)}
  grads = [
      jnp.einsum(equation, *(operands[name]
                             for name in names), preferred_element_type=_F32).astype(like.dtype)
      for (equation, names), like in zip(spec[1:], (a_like, b_like))
  ]
  return tuple(grads)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def mixed_precision_supported() -> bool:
  """Whether this process's default backend runs the bf16 x bf16 -> f32 dots above.

  GPUs and TPUs do. XLA:CPU runs them on its bf16 kernels where it has them, and otherwise falls
  back to a dot implementation that fails at run time (UNIMPLEMENTED: 'BF16 x BF16 = F32'), so on
  a CPU every form used here is run once, forward and backward, on tiny operands (once per
  process); if any fails, the matmuls keep bfloat16 results (slower on such a CPU, but correct).

  `t5.make_model` calls this at start-up when it resolves the kernels to 'tuned' in bfloat16, so
  that the probe runs on the real backend before any step is traced; the tuned paths' calls while
  tracing then only read the cache. (A layer built directly, outside make_model, probes at its
  first trace instead.) With 'xla', the resolution on TPU and GPU, nothing calls it.
  """
  return _probe(jax.default_backend())


@functools.lru_cache(maxsize=None)
def _probe(platform: str) -> bool:
  if platform != 'cpu':
    return True
  dtype = jnp.bfloat16.dtype.name

  def forms(x, w, wt, q, p):
    return sum(
        jnp.sum(_mixed_einsum(a, b, spec, dtype, 'float32'))
        for spec, a, b in ((DENSE, x, w), (DENSE_TRANSPOSED, x, wt), (ATTENTION_LOGITS, q, q),
                           (ATTENTION_OUTPUT, p, q)))

  try:
    with jax.ensure_compile_time_eval():  # may be called while tracing a jitted step
      ones = lambda *shape: jnp.ones(shape, _F32)
      grads = jax.jit(jax.grad(forms, argnums=(0, 1, 2, 3, 4)))(ones(2, 8, 16), ones(16, 8),
                                                                ones(8, 16), ones(2, 8, 2, 4),
                                                                ones(2, 2, 8, 8))
      jax.block_until_ready(grads)
  except jax.errors.JaxRuntimeError as e:
    logging.warning(
        'XLA:CPU cannot run bfloat16 x bfloat16 -> float32 dots here (%s); '
        'bfloat16 matmuls fall back to bfloat16 results, which is slower.',
        str(e).splitlines()[0])
    return False
  return True
