"""Weight matmuls in a low-precision compute dtype with float32 accumulation, forward and backward.

`dense(x, kernel, dtype)` is `x[..., d] @ kernel[d, f]` (or `kernel[f, d]` transposed, for tied
logits). In float32 it is a plain einsum. In bfloat16 its three matmuls (output, input gradient,
kernel gradient) all take bfloat16 operands and accumulate in float32 (the usual mixed-precision
recipe, as torch.autocast and TPU MXUs do), through a custom VJP, because:

- `jnp.einsum` on bfloat16 operands returns bfloat16; on XLA:CPU such a dot is computed by
  converting to float32 (about 400 GFLOP/s on this project's 2-core AVX512-BF16 machine), while
  bfloat16 x bfloat16 -> float32 dots run on the native bf16 kernels (about 850 GFLOP/s);
- autodiff of a `preferred_element_type=float32` einsum would feed a float32 cotangent into the
  backward dots, making them float32 x bfloat16, i.e. float32 matmuls again;
- the kernel gradient is accumulated in float32 straight from the dot, never rounded to bfloat16
  (the parameters are float32), so it is no less accurate than autodiff's.

The backward dots use layouts the CPU's fast kernels take (the kernel gradient contracts over a
[batch, length] pair of leading dims: as a 2-D [tokens, d] contraction it ran at half the speed).
Measured with benchmarks/train_throughput.py (docs/performance.md). On GPU and TPU the same
formulation is what the hardware does anyway.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def dense(x: jax.Array, kernel: jax.Array, dtype, transpose_kernel: bool = False,
          out_dtype=None) -> jax.Array:
  """x[..., d] @ kernel[d, f] -> [..., f] computed in `dtype` (kernel[f, d] with
  `transpose_kernel`); the result in `out_dtype` (default `dtype`; float32 keeps the
  accumulator unrounded, as the output logits want)."""
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if dtype == _F32 or not mixed_precision_supported():
    equation = '...d,fd->...f' if transpose_kernel else '...d,df->...f'
    return jnp.einsum(equation, x.astype(dtype), kernel.astype(dtype)).astype(out_dtype)
  return _mixed_dense(x, kernel, dtype.name, transpose_kernel, out_dtype.name)


def _forward(x, kernel, transpose_kernel):
  equation = '...d,fd->...f' if transpose_kernel else '...d,df->...f'
  return jnp.einsum(equation, x, kernel, preferred_element_type=_F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mixed_dense(x, kernel, dtype_name, transpose_kernel, out_dtype_name):
  return _forward(x.astype(dtype_name), kernel.astype(dtype_name),
                  transpose_kernel).astype(out_dtype_name)


def _mixed_dense_fwd(x, kernel, dtype_name, transpose_kernel, out_dtype_name):
  xc, kc = x.astype(dtype_name), kernel.astype(dtype_name)
  # The residual dtypes carry x's and the kernel's own dtypes to the backward pass.
  out = _forward(xc, kc, transpose_kernel).astype(out_dtype_name)
  return out, (xc, kc, jnp.zeros((), x.dtype), jnp.zeros((), kernel.dtype))


def _as_3d(a):
  """[..., n] -> [B, L, n]: leading dims folded into two (the kernel gradient's fast layout)."""
  if a.ndim >= 3:
    return a.reshape((-1,) + a.shape[-2:])
  return a.reshape((1, -1, a.shape[-1]))


def _mixed_dense_bwd(dtype_name, transpose_kernel, out_dtype_name, residuals, g):
  del out_dtype_name
  xc, kc, x_like, kernel_like = residuals
  g = g.astype(dtype_name)
  if transpose_kernel:  # kernel [f, d]
    dx = jnp.einsum('...f,fd->...d', g, kc, preferred_element_type=_F32)
    dkernel = jnp.einsum('blf,bld->fd', _as_3d(g), _as_3d(xc), preferred_element_type=_F32)
  else:  # kernel [d, f]
    dx = jnp.einsum('...f,df->...d', g, kc, preferred_element_type=_F32)
    dkernel = jnp.einsum('bld,blf->df', _as_3d(xc), _as_3d(g), preferred_element_type=_F32)
  return dx.astype(x_like.dtype), dkernel.astype(kernel_like.dtype)


_mixed_dense.defvjp(_mixed_dense_fwd, _mixed_dense_bwd)


# Attention's two activation x activation einsums, each with the operand order of its backward
# einsums spelled out: XLA:CPU's bf16 x bf16 -> f32 kernels take some operand orders and not
# their mirror images (which fail with UNIMPLEMENTED), so the order is chosen, not derived.
# (forward, (grad of a: equation, operands), (grad of b: equation, operands)); g = cotangent.
ATTENTION_LOGITS = ('bqhd,bkhd->bhqk', ('bhqk,bkhd->bqhd', 'gb'), ('bhqk,bqhd->bkhd', 'ga'))
ATTENTION_OUTPUT = ('bhqk,bkhd->bqhd', ('bqhd,bkhd->bhqk', 'gb'), ('bhqk,bqhd->bkhd', 'ag'))


def einsum(spec, a: jax.Array, b: jax.Array, dtype, out_dtype=None) -> jax.Array:
  """The einsum `spec[0]` of a and b in `dtype` with float32 accumulation, forward and backward
  (as `dense`); the result in `out_dtype` (default `dtype`)."""
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if dtype == _F32 or not mixed_precision_supported():
    return jnp.einsum(spec[0], a.astype(dtype), b.astype(dtype)).astype(out_dtype)
  return _mixed_einsum(a, b, spec, dtype.name, out_dtype.name)


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
  grads = [jnp.einsum(equation, *(operands[name] for name in names),
                      preferred_element_type=_F32).astype(like.dtype)
           for (equation, names), like in zip(spec[1:], (a_like, b_like))]
  return tuple(grads)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def mixed_precision_supported() -> bool:
  """Whether this process's default backend runs the bf16 x bf16 -> f32 dots above.

  GPUs and TPUs do. XLA:CPU runs them on its bf16 kernels where it has them, and otherwise falls
  back to a dot implementation that fails at run time (UNIMPLEMENTED: 'BF16 x BF16 = F32'), so on
  a CPU every form used here is run once, forward and backward, on tiny operands (once per
  process); if any fails, the matmuls keep bfloat16 results (slower on such a CPU, but correct).
  """
  return _probe(jax.default_backend())


@functools.lru_cache(maxsize=None)
def _probe(platform: str) -> bool:
  if platform != 'cpu':
    return True
  dtype = jnp.bfloat16.dtype.name

  def forms(x, w, wt, q, p):
    loss = (jnp.sum(_mixed_dense(x, w, dtype, False, 'float32'))
            + jnp.sum(_mixed_dense(x, wt, dtype, True, 'float32'))
            + jnp.sum(_mixed_einsum(q, q, ATTENTION_LOGITS, dtype, 'float32'))
            + jnp.sum(_mixed_einsum(p, q, ATTENTION_OUTPUT, dtype, 'float32')))
    return loss

  try:
    with jax.ensure_compile_time_eval():  # may be called while tracing a jitted step
      ones = lambda *shape: jnp.ones(shape, _F32)
      grads = jax.jit(jax.grad(forms, argnums=(0, 1, 2, 3, 4)))(
          ones(2, 8, 16), ones(16, 8), ones(8, 16), ones(2, 8, 2, 4), ones(2, 2, 8, 8))
      jax.block_until_ready(grads)
  except jax.errors.JaxRuntimeError as e:
    logging.warning('XLA:CPU cannot run bfloat16 x bfloat16 -> float32 dots here (%s); '
                    'bfloat16 matmuls fall back to bfloat16 results, which is slower.',
                    str(e).splitlines()[0])
    return False
  return True
