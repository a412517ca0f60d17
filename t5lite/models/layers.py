"""T5 building blocks: RMS norm, relative position bias, attention, MLP, embeddings, masks.

Every parameter is created through `nn.with_logical_partitioning`, so its logical axis names
(`vocab, embed, heads, kv, mlp, relpos_buckets`) travel with it; `t5lite.partitioning` maps them
to mesh axes. Activations are constrained with the `act_*` names (kept separate from parameter
names so that, e.g., `embed` can be sharded over `fsdp` in weights while batch uses `fsdp` too).
Parameters are float32; computation runs in `dtype` (bfloat16 by default); norms and softmax in
float32.

The compute (matmuls, the attention core, the norm) is in t5lite/models/kernels/; every module
that computes has a `kernels` attribute, 'auto' or 'xla', set from the ModelConfig's `kernels`
by t5lite/models/t5.py, which selects the kernels' tuned custom VJPs or their plain formulations.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from t5lite.models import lora as lora_lib
from t5lite.models.kernels import attention, matmul, norm

Dtype = Any


def param_init(stddev: float, axes: tuple[str, ...]):
  """N(0, stddev^2) initializer whose parameter carries the logical axis names `axes`."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def constrain(x: jax.Array, axes: tuple[str | None, ...], rules=None) -> jax.Array:
  """Sharding constraint by logical names (under `rules`, default the active ones); a no-op when
  no mesh/rules are active."""
  return nn.with_logical_constraint(x, axes, rules)


def _mesh_axes(spec) -> tuple[str, ...]:
  """The mesh axes of a one-entry PartitionSpec, as a tuple (none: ())."""
  axes = spec[0] if spec else None
  return () if axes is None else tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias; computed in float32."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.bfloat16
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), jnp.float32)
    return norm.normalize(x, scale, self.epsilon, self.dtype, self.kernels)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """Maps key_position - query_position to a bucket id (Raffel et al. 2020, mesh-tensorflow).

  Half the buckets (per direction) hold exact small distances; the rest grow logarithmically up
  to `max_distance`, beyond which everything shares the last bucket. Bidirectional uses one half
  of the buckets for keys after the query. Static shapes only: computed in numpy at trace time.
  """
  n = -np.asarray(relative_position, dtype=np.int64)
  bucket = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide='ignore'):
    log_ratio = (np.log(np.maximum(n, 1).astype(np.float32) / max_exact)
                 / np.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return bucket + np.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  """One learned bias per (bucket, head); one instance per stack, shared by all its layers (T5),
  or one per self-attention layer (UMT5, `relpos_per_layer`)."""
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool

  @nn.compact
  def __call__(self, q_len: int, k_len: int, q_offset: int = 0,
               query_positions: jax.Array | None = None) -> jax.Array:
    """[1, heads, q_len, k_len]; or, given per-example `query_positions` [batch] (one query each,
    as in cached decoding, where the position is only known at run time), [batch, heads, 1, k_len]:
    those rows of the full [k_len, k_len] bias, gathered from a static bucket table."""
    table = self.param('rel_embedding', param_init(1.0, ('relpos_buckets', 'heads')),
                       (self.num_buckets, self.num_heads), jnp.float32)
    if query_positions is not None:
      square = np.arange(k_len)[None, :] - np.arange(k_len)[:, None]
      buckets = relative_position_bucket(square, self.bidirectional, self.num_buckets,
                                         self.max_distance)
      rows = jnp.take(jnp.asarray(buckets, jnp.int32), query_positions, axis=0)  # [batch, k]
      bias = jnp.take(table, rows, axis=0)  # [batch, k, heads]
      return jnp.transpose(bias, (0, 2, 1))[:, :, None, :]
    relative = np.arange(k_len)[None, :] - (np.arange(q_len) + q_offset)[:, None]
    buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    bias = jnp.take(table, jnp.asarray(buckets, jnp.int32), axis=0)  # [q, k, heads]
    return jnp.transpose(bias, (2, 0, 1))[None]  # [1, heads, q, k]


def attention_mask(q_segments: jax.Array, k_segments: jax.Array, causal: bool = False,
                   bidirectional_q: jax.Array | None = None,
                   bidirectional_k: jax.Array | None = None) -> jax.Array:
  """Boolean [batch, 1, q, k] mask: same segment, key not padding, and causal if asked.

  Segment ids are 0 on padding and 1, 2, ... per packed example, so attention never crosses
  example boundaries. For a prefix LM, positions flagged in both `bidirectional_q` and
  `bidirectional_k` (the inputs part) also see each other regardless of order.
  """
  mask = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0)
  if causal:
    q_len, k_len = q_segments.shape[1], k_segments.shape[1]
    allowed = jnp.tril(jnp.ones((q_len, k_len), bool))[None]
    if bidirectional_q is not None:
      allowed = allowed | (bidirectional_q[:, :, None] > 0) & (bidirectional_k[:, None, :] > 0)
    mask = mask & allowed
  return mask[:, None]


class AttentionBias(NamedTuple):
  """What attention adds to its scores: `bias`, float and learned (the relative position bias,
  [1, heads, q, k], or [batch, heads, 1, k] in cached decoding), and `mask`, boolean
  ([batch, 1, q, k], False where a key must not be seen); either may be None."""
  bias: jax.Array | None
  mask: jax.Array | None


class Projection(nn.Module):
  """A bias-free projection whose kernel has its full multi-axis shape from the start.

  (flax's DenseGeneral initialises a flattened 2-D kernel and reshapes it, which breaks
  logical-axis metadata of rank 3.) `in_dims` leading kernel dims are contracted with as many
  trailing dims of x: computed as one 2-D matmul (`matmul.dense`, float32 accumulation), the
  kernel and x reshaped for free.
  """
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  in_dims: int
  stddev: float
  dtype: Dtype
  kernels: str = 'auto'
  lora: lora_lib.LoraConfig | None = None  # LoRA factors beside the kernel when it is a target
  deterministic: bool = True  # (LoRA dropout only)

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', param_init(self.stddev, self.axes), self.shape, jnp.float32)
    fan_in = int(np.prod(self.shape[:self.in_dims]))
    lead = x.shape[:x.ndim - self.in_dims]
    x = x.reshape(lead + (fan_in,))
    y = matmul.dense(x, kernel.reshape(fan_in, -1), self.dtype, kernels=self.kernels)
    if self.lora is not None and self.lora.targets_kernel(self.path):
      a, b = lora_lib.factors(self, self.lora, self.shape, self.axes, self.in_dims)
      y = y + lora_lib.delta(self, self.lora, x, a, b, self.dtype, self.deterministic, self.kernels)
    return y.reshape(lead + self.shape[self.in_dims:])


class Dense(nn.Module):
  """x[..., d] @ kernel[d, features], no bias (flax Dense's parameter layout and name); the
  result in `out_dtype` (default `dtype`)."""
  features: int
  axes: tuple[str, str]
  stddev: float
  dtype: Dtype
  out_dtype: Dtype | None = None
  kernels: str = 'auto'
  lora: lora_lib.LoraConfig | None = None  # as Projection's
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1], self.features)
    kernel = self.param('kernel', param_init(self.stddev, self.axes), shape, jnp.float32)
    y = matmul.dense(x, kernel, self.dtype, out_dtype=self.out_dtype, kernels=self.kernels)
    if self.lora is not None and self.lora.targets_kernel(self.path):
      a, b = lora_lib.factors(self, self.lora, shape, self.axes, 1)
      y = y + lora_lib.delta(self, self.lora, x, a, b, self.dtype, self.deterministic, self.kernels,
                             self.out_dtype)
    return y


class Kernel(nn.Module):
  """A float32 matmul weight alone, as `Dense` would hold it (its parameter `kernel`), for a
  caller that does the matmul itself."""
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  stddev: float
  lora: lora_lib.LoraConfig | None = None  # as Projection's

  @nn.compact
  def __call__(self, x=None, dtype=None, deterministic: bool = True, kernels: str = 'auto'):
    """The kernel [d, f] (with LoRA: merged, W + (alpha / r) A B); or, given `x`, the float32
    x @ W + LoRA branch computed apart (peft's form, for LoRA dropout in training)."""
    kernel = self.param('kernel', param_init(self.stddev, self.axes), self.shape, jnp.float32)
    ab = None
    if self.lora is not None and self.lora.targets_kernel(self.path):
      ab = lora_lib.factors(self, self.lora, self.shape, self.axes, 1)
    if x is None:
      return kernel if ab is None else lora_lib.merged(kernel, *ab, self.lora)
    y = matmul.dense(x, kernel, dtype, out_dtype=jnp.float32, kernels=kernels)
    if ab is not None:
      y = y + lora_lib.delta(self, self.lora, x, *ab, dtype, deterministic, kernels, jnp.float32)
    return y


class MultiHeadAttention(nn.Module):
  """T5 attention: no biases, no 1/sqrt(head_dim) logit scaling (folded into the query init).

  Key/value cache for autoregressive decoding, in the mutable 'cache' collection (the flax/T5X
  way; both flags off is the training path, untouched):
  - `prefill`: an ordinary full-length call that also stores its keys/values as `cached_key` /
    `cached_value` [batch, cache_length, heads, kv] (positions past the call's length are zero);
    cross-attention stores the encoder's keys/values whole, so they are computed once.
  - `decode`: one new query per call. Self-attention writes its key/value at `cache_index`
    ([batch] int32, per example, since prompts differ in length) and attends over the whole cache;
    `bias.mask` ([batch, 1, 1, cache_length]) hides the slots not written yet. Cross-attention
    reads the stored encoder keys/values; `inputs_kv` is unused.
  """
  num_heads: int
  head_dim: int
  dtype: Dtype
  dropout_rate: float
  deterministic: bool
  decode: bool = False
  prefill: bool = False
  cross: bool = False  # cross-attention: cached keys/values never change during decoding
  cache_length: int = 0  # self-attention cache slots (prefill)
  kernels: str = 'auto'
  lora: lora_lib.LoraConfig | None = None  # LoRA on the projections that model.lora_targets name

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None, bias: AttentionBias,
               cache_index: jax.Array | None = None) -> jax.Array:
    d_model = inputs_q.shape[-1]
    inner = self.num_heads * self.head_dim
    shape, axes = (d_model, self.num_heads, self.head_dim), ('embed', 'heads', 'kv')
    proj = lambda stddev, name: Projection(shape, axes, 1, stddev, self.dtype, self.kernels, self.
                                           lora, self.deterministic, name=name)
    act = ('act_batch', 'act_length', 'act_heads', 'act_kv')
    # Initialisation as in mesh-tensorflow T5: query carries the extra head_dim**-0.5.
    q = proj((d_model * self.head_dim)**-0.5, 'query')(inputs_q)
    if self.cross and self.decode:
      k = self.get_variable('cache', 'cached_key')
      v = self.get_variable('cache', 'cached_value')
    else:
      k = proj(d_model**-0.5, 'key')(inputs_kv)
      v = proj(d_model**-0.5, 'value')(inputs_kv)
    q, k, v = constrain(q, act), constrain(k, act), constrain(v, act)
    if self.prefill or self.decode:
      k, v = self._cache(k, v, cache_index, act)

    keep = None
    if self.dropout_rate > 0 and not self.deterministic:  # dropout on the attention weights
      keep_rate = 1.0 - self.dropout_rate
      shape = (q.shape[0], self.num_heads, q.shape[1], k.shape[1])
      keep = (jax.random.bernoulli(self.make_rng('dropout'), keep_rate, shape).astype(self.dtype)
              / keep_rate)
    out = attention.dot_product_attention(q, k, v, bias.bias, bias.mask, self.dtype, keep,
                                          self.kernels)
    out = constrain(out, act)
    return Projection((self.num_heads, self.head_dim, d_model), ('heads', 'kv', 'embed'), 2,
                      inner**-0.5, self.dtype, self.kernels, self.lora, self.deterministic,
                      name='out')(out)

  def _cache(self, k, v, cache_index, act):
    """Stores (prefill) or extends (decode) the cache; returns the keys/values to attend to."""
    if self.cross:
      if self.prefill:
        self.put_variable('cache', 'cached_key', k)
        self.put_variable('cache', 'cached_value', v)
      return k, v
    if self.prefill:
      pad = ((0, 0), (0, self.cache_length - k.shape[1]), (0, 0), (0, 0))
      self.put_variable('cache', 'cached_key', constrain(jnp.pad(k, pad), act))
      self.put_variable('cache', 'cached_value', constrain(jnp.pad(v, pad), act))
      return k, v
    cached_k = self.get_variable('cache', 'cached_key')
    cached_v = self.get_variable('cache', 'cached_value')
    # A one-hot select rather than a scatter: every example writes its own slot, and the update
    # is elementwise, so it shards like the cache itself (T5X uses one-hot updates for this too).
    slot = (jnp.arange(cached_k.shape[1])[None, :] == cache_index[:, None])[:, :, None, None]
    k = constrain(jnp.where(slot, k.astype(cached_k.dtype), cached_k), act)
    v = constrain(jnp.where(slot, v.astype(cached_v.dtype), cached_v), act)
    self.put_variable('cache', 'cached_key', k)
    self.put_variable('cache', 'cached_value', v)
    return k, v


class MlpBlock(nn.Module):
  """T5's MLP. `activation` relu (T5 v1.0): relu(x wi) then `wo`; gated-X (T5.1.1 gated-gelu,
  UL2 gated-silu, gated-relu): X(x wi_0) * (x wi_1) then `wo` (presets.MLP_ACTIVATIONS)."""
  d_ff: int
  activation: str
  dtype: Dtype
  dropout_rate: float
  deterministic: bool
  kernels: str = 'auto'
  lora: lora_lib.LoraConfig | None = None  # LoRA on the kernels that model.lora_targets name

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    if self.activation.startswith('gated-'):
      kernel = lambda name: Kernel((d_model, self.d_ff),
                                   ('embed', 'mlp'), d_model**-0.5, self.lora, name=name)
      gate = self.activation[len('gated-'):]
      adapted = self.lora is not None and any(
          self.lora.targets_kernel(self.path + (n,)) for n in ('wi_0', 'wi_1'))
      if adapted and (self.lora.dropout_active(self.deterministic)
                      or jnp.dtype(self.dtype) != jnp.float32):
        # x W and the LoRA branch apart, then the gate: for LoRA dropout (on the branch's input
        # only), and below float32, where W + (alpha / r) A B cast to the compute dtype would
        # round most of a small update away (a bf16 step of W is far larger than it at first).
        pre = [kernel(n)(x, self.dtype, self.deterministic, self.kernels) for n in ('wi_0', 'wi_1')]
        h = (matmul.GATE_ACTIVATIONS[gate](pre[0]) * pre[1]).astype(self.dtype)
      else:  # both matmuls and the gate in one custom VJP (matmul.gated)
        h = matmul.gated(x, kernel('wi_0')(), kernel('wi_1')(), self.dtype, gate, self.kernels)
    elif self.activation == 'relu':
      h = nn.relu(
          Dense(self.d_ff, ('embed', 'mlp'), d_model**-0.5, self.dtype, kernels=self.kernels,
                lora=self.lora, deterministic=self.deterministic, name='wi')(x))
    else:
      raise ValueError(f'unknown MLP activation {self.activation!r}; valid: relu, gated-gelu, '
                       'gated-silu, gated-relu')
    h = constrain(h, ('act_batch', 'act_length', 'act_mlp'))
    if self.dropout_rate > 0 and not self.deterministic:
      h = nn.Dropout(self.dropout_rate)(h, deterministic=False)
    return Dense(d_model, ('mlp', 'embed'), self.d_ff**-0.5, self.dtype, kernels=self.kernels,
                 lora=self.lora, deterministic=self.deterministic, name='wo')(h)


class Embed(nn.Module):
  """Token embedding (`vocab x embed`, N(0, 1) init as in T5); `attend` gives tied logits."""
  num_embeddings: int
  features: int
  dtype: Dtype
  kernels: str = 'auto'

  def setup(self):
    self.embedding = self.param('embedding', param_init(1.0, ('vocab', 'embed')),
                                (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    # The table stays in its parameter sharding ([vocab/tensor, embed/fsdp]): each device looks up
    # its ids in its own rows and columns (an all-reduce over tensor adds the vocab parts), the ids
    # split over the batch axes that `embed` does not use (data), so that the rows come out
    # [batch/data, length, embed/fsdp]; the batch's sharding, [batch/(data, fsdp), ...], is then
    # one all-to-all over fsdp away. Left to itself, XLA's partitioner keeps fsdp on `embed` but
    # also splits the ids over fsdp, and on a mesh with data and fsdp both > 1 can reshard the
    # rows (and the gradient's updates) only by a full replication ("Involuntary full
    # rematerialization", per lookup and per gradient; tests/test_no_remat.py).
    rules = nn.get_logical_axis_rules()
    batch = _mesh_axes(nn.logical_to_mesh_axes(('act_batch',), rules))
    embed = _mesh_axes(nn.logical_to_mesh_axes(('embed',), rules))
    lookup_rules = (('lookup_batch', tuple(a for a in batch if a not in embed)
                     or None), ('lookup_embed', embed or None))
    length = ('act_length',) * (ids.ndim - 1)
    ids = constrain(ids, ('lookup_batch',) + (None,) * (ids.ndim - 1), lookup_rules)
    rows = jnp.take(self.embedding, ids, axis=0)
    rows = constrain(rows, ('lookup_batch',) + (None,) * (ids.ndim - 1) + ('lookup_embed',),
                     lookup_rules)
    return constrain(rows, ('act_batch',) + length + ('act_embed',)).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return matmul.dense(x, self.embedding, self.dtype, transpose_kernel=True, out_dtype=jnp.float32,
                        kernels=self.kernels)
