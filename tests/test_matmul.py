"""Mixed-precision matmuls (t5lite/models/kernels/matmul.py): bf16 operands, f32 accumulation,
forward and backward, checked against float32 autodiff (the reference) and plain bf16 autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.models.kernels import matmul

F32, BF16 = jnp.float32, jnp.bfloat16


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _grads(fn, *args):
  # A fixed random cotangent, so every output element's gradient path is exercised.
  out = fn(*args)
  cot = jax.random.normal(jax.random.PRNGKey(9), out.shape, F32)
  return out, jax.grad(lambda *a: jnp.sum(fn(*a).astype(F32) * cot), argnums=(0, 1))(*args)


@pytest.mark.parametrize('transpose_kernel', [False, True])
def test_dense_matches_float32_and_keeps_kernel_gradient_in_float32(transpose_kernel):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 40, 64), F32).astype(BF16)
  shape = (96, 64) if transpose_kernel else (64, 96)
  kernel = jax.random.normal(jax.random.PRNGKey(1), shape, F32) * 0.1
  equation = '...d,fd->...f' if transpose_kernel else '...d,df->...f'
  ref_out, ref = _grads(lambda x, k: jnp.einsum(equation, x.astype(F32), k), x, kernel)
  plain_out, plain = _grads(lambda x, k: jnp.einsum(equation, x, k.astype(BF16)), x, kernel)
  out, (dx, dk) = _grads(lambda x, k: matmul.dense(x, k, BF16, transpose_kernel), x, kernel)
  assert out.dtype == BF16 and dx.dtype == BF16 and dk.dtype == F32
  assert rel_err(out, ref_out) < 5e-3 and rel_err(dx, ref[0]) < 5e-3
  # The kernel gradient comes straight from an f32 accumulator: closer to the reference than
  # autodiff's, which is rounded to bf16 before it is cast back to the f32 parameter.
  assert rel_err(dk, ref[1]) < 0.8 * rel_err(plain[1], ref[1])
  logits = matmul.dense(x, kernel, BF16, transpose_kernel, out_dtype=F32)
  assert logits.dtype == F32 and rel_err(logits, ref_out) < 5e-3


@pytest.mark.parametrize('spec', [matmul.ATTENTION_LOGITS, matmul.ATTENTION_OUTPUT])
def test_attention_einsums_match_float32(spec):
  b, h, q, k, d = 2, 3, 24, 24, 16
  a_shape = (b, q, h, d) if spec is matmul.ATTENTION_LOGITS else (b, h, q, k)
  a = jax.random.normal(jax.random.PRNGKey(2), a_shape, F32).astype(BF16)
  v = jax.random.normal(jax.random.PRNGKey(3), (b, k, h, d), F32).astype(BF16)
  _, ref = _grads(lambda a, v: jnp.einsum(spec[0], a.astype(F32), v.astype(F32)), a, v)
  out, grads = _grads(lambda a, v: matmul.einsum(spec, a, v, BF16, F32), a, v)
  assert out.dtype == F32
  for got, want in zip(grads, ref):
    assert got.dtype == BF16 and rel_err(got, want) < 5e-3


@pytest.mark.parametrize('spec, a_shape, b_shape',
                         [(matmul.DENSE, (2, 5, 8), (8, 6)),
                          (matmul.DENSE_TRANSPOSED, (2, 5, 8), (6, 8)),
                          (matmul.ATTENTION_LOGITS, (2, 5, 3, 4), (2, 7, 3, 4)),
                          (matmul.ATTENTION_OUTPUT, (2, 3, 5, 7), (2, 7, 3, 4))])
def test_float32_equals_autodiff_of_the_plain_einsum(spec, a_shape, b_shape):
  """Float32 also takes the custom VJP (for its backward layouts): the same values and gradients
  as autodiff of jnp.einsum, every spec's backward equations included."""
  a = jax.random.normal(jax.random.PRNGKey(4), a_shape, F32)
  b = jax.random.normal(jax.random.PRNGKey(5), b_shape, F32)
  want_out, want = _grads(lambda a, b: jnp.einsum(spec[0], a, b), a, b)
  out, got = _grads(lambda a, b: matmul.einsum(spec, a, b, F32), a, b)
  np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
  for g, w in zip(got, want):
    assert g.dtype == F32
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _gated_gelu_grads(fn, x, w0, w1):
  out = fn(x, w0, w1)
  cot = jax.random.normal(jax.random.PRNGKey(9), out.shape, F32)
  return out, jax.grad(lambda *a: jnp.sum(fn(*a).astype(F32) * cot), argnums=(0, 1, 2))(x, w0, w1)


def _plain_gated_gelu(x, w0, w1, dtype=F32):
  x, w0, w1 = (a.astype(dtype) for a in (x, w0, w1))
  return jax.nn.gelu(x @ w0, approximate=True) * (x @ w1)


def test_gated_gelu_equals_autodiff_in_float32_and_is_accurate_in_bfloat16():
  x = jax.random.normal(jax.random.PRNGKey(10), (2, 24, 32), F32)
  w0, w1 = (jax.random.normal(jax.random.PRNGKey(i), (32, 48), F32) * 0.3 for i in (11, 12))
  want_out, want = _gated_gelu_grads(_plain_gated_gelu, x, w0, w1)
  out, got = _gated_gelu_grads(lambda *a: matmul.gated_gelu(*a, F32), x, w0, w1)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  for g, w in zip(got, want):
    assert g.dtype == F32
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  # bf16: as accurate as autodiff of the plain bf16 formulation (against the float32 truth);
  # the weight gradients more so (an f32 accumulator, not rounded to bf16).
  xb = x.astype(BF16)
  out, got = _gated_gelu_grads(lambda *a: matmul.gated_gelu(*a, BF16), xb, w0, w1)
  _, plain = _gated_gelu_grads(lambda *a: _plain_gated_gelu(*a, BF16), xb, w0, w1)
  assert out.dtype == BF16 and got[0].dtype == BF16 and got[1].dtype == F32
  assert rel_err(out, want_out) < 1e-2
  for g, p, w in zip(got, plain, want):
    assert rel_err(g, w) < 1.5 * rel_err(p, w) + 1e-3, (rel_err(g, w), rel_err(p, w))


@pytest.mark.parametrize('activation,fn', [('silu', jax.nn.silu), ('relu', jax.nn.relu)])
def test_other_gates_equal_autodiff(activation, fn):
  """UL2's gated SiLU and gated ReLU through the same custom VJP: float32 equals autodiff of the
  formula; bfloat16 keeps the weight gradients in float32, close to the float32 truth."""
  x = jax.random.normal(jax.random.PRNGKey(10), (2, 24, 32), F32)
  w0, w1 = (jax.random.normal(jax.random.PRNGKey(i), (32, 48), F32) * 0.3 for i in (11, 12))
  plain = lambda x, w0, w1: fn(x @ w0) * (x @ w1)
  want_out, want = _gated_gelu_grads(plain, x, w0, w1)
  for kernels in ('tuned', 'xla'):
    out, got = _gated_gelu_grads(lambda *a: matmul.gated(*a, F32, activation, kernels), x, w0, w1)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
      assert g.dtype == F32
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  out, got = _gated_gelu_grads(lambda *a: matmul.gated(*a, BF16, activation), x.astype(BF16), w0,
                               w1)
  assert out.dtype == BF16 and got[1].dtype == F32 and rel_err(out, want_out) < 1e-2
  assert all(rel_err(g, w) < 2e-2 for g, w in zip(got, want))
  with pytest.raises(ValueError, match="unknown gate activation 'tanh'"):
    matmul.gated(x, w0, w1, F32, 'tanh')


def _kernel_grad(x, kernel):
  return jax.grad(lambda k: jnp.sum(matmul.dense(x, k, BF16).astype(F32)**2))(kernel)


def test_backend_without_mixed_dots_falls_back_to_bf16_results(monkeypatch):
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 5, 8), F32).astype(BF16)
  kernel = jax.random.normal(jax.random.PRNGKey(7), (8, 6), F32)
  is_bf16 = lambda a: bool(jnp.all(a == a.astype(BF16).astype(F32)))
  assert not is_bf16(_kernel_grad(x, kernel))  # mixed: the f32 accumulator, unrounded
  monkeypatch.setattr(matmul, 'mixed_precision_supported', lambda: False)
  np.testing.assert_array_equal(matmul.dense(x, kernel, BF16),
                                jnp.einsum('bld,df->blf', x, kernel.astype(BF16)))
  assert is_bf16(_kernel_grad(x, kernel))  # plain autodiff: a bf16 gradient cast to f32
  w1 = kernel * 0.5
  np.testing.assert_allclose(np.float32(matmul.gated_gelu(x, kernel, w1, BF16)),
                             np.float32(_plain_gated_gelu(x, kernel, w1, BF16)), rtol=2e-2,
                             atol=2e-2)


def test_probe_detects_a_cpu_that_cannot_run_the_mixed_dots(monkeypatch, caplog):

  def unsupported(*args):
    raise jax.errors.JaxRuntimeError(
        'UNIMPLEMENTED: Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32')

  matmul._probe.cache_clear()
  monkeypatch.setattr(matmul, '_mixed_einsum', unsupported)
  try:
    assert matmul._probe('cpu') is False
    assert 'BF16 x BF16 = F32' in caplog.text
    assert matmul._probe('gpu') is True  # GPUs and TPUs are not probed
  finally:
    matmul._probe.cache_clear()  # the real probe runs again for the other tests
