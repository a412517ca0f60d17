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
