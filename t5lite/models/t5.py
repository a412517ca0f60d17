"""T5 encoder-decoder and decoder-only (causal / prefix) language models in flax.linen.

Used functionally: `model.init(rngs, **batch)` and `model.apply(variables, **batch, ...)`, no
hidden state. Inputs use the seqio/T5X feature names; packed batches pass segment ids, and the
masks keep attention inside one example. Relative position biases depend only on distance, which
is the same inside a contiguous packed segment as in the example alone, so positions need not
be passed to the model (they are part of the batch for tools that want them).

Autoregressive decoding (t5lite/models/decoding.py) uses two extra modes of the decoder, with a
key/value cache in the mutable 'cache' collection (see `layers.MultiHeadAttention`):
`prefill=True` runs a full-length call (the start token, or a decoder-only prompt) and fills the
cache, sized `cache_length`; `decode=True` then feeds one token per example per call. The
decoder's `cache_index` [batch] holds each example's next position. Neither flag changes the
training path.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from t5lite.models import kernels as kernels_lib
from t5lite.models import layers
from t5lite.models import prompt as prompt_lib
from t5lite.models.kernels import matmul
from t5lite.models.presets import ModelConfig

_REMAT_POLICIES = {
    # Keep the results of weight matmuls (no batch dims), recompute attention and elementwise ops.
    'minimal': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'full': None,  # keep nothing: recompute the whole layer in the backward pass
}


def _relpos(cfg: ModelConfig, bidirectional: bool) -> layers.RelativePositionBias:
  """A stack's relative position bias or, with `relpos_per_layer`, one layer's (UMT5)."""
  return layers.RelativePositionBias(cfg.relative_attention_num_buckets,
                                     cfg.relative_attention_max_distance, cfg.num_heads,
                                     bidirectional=bidirectional, name='relpos_bias')


def _self_bias(relpos: layers.RelativePositionBias, length: int, cache_length: int = 0, index=None):
  """Self-attention's position bias: [1, heads, length, length]; in cached decoding (`index`, the
  [batch] positions of the one new query each), the rows [batch, heads, 1, cache_length]."""
  if index is not None:
    return relpos(1, cache_length, query_positions=index)
  return relpos(length, length)


class EncoderLayer(nn.Module):
  """Self-attention, MLP; pre-norm residual. With `relpos_per_layer` the layer adds its own
  position bias to `bias` (whose `bias` is then None); else the stack's is in `bias`."""
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x, bias):
    c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    if c.relpos_per_layer:
      bias = bias._replace(bias=_self_bias(_relpos(c, True), x.shape[1]))
    dropout = nn.Dropout(c.dropout_rate, deterministic=self.deterministic)
    h = layers.RMSNorm(dtype=dtype, kernels=c.kernels, name='pre_attention_norm')(x)
    h = layers.MultiHeadAttention(c.num_heads, c.head_dim, dtype, c.dropout_rate,
                                  self.deterministic, kernels=c.kernels, lora=c.lora,
                                  name='attention')(h, h, bias)
    x = x + dropout(h)
    h = layers.RMSNorm(dtype=dtype, kernels=c.kernels, name='pre_mlp_norm')(x)
    h = layers.MlpBlock(c.d_ff, c.activation, dtype, c.dropout_rate, self.deterministic,
                        kernels=c.kernels, lora=c.lora, name='mlp')(h)
    x = layers.constrain(x + dropout(h), ('act_batch', 'act_length', 'act_embed'))
    return x, None


class DecoderLayer(nn.Module):
  """Self-attention, cross-attention (when `cross_bias` is given), MLP; all pre-norm residual.

  `decode` / `prefill` / `cache_length` select the cached decoding modes (module docstring);
  `encoded` may then be None in `decode` mode, the encoder's keys/values being cached. With
  `relpos_per_layer` the layer adds its own position bias to `self_bias` (as EncoderLayer).
  """
  cfg: ModelConfig
  deterministic: bool
  decode: bool = False
  prefill: bool = False
  cache_length: int = 0

  @nn.compact
  def __call__(self, x, self_bias, encoded, cross_bias, cache_index=None):
    c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    dropout = nn.Dropout(c.dropout_rate, deterministic=self.deterministic)
    attention = lambda name, cross: layers.MultiHeadAttention(
        c.num_heads, c.head_dim, dtype, c.dropout_rate, self.deterministic, decode=self.decode,
        prefill=self.prefill, cross=cross, cache_length=self.cache_length, kernels=c.kernels,
        name=name, lora=c.lora)
    if c.relpos_per_layer:
      index = cache_index if self.decode else None
      relpos = _self_bias(_relpos(c, False), x.shape[1], self.cache_length, index)
      self_bias = self_bias._replace(bias=relpos)
    h = layers.RMSNorm(dtype=dtype, kernels=c.kernels, name='pre_self_attention_norm')(x)
    x = x + dropout(attention('self_attention', False)(h, h, self_bias, cache_index))
    if cross_bias is not None:
      h = layers.RMSNorm(dtype=dtype, kernels=c.kernels, name='pre_cross_attention_norm')(x)
      x = x + dropout(attention('encoder_decoder_attention', True)(h, encoded, cross_bias))
    h = layers.RMSNorm(dtype=dtype, kernels=c.kernels, name='pre_mlp_norm')(x)
    h = layers.MlpBlock(c.d_ff, c.activation, dtype, c.dropout_rate, self.deterministic,
                        kernels=c.kernels, lora=c.lora, name='mlp')(h)
    x = layers.constrain(x + dropout(h), ('act_batch', 'act_length', 'act_embed'))
    return x, None


def _run_layers(parent: nn.Module, layer_cls, num_layers: int, cfg: ModelConfig,
                deterministic: bool, x, *args, **layer_kwargs):
  """Applies `num_layers` layers, scanned (params stacked on a `layers` axis) or unrolled.

  `layer_kwargs` (the decoding modes) go to each layer's constructor. Scanned, the 'cache'
  collection gets a leading layers axis like the parameters.
  """
  caching = layer_kwargs.get('decode', False) or layer_kwargs.get('prefill', False)
  # Remat only saves activations for a backward pass; decoding has none, so it is left out there
  # (the parameter tree is the same either way: lifted transforms add no scope).
  if cfg.remat_policy != 'none' and not caching:
    layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                         prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    stack = nn.scan(layer_cls, variable_axes={'params': 0, 'cache': 0},
                    split_rngs={'params': True,
                                'dropout': True}, in_axes=(nn.broadcast,) * len(args),
                    length=num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = stack(cfg, deterministic, **layer_kwargs, name='layers', parent=parent)(x, *args)
    return x
  for i in range(num_layers):
    x, _ = layer_cls(cfg, deterministic, **layer_kwargs, name=f'layers_{i}', parent=parent)(x,
                                                                                            *args)
  return x


def _segments(tokens, segment_ids):
  return segment_ids if segment_ids is not None else (tokens > 0).astype(jnp.int32)


class Encoder(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, embedded, segments, deterministic: bool):
    c = self.cfg
    length = embedded.shape[1]
    # One bias for the stack (T5), or none here: each layer learns its own (relpos_per_layer).
    relpos = None if c.relpos_per_layer else _self_bias(_relpos(c, True), length)
    bias = layers.AttentionBias(relpos, layers.attention_mask(segments, segments))
    x = nn.Dropout(c.dropout_rate, deterministic=deterministic)(embedded)
    x = _run_layers(self, EncoderLayer, c.num_encoder_layers, c, deterministic, x, bias)
    x = layers.RMSNorm(dtype=jnp.dtype(c.dtype), kernels=c.kernels, name='final_norm')(x)
    return nn.Dropout(c.dropout_rate, deterministic=deterministic)(x)


class Decoder(nn.Module):
  """Causal decoder stack; given `encoder_segments` it cross-attends to `encoded`
  (encoder-decoder), else it is decoder-only.

  Cached decoding (module docstring): `prefill` also fills the cache (`cache_length` slots) and
  sets `cache_index` to `prefill_lengths` (default: the call's length); `decode` feeds one token
  per example at its `cache_index`, with the bias row of that position and a mask over the
  slots written so far.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, embedded, segments, deterministic: bool, encoded=None, encoder_segments=None,
               causal_attention=None, decode: bool = False, prefill: bool = False,
               prefill_lengths=None, cache_length: int = 0):
    c = self.cfg
    batch, length = embedded.shape[:2]
    # One bias for the stack (T5), or none here: each layer learns its own (relpos_per_layer).
    relpos = None if c.relpos_per_layer else _relpos(c, False)
    stack_bias = lambda *args: None if relpos is None else _self_bias(relpos, *args)
    extra, cache_kwargs = (), {}
    if decode:
      index = self.get_variable('cache', 'cache_index')
      written = jnp.arange(cache_length)[None, :] <= index[:, None]
      mask = written[:, None, None, :]
      self_bias = layers.AttentionBias(stack_bias(1, cache_length, index), mask)
      self.put_variable('cache', 'cache_index', index + 1)
      extra, cache_kwargs = (index,), dict(decode=True, cache_length=cache_length)
    else:
      self_bias = layers.AttentionBias(
          stack_bias(length),
          layers.attention_mask(segments, segments, causal=True, bidirectional_q=causal_attention,
                                bidirectional_k=causal_attention))
      if prefill:
        lengths = (jnp.full((batch,), length, jnp.int32)
                   if prefill_lengths is None else jnp.asarray(prefill_lengths, jnp.int32))
        self.put_variable('cache', 'cache_index', lengths)
        cache_kwargs = dict(prefill=True, cache_length=cache_length)
    cross_bias = None
    if encoder_segments is not None:
      cross_bias = layers.AttentionBias(None, layers.attention_mask(segments, encoder_segments))
    x = nn.Dropout(c.dropout_rate, deterministic=deterministic)(embedded)
    x = _run_layers(self, DecoderLayer, c.num_decoder_layers, c, deterministic, x, self_bias,
                    encoded, cross_bias, *extra, **cache_kwargs)
    x = layers.RMSNorm(dtype=jnp.dtype(c.dtype), kernels=c.kernels, name='final_norm')(x)
    return nn.Dropout(c.dropout_rate, deterministic=deterministic)(x)


def _make_embedder_and_head(module: nn.Module):
  """Shared token embedding and, for v1.1, the untied output layer (created in `setup`)."""
  c = module.cfg
  module.embedder = layers.Embed(c.vocab_size, c.d_model, jnp.dtype(c.dtype), c.kernels,
                                 name='token_embedder')
  if not c.tie_logits:
    # float32 logits straight from the matmul's accumulator (the loss wants them unrounded).
    module.logits_dense = layers.Dense(c.vocab_size, ('embed', 'vocab'), c.d_model**-0.5,
                                       jnp.dtype(c.dtype), out_dtype=jnp.float32, kernels=c.kernels,
                                       name='logits_dense')
  if c.prompt_length:
    module.prompt = prompt_lib.SoftPrompt(c.prompt_length, c.prompt_init_vocab, jnp.dtype(c.dtype),
                                          name='prompt')


def _with_prompt(module: nn.Module, embedded, *rows):
  """Prompt tuning (t5lite/models/prompt.py): [prompt; embedded] and each of `rows` (segment
  ids, flags) extended over the prompt; unchanged when model.prompt_length is 0."""
  length = module.cfg.prompt_length
  if not length:
    return (embedded,) + rows
  prompt = module.prompt(module.embedder.embedding)
  return (prompt_lib.prepend(prompt, embedded),) + tuple(prompt_lib.extend(r, length) for r in rows)


def _logits(module: nn.Module, x):
  c = module.cfg
  if c.tie_logits:
    # T5 v1.0 ties input and output embeddings and rescales by d_model**-0.5 (mesh-tf T5).
    logits = module.embedder.attend(x * (c.d_model**-0.5))
  else:
    logits = module.logits_dense(x)
  return layers.constrain(logits.astype(jnp.float32), ('act_batch', 'act_length', 'act_vocab'))


class EncoderDecoder(nn.Module):
  """T5 v1.0 / v1.1. `__call__` returns float32 logits [batch, target_length, vocab]."""
  cfg: ModelConfig

  def setup(self):
    _make_embedder_and_head(self)
    self.encoder = Encoder(self.cfg, name='encoder')
    self.decoder = Decoder(self.cfg, name='decoder')

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, deterministic=True):
    segments = _segments(encoder_input_tokens, encoder_segment_ids)
    embedded = layers.constrain(self.embedder(encoder_input_tokens),
                                ('act_batch', 'act_length', 'act_embed'))
    embedded, segments = _with_prompt(self, embedded, segments)
    return self.encoder(embedded, segments, deterministic)

  def decode(self, encoded, encoder_segments, decoder_input_tokens, decoder_segments,
             deterministic=True, decode: bool = False, prefill: bool = False, prefill_lengths=None,
             cache_length: int = 0):
    """Decoder logits. With `prefill` / `decode` (apply with mutable=['cache']), the cached
    decoding modes of the module docstring; in `decode` mode `encoded` may be None.
    `encoder_segments` are the tokens' (`encoded` also has the prompt's columns, added here)."""
    encoder_segments = prompt_lib.extend(encoder_segments, self.cfg.prompt_length)
    embedded = layers.constrain(self.embedder(decoder_input_tokens),
                                ('act_batch', 'act_length', 'act_embed'))
    x = self.decoder(embedded, decoder_segments, deterministic, encoded=encoded,
                     encoder_segments=encoder_segments, decode=decode, prefill=prefill,
                     prefill_lengths=prefill_lengths, cache_length=cache_length)
    return _logits(self, x)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, deterministic: bool = True, **unused: Any):
    del encoder_positions, decoder_positions, unused  # distances come from the layout; see module doc
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, deterministic)
    encoder_segments = _segments(encoder_input_tokens, encoder_segment_ids)
    if decoder_segment_ids is None:
      # Decoder inputs start with 0 (BOS), so padding is read off the targets when given.
      decoder_segment_ids = (jnp.ones_like(decoder_input_tokens) if decoder_target_tokens is None
                             else (decoder_target_tokens > 0).astype(jnp.int32))
    return self.decode(encoded, encoder_segments, decoder_input_tokens, decoder_segment_ids,
                       deterministic)


class DecoderOnly(nn.Module):
  """Causal LM; a prefix LM when `decoder_causal_attention` marks the (bidirectional) inputs."""
  cfg: ModelConfig

  def setup(self):
    _make_embedder_and_head(self)
    self.decoder = Decoder(self.cfg, name='decoder')

  def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
               decoder_positions=None, decoder_causal_attention=None, deterministic: bool = True,
               decode: bool = False, prefill: bool = False, prefill_lengths=None,
               cache_length: int = 0, **unused: Any):
    """Logits; `prefill` / `decode` as in `EncoderDecoder.decode` (module docstring). With a
    soft prompt (model.prompt_length = P) the prompt precedes the tokens: `cache_length` and
    `prefill_lengths` count tokens only (P more slots and positions are added here), and the
    logits are the tokens' alone."""
    del decoder_positions, unused
    prompt_length = self.cfg.prompt_length
    if decoder_segment_ids is None:
      decoder_segment_ids = (jnp.ones_like(decoder_input_tokens) if decoder_target_tokens is None
                             else (decoder_target_tokens > 0).astype(jnp.int32))
    embedded = layers.constrain(self.embedder(decoder_input_tokens),
                                ('act_batch', 'act_length', 'act_embed'))
    if prompt_length and not decode:  # decode: one new token; the prompt is in the cache
      embedded, decoder_segment_ids, decoder_causal_attention = _with_prompt(
          self, embedded, decoder_segment_ids, decoder_causal_attention)
      if prefill_lengths is not None:
        prefill_lengths = jnp.asarray(prefill_lengths, jnp.int32) + prompt_length
    if cache_length:
      cache_length += prompt_length
    x = self.decoder(embedded, decoder_segment_ids, deterministic,
                     causal_attention=decoder_causal_attention, decode=decode, prefill=prefill,
                     prefill_lengths=prefill_lengths, cache_length=cache_length)
    if prompt_length and not decode:
      x = x[:, prompt_length:]
    return _logits(self, x)


def make_model(cfg: ModelConfig, platform: str | None = None) -> nn.Module:
  """The flax module of `cfg`, its `kernels` resolved for `platform` (default: this process's
  default backend; t5lite.aot passes 'tpu' when compiling for a TPU topology on a CPU host).

  On CPU with bfloat16 the tuned kernels need bf16 x bf16 -> f32 dots: probed here, once, on the
  real backend, so that no probe runs while a step is traced."""
  kernels = kernels_lib.resolve(cfg.kernels, platform or jax.default_backend())
  if kernels == 'tuned' and cfg.dtype != 'float32':
    matmul.mixed_precision_supported()
  cfg = dataclasses.replace(cfg, kernels=kernels)
  if cfg.architecture == 'encoder_decoder':
    return EncoderDecoder(cfg)
  if cfg.architecture == 'decoder_only':
    return DecoderOnly(cfg)
  raise ValueError(f'unknown model.architecture {cfg.architecture!r}; valid: encoder_decoder, '
                   'decoder_only')
