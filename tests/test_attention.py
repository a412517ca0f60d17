"""The attention core (t5lite/models/kernels/attention.py): its hand-written backward pass and batch
chunking against autodiff of the plain formulation, numpy, and the unchunked, unsharded run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.models.kernels import attention
from test_training import small_config, train_losses


def inputs(batch=4, q_len=6, k_len=10, heads=3, dim=8, bias_batch=1, seed=0):
  rng = np.random.RandomState(seed)
  q = rng.randn(batch, q_len, heads, dim).astype(np.float32)
  k, v = (rng.randn(batch, k_len, heads, dim).astype(np.float32) for _ in range(2))
  bias = rng.randn(bias_batch, heads, q_len, k_len).astype(np.float32)
  mask = rng.rand(batch, 1, q_len, k_len) > 0.3
  mask[0, :, 1] = False  # a fully masked (padding) query row
  d_out = rng.randn(batch, q_len, heads, dim).astype(np.float32)
  return q, k, v, bias, mask, d_out


def numpy_attention(q, k, v, bias, mask, keep=None):
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) + bias
  logits = np.where(mask, logits, -1e10)  # a fully masked row: uniform weights, as in T5
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  if keep is not None:
    weights = weights * keep
  return np.einsum('bhqk,bkhd->bqhd', weights, v)


def vjp(fn, q, k, v, bias, d_out):
  out, pullback = jax.vjp(fn, *(jnp.asarray(x) for x in (q, k, v, bias)))
  return out, pullback(jnp.asarray(d_out, out.dtype))


@pytest.mark.parametrize('chunk_bytes', [None, 1])  # default (one chunk here) / one example each
@pytest.mark.parametrize('bias_batch', [1, 4])
@pytest.mark.parametrize('dropout', [False, True])
def test_float32_matches_numpy_and_autodiff(monkeypatch, chunk_bytes, bias_batch, dropout):
  if chunk_bytes:
    monkeypatch.setattr(attention, 'CHUNK_BYTES', chunk_bytes)
  q, k, v, bias, mask, d_out = inputs(bias_batch=bias_batch)
  keep = None
  if dropout:
    keep = (np.random.RandomState(1).rand(4, 3, 6, 10) > 0.25).astype(np.float32) / 0.75
  assert attention.num_chunks(4, 3, 6, 10) == (4 if chunk_bytes else 1)
  fast = lambda *a: attention.dot_product_attention(*a, mask, jnp.float32, keep)
  plain = lambda *a: attention.reference_attention(*a, mask, jnp.float32, keep)
  out, grads = vjp(fast, q, k, v, bias, d_out)
  want_out, want_grads = vjp(plain, q, k, v, bias, d_out)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, bias, mask, keep), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  for got, want in zip(grads, want_grads):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(grads[3]).max()) > 1e-3  # the bias gradient is not trivially zero


@pytest.mark.parametrize('chunk_bytes', [None, 1])  # one chunk / one example each (bf16 as bits)
def test_bfloat16_is_as_accurate_as_the_plain_formulation(monkeypatch, chunk_bytes):
  """Against float32 truth, the bf16 core's output and gradients err no more than the plain bf16
  formulation's (its backward uses rowsum(dO * O) and the rounded weights instead)."""
  if chunk_bytes:
    monkeypatch.setattr(attention, 'CHUNK_BYTES', chunk_bytes)
  assert attention.num_chunks(4, 2, 64, 64) == (4 if chunk_bytes else 1)
  q, k, v, bias, mask, d_out = inputs(batch=4, q_len=64, k_len=64, heads=2, dim=16)
  truth = vjp(lambda *a: attention.reference_attention(*a, mask, jnp.float32), q, k, v, bias, d_out)
  fast = vjp(lambda *a: attention.dot_product_attention(*a, mask, jnp.bfloat16), q, k, v, bias,
             d_out)
  plain = vjp(lambda *a: attention.reference_attention(*a, mask, jnp.bfloat16), q, k, v, bias,
              d_out)

  def errors(result):
    flat = [result[0]] + list(result[1])
    return [
        float(jnp.linalg.norm(x.astype(jnp.float32) - t) / jnp.linalg.norm(t))
        for x, t in zip(flat, [truth[0]] + list(truth[1]))
    ]

  fast_errors, plain_errors = errors(fast), errors(plain)
  assert fast[0].dtype == jnp.bfloat16 and fast[1][3].dtype == jnp.float32
  for name, fast_error, plain_error in zip(['out', 'q', 'k', 'v', 'bias'], fast_errors,
                                           plain_errors):
    assert fast_error < 1.5 * plain_error + 1e-3, (name, fast_error, plain_error)
    assert fast_error < 0.02, (name, fast_error)


@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 2, 2)])
def test_chunked_sharded_training_equals_unchunked_one_device(monkeypatch, mesh):
  reference, _ = train_losses(small_config(), jax.devices()[:1], steps=3)
  # small_config's encoder scores are 8 heads x 16 x 16 float32 = 8 KiB per example: 16 KiB
  # chunks split its batch of 16 into 8 chunks of 2 (strided, so each stays sharded).
  monkeypatch.setattr(attention, 'CHUNK_BYTES', 16 * 2**10)
  assert attention.num_chunks(16, 8, 16, 16) == 8
  config = small_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  losses, _ = train_losses(config, jax.devices(), steps=3)
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  assert losses[-1] < losses[0]


def test_attention_layer_dropout_drops_and_rescales():
  """MultiHeadAttention's dropout on the weights: a training call differs from the deterministic
  one, and its mean over many dropout keys converges to it (kept weights scaled by 1 / keep)."""
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from t5lite.models import layers  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 5, 16), jnp.float32)
  bias = layers.AttentionBias(jnp.asarray(rng.randn(1, 2, 5, 5), jnp.float32), None)
  make = lambda deterministic: layers.MultiHeadAttention(2, 8, jnp.float32, 0.5, deterministic)
  params = nn.meta.unbox(make(True).init(jax.random.PRNGKey(0), x, x, bias))['params']
  plain = make(True).apply({'params': params}, x, x, bias)
  dropped = jax.vmap(
      lambda key: make(False).apply({'params': params}, x, x, bias, rngs={'dropout': key}))(
          jax.random.split(jax.random.PRNGKey(1), 4000))
  assert float(jnp.abs(dropped[0] - plain).max()) > 1e-2  # something was dropped
  # Standard error of the mean over 4000 draws is ~1.6% of a draw's spread.
  spread = float(jnp.std(dropped, axis=0).max())
  np.testing.assert_allclose(dropped.mean(0), plain, atol=5 * spread / np.sqrt(4000))


@pytest.mark.parametrize('bias_shape', ['shared', 'batched', 'decode'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_xla_path_matches_tuned_and_numpy(bias_shape, dtype):
  """kernels='xla' (jax.nn.dot_product_attention, autodiff) against the tuned custom VJP, and in
  float32 against numpy: T5's unscaled logits, the bias as the layers pass it ([1, h, q, k]; per
  example; [b, h, 1, k] in cached decoding), and a fully masked (padding) row, which must stay
  finite and get the same uniform weights as with MASK_BIAS."""
  q, k, v, bias, mask, d_out = inputs(bias_batch=1 if bias_shape == 'shared' else 4)
  mask[1, :, 0] = False  # fully masked rows (row 1 of example 0 is one already)
  if bias_shape == 'decode':  # one query per example
    q, bias, mask, d_out = q[:, :1], bias[:, :, :1], mask[:, :, :1], d_out[:, :1]
  dtype = jnp.dtype(dtype)
  run = lambda kernels: vjp(
      lambda *a: attention.dot_product_attention(*a, mask, dtype, kernels=kernels), q, k, v, bias,
      d_out)
  (out, grads), (want_out, want_grads) = run('xla'), run('tuned')
  assert out.dtype == dtype and grads[3].dtype == jnp.float32
  for got in [out] + list(grads):
    assert np.isfinite(np.asarray(got, np.float32)).all()
  if dtype == jnp.float32:
    np.testing.assert_allclose(out, numpy_attention(q, k, v, bias, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    return
  # bfloat16: the forward numbers are the tuned ones (bf16 x bf16 -> f32 logits, float32
  # softmax, weights rounded to bf16, f32 accumulation of the output) up to the output's rounding;
  # the gradients round at other places, so both are held to float32 truth.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                             rtol=1e-2, atol=1e-2)
  truth_out, truth_grads = vjp(lambda *a: attention.reference_attention(*a, mask, jnp.float32), q,
                               k, v, bias, d_out)
  for name, got, want, truth in zip(['out', 'q', 'k', 'v', 'bias'], [out] + list(grads),
                                    [want_out] + list(want_grads), [truth_out] + list(truth_grads)):
    error = lambda x, t=truth: float(
        jnp.linalg.norm(x.astype(jnp.float32) - t) / jnp.linalg.norm(t))
    assert error(got) < 1.5 * error(want) + 1e-3, (name, error(got), error(want))


def test_xla_path_is_jax_attention_without_dropout(monkeypatch):
  """'xla' is jax.nn.dot_product_attention where it applies (no dropout), with scale 1 (T5's
  logits are unscaled), and the einsum formulation with dropout, which it lacks."""
  calls = []
  jax_attention = jax.nn.dot_product_attention

  def counting(*args, **kwargs):
    calls.append(kwargs.get('scale'))
    return jax_attention(*args, **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', counting)
  q, k, v, bias, mask, _ = inputs()
  out = attention.dot_product_attention(q, k, v, bias, mask, jnp.float32, kernels='xla')
  assert calls == [1.0]
  keep = np.ones((4, 3, 6, 10), np.float32)  # dropout that keeps everything: the same numbers
  dropped = attention.dot_product_attention(q, k, v, bias, mask, jnp.float32, keep, kernels='xla')
  assert calls == [1.0]
  np.testing.assert_allclose(dropped, out, rtol=1e-5, atol=1e-6)
