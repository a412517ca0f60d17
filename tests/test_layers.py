"""Building blocks against hand-computed values and numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from t5lite.models import layers
from t5lite.models.kernels import norm as norm_lib


def test_relative_position_bucket_bidirectional_matches_hand_table():
  # 32 buckets, max distance 128, bidirectional: 16 buckets per direction, 8 exact.
  # n = query - key; key after the query adds 16. Large n: 8 + int(log(n/8) / log(16) * 8).
  relative = np.array([0, -1, 1, -7, -8, -12, -16, 16, -32, -64, -127, -128, -200, 200])
  expected = np.array([0, 1, 17, 7, 8, 9, 10, 26, 12, 14, 15, 15, 15, 31])
  got = layers.relative_position_bucket(relative, bidirectional=True, num_buckets=32,
                                        max_distance=128)
  np.testing.assert_array_equal(got, expected)


def test_relative_position_bucket_causal_matches_hand_table():
  # Causal: keys after the query all land in bucket 0; 16 exact, then 16 + int(log(n/16)/log(8)*16).
  relative = np.array([5, 1, 0, -1, -15, -16, -32, -64, -127, -128, -1000])
  expected = np.array([0, 0, 0, 1, 15, 16, 21, 26, 31, 31, 31])
  got = layers.relative_position_bucket(relative, bidirectional=False, num_buckets=32,
                                        max_distance=128)
  np.testing.assert_array_equal(got, expected)


def test_rms_norm_matches_numpy():
  x = np.random.RandomState(0).randn(2, 5, 16).astype(np.float32) * 3
  norm = layers.RMSNorm(dtype=jnp.float32)
  variables = norm.init(jax.random.PRNGKey(0), x)
  scale = np.random.RandomState(1).rand(16).astype(np.float32)
  variables = {'params': {'scale': nn.meta.replace_boxed(variables['params']['scale'], scale)}}
  got = norm.apply(variables, x)
  expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_gradients_equal_autodiff_of_the_formula():
  """The hand-written backward against jax.grad of the plain formula, for x and scale, in
  float32 (and bf16 inputs/outputs, within bf16 rounding)."""
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(3, 7, 16) * 2, jnp.float32)
  scale = jnp.asarray(rng.rand(16) + 0.5, jnp.float32)
  d_y = jnp.asarray(rng.randn(3, 7, 16), jnp.float32)

  def plain(x, scale):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + 1e-6) * scale

  for dtype, rtol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    fast = lambda x, s: norm_lib.rms_norm(x, s, 1e-6, jnp.dtype(dtype).name)
    y, pullback = jax.vjp(fast, x.astype(dtype), scale)
    want_y, want_pullback = jax.vjp(lambda x, s: plain(x, s).astype(dtype), x.astype(dtype), scale)
    np.testing.assert_allclose(np.float32(y), np.float32(want_y), rtol=rtol, atol=rtol)
    got, want = pullback(d_y.astype(dtype)), want_pullback(d_y.astype(dtype))
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=rtol, atol=rtol)


def test_attention_matches_numpy():
  rng = np.random.RandomState(0)
  b, lq, lk, d, h, dh = 2, 4, 6, 16, 2, 8
  xq, xkv = rng.randn(b, lq, d).astype(np.float32), rng.randn(b, lk, d).astype(np.float32)
  mask = rng.rand(b, 1, lq, lk) > 0.3
  mask[..., 0] = True  # every query sees at least one key
  relpos = rng.randn(1, h, lq, lk).astype(np.float32)
  bias = layers.AttentionBias(jnp.asarray(relpos), jnp.asarray(mask))
  attn = layers.MultiHeadAttention(h, dh, jnp.float32, 0.0, True)
  params = nn.meta.unbox(attn.init(jax.random.PRNGKey(0), xq, xkv, bias))['params']
  got = attn.apply({'params': params}, xq, xkv, bias)

  wq, wk, wv = (np.asarray(params[n]['kernel']) for n in ('query', 'key', 'value'))
  wo = np.asarray(params['out']['kernel'])
  q = np.einsum('bld,dhk->bhlk', xq, wq)
  k = np.einsum('bld,dhk->bhlk', xkv, wk)
  v = np.einsum('bld,dhk->bhlk', xkv, wv)
  logits = q @ k.transpose(0, 1, 3, 2) + relpos  # T5: no 1/sqrt(head_dim) scaling
  logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum('bhqk,bhkd,hde->bqe', weights, v, wo)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_mask_segments_and_prefix():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  m = np.asarray(layers.attention_mask(seg, seg, causal=True))[0, 0]
  expected = np.array(
      [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(m, expected)
  prefix = jnp.array([[1, 1, 1, 0]])
  seg = jnp.ones((1, 4), jnp.int32)
  m = np.asarray(
      layers.attention_mask(seg, seg, causal=True, bidirectional_q=prefix,
                            bidirectional_k=prefix))[0, 0]
  expected = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(m, expected)
