"""Autoregressive decoding: greedy, temperature sampling (top-k, top-p) and beam search.

    out = decode(model, params, batch, DecodeConfig(method='beam', num_beams=4))
    out.tokens  # [batch, max_decode_length] int32: generated tokens, EOS included, 0 after it
    out.scores  # [batch] float32

`batch` is {'encoder_input_tokens': [B, L]} (0 = padding; optional 'encoder_segment_ids') for
an `EncoderDecoder`, whose decoder starts from token 0 as in T5; or, for a `DecoderOnly`,
{'decoder_prompt_tokens': [B, P]}: each row's prompt followed by 0s (right-padded, so prompts of
different lengths share a batch; a row of 0s is an empty prompt). The prompt is what follows
the BOS 0 in training (`decoder_input_tokens` = [0, prompt..., generated...]); `prefix_lm=True`
lets the prompt attend to itself in both directions, as `decoder_causal_attention` does in
training (the BOS and the prompt are the bidirectional part), else it is a causal LM.

Everything runs in one `jax.jit`: a prefill call (the start token, or the whole prompt at once)
fills the key/value cache, then a `lax.while_loop` feeds one token per example per step and
stops when every example has emitted EOS or `max_decode_length` tokens. Shapes are fixed, so
each (model, config, batch shape) compiles once. With `use_cache=False` every step re-runs the
decoder over the whole fixed-size token buffer instead (the encoder still runs once): slower,
used as a baseline by benchmarks/decoding.py. Given a `mesh`, decoding runs under the same
logical axis rules as training (parameters and batch are placed by them first).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite import partitioning

METHODS = ('greedy', 'sample', 'beam')
# Finite "minus infinity" for beam scores (as T5X): sums and divisions of it stay finite, so no
# inf - inf NaNs; any real log-probability is far above NEG_INF / 2.
NEG_INF = -1.0e7


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to decode. Hashable: it is part of the compiled function's cache key."""
  method: str = 'greedy'  # greedy | sample | beam
  max_decode_length: int = 64  # generated tokens per example (EOS included)
  temperature: float = 1.0  # sample: logits / temperature; 0 means argmax
  top_k: int = 0  # sample: keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # sample: keep the nucleus, the smallest set of most likely
  # tokens with probability >= top_p (Holtzman et al. 2019); 1 = off
  num_beams: int = 4  # beam
  length_penalty_alpha: float = 0.6  # beam: score = log p / ((5 + len) / 6) ** alpha
  eos_id: int = 1

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'DecodeConfig.method {self.method!r}; valid: {", ".join(METHODS)}')
    if self.max_decode_length < 1 or self.num_beams < 1 or self.top_k < 0:
      raise ValueError('DecodeConfig: max_decode_length and num_beams must be >= 1, top_k >= 0')
    if not 0.0 < self.top_p <= 1.0 or self.temperature < 0:
      raise ValueError('DecodeConfig: top_p must be in (0, 1] and temperature >= 0')


@flax.struct.dataclass
class DecodeOutput:
  tokens: jax.Array  # [batch, max_decode_length] int32; generated only, EOS included, 0 after
  scores: jax.Array  # [batch] float32; sum of token log-probs (beam: length-penalised score)


def length_penalty(length, alpha: float):
  """GNMT length penalty (Wu et al. 2016, eq. 14), as T5X's beam search uses it."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0)**alpha


# ----------------------------------------------------------------------------------------------
# Logit filters and token choice (greedy / sample)
# ----------------------------------------------------------------------------------------------


def _keep_only(logits: jax.Array, indices: jax.Array, keep: jax.Array) -> jax.Array:
  """Sets logits to -inf except where `keep` ([..., n], aligned with `indices`) is true."""
  rows = jnp.arange(logits.shape[0])[:, None]
  mask = jnp.zeros(logits.shape, bool).at[rows, indices].set(keep)
  return jnp.where(mask, logits, -jnp.inf)


def filter_logits(logits: jax.Array, cfg: DecodeConfig) -> jax.Array:
  """[N, V] logits -> logits / temperature with tokens outside top-k and top-p set to -inf.

  Top-k keeps exactly k tokens (ties broken by lower id, like argmax) and top-p then keeps the
  nucleus of what is left: sorted by probability, a token stays while the probability of the
  tokens before it is < top_p, so the most likely token always stays.
  """
  logits = logits.astype(jnp.float32)
  if cfg.temperature > 0:
    logits = logits / cfg.temperature
  vocab = logits.shape[-1]
  if 0 < cfg.top_k < vocab:
    _, top = jax.lax.top_k(logits, cfg.top_k)
    logits = _keep_only(logits, top, jnp.ones(top.shape, bool))
  if cfg.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1, stable=True)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    logits = _keep_only(logits, order, before < cfg.top_p)
  return logits


def _choose(rng, logits: jax.Array, cfg: DecodeConfig) -> jax.Array:
  if cfg.method == 'greedy' or cfg.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# The model as a step function: start(params, batch) -> (state, logits); step(params, state,
# tokens) -> (state, logits). `state` is the cache (or, uncached, the token buffer) plus what the
# step needs; its leaves have the batch on axis 0, or on axis 1 under a scanned 'layers' stack.
# ----------------------------------------------------------------------------------------------


def _batch_axis(path) -> int:
  return 1 if any(getattr(k, 'key', None) == 'layers' for k in path) else 0


def _beam_invariant(path) -> bool:
  """Leaves equal across the beams of one example (encoder side): never need reordering."""
  names = {getattr(k, 'key', None) for k in path}
  return bool(names & {'encoder_decoder_attention', 'encoder_segments', 'encoded'})


def _map_batch(fn, state, skip_invariant: bool = False):

  def apply(path, x):
    if skip_invariant and _beam_invariant(path):
      return x
    return fn(x, _batch_axis(path))

  return jax.tree_util.tree_map_with_path(apply, state)


def _last_token_logits(logits, positions):
  return jnp.take_along_axis(logits, positions[:, None, None], axis=1)[:, 0]


def _encdec_fns(model, length: int, use_cache: bool):
  """Encoder-decoder: encode once; the decoder starts from token 0 at position 0."""
  buffer = length + 1  # start token + generated; the last generated token is fed but unused

  def start(params, batch):
    tokens = batch['encoder_input_tokens']
    seg_ids = batch.get('encoder_segment_ids')
    encoder_segments = (seg_ids if seg_ids is not None else tokens > 0).astype(jnp.int32)
    encoded = model.apply({'params': params}, tokens, seg_ids, method='encode')
    first = jnp.zeros((tokens.shape[0], 1), jnp.int32)
    ones = jnp.ones_like(first)
    if use_cache:
      logits, variables = model.apply({'params': params}, encoded, encoder_segments, first, ones,
                                      prefill=True, cache_length=buffer, method='decode',
                                      mutable=['cache'])
      return {'cache': variables['cache'], 'encoder_segments': encoder_segments}, logits[:, 0]
    state = {
        'tokens': jnp.zeros((tokens.shape[0], buffer), jnp.int32), 'position': jnp.zeros(
            (tokens.shape[0],), jnp.int32), 'encoded': encoded, 'encoder_segments': encoder_segments
    }
    return state, _uncached(params, state)

  def _uncached(params, state):
    segments = (jnp.arange(buffer)[None, :] <= state['position'][:, None]).astype(jnp.int32)
    logits = model.apply({'params': params}, state['encoded'], state['encoder_segments'],
                         state['tokens'], segments, method='decode')
    return _last_token_logits(logits, state['position'])

  def step(params, state, tokens):
    if use_cache:
      logits, variables = model.apply({'params': params, 'cache': state['cache']}, None,
                                      state['encoder_segments'], tokens[:, None],
                                      jnp.ones_like(tokens)[:, None], decode=True,
                                      cache_length=buffer, method='decode', mutable=['cache'])
      return dict(state, cache=variables['cache']), logits[:, 0]
    state = _write_token(state, tokens)
    return state, _uncached(params, state)

  return start, step


def _write_token(state, tokens):
  position = state['position'] + 1
  slot = jnp.arange(state['tokens'].shape[1])[None, :] == position[:, None]
  return dict(state, position=position, tokens=jnp.where(slot, tokens[:, None], state['tokens']))


def _decoder_only_fns(model, length: int, use_cache: bool, prefix_lm: bool):
  """Decoder-only: [0, prompt] is prefilled at once, then generation continues each row."""

  def layout(batch):
    prompt = batch['decoder_prompt_tokens'].astype(jnp.int32)
    rows, width = prompt.shape
    positions = jnp.arange(1, width + 1)[None, :]
    # Row length (BOS included) = 1 + position of the last non-zero prompt token.
    lengths = 1 + jnp.max(jnp.where(prompt != 0, positions, 0), axis=1)
    tokens = jnp.concatenate(
        [jnp.zeros((rows, 1), jnp.int32), prompt,
         jnp.zeros((rows, length), jnp.int32)], axis=1)
    return tokens, lengths

  def start(params, batch):
    tokens, lengths = layout(batch)
    buffer = tokens.shape[1]
    in_prompt = (jnp.arange(buffer)[None, :] < lengths[:, None]).astype(jnp.int32)
    causal = in_prompt if prefix_lm else None
    if use_cache:
      width = buffer - length  # BOS + prompt columns
      logits, variables = model.apply(
          {'params': params}, tokens[:, :width], decoder_segment_ids=in_prompt[:, :width],
          decoder_causal_attention=None if causal is None else causal[:, :width], prefill=True,
          prefill_lengths=lengths, cache_length=buffer, mutable=['cache'])
      return {'cache': variables['cache']}, _last_token_logits(logits, lengths - 1)
    state = {'tokens': tokens, 'position': lengths - 1}
    if causal is not None:
      state['causal'] = causal
    return state, _uncached(params, state)

  def _uncached(params, state):
    buffer = state['tokens'].shape[1]
    segments = (jnp.arange(buffer)[None, :] <= state['position'][:, None]).astype(jnp.int32)
    logits = model.apply({'params': params}, state['tokens'], decoder_segment_ids=segments,
                         decoder_causal_attention=state.get('causal'))
    return _last_token_logits(logits, state['position'])

  def step(params, state, tokens):
    if use_cache:
      cache = state['cache']
      # The model's cache_length counts tokens; the cache also holds a soft prompt's slots.
      buffer = _cache_length(cache) - model.cfg.prompt_length
      logits, variables = model.apply({'params': params, 'cache': cache}, tokens[:, None],
                                      decoder_segment_ids=jnp.ones_like(tokens)[:, None],
                                      decode=True, cache_length=buffer, mutable=['cache'])
      return {'cache': variables['cache']}, logits[:, 0]
    state = _write_token(state, tokens)
    return state, _uncached(params, state)

  return start, step


def _cache_length(cache) -> int:
  """Slots of the self-attention cache (its cached_key's length axis)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
    names = [getattr(k, 'key', None) for k in path]
    if 'self_attention' in names and names[-1] == 'cached_key':
      return leaf.shape[_batch_axis(path) + 1]
  raise ValueError('no self-attention cache found')


# ----------------------------------------------------------------------------------------------
# Search loops
# ----------------------------------------------------------------------------------------------


def _sample_loop(start, step, params, batch, cfg: DecodeConfig, rng):
  """Greedy or sampling: one token per example per step until all have emitted EOS."""
  state, logits = start(params, batch)
  rows, length = logits.shape[0], cfg.max_decode_length

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < length) & ~jnp.all(done)

  def body(carry):
    i, state, logits, tokens, scores, done = carry
    token = _choose(jax.random.fold_in(rng, i), logits, cfg)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), token[:, None],
                                   axis=-1)[:, 0]
    token = jnp.where(done, 0, token)
    scores = scores + jnp.where(done, 0.0, log_prob)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    done = done | (token == cfg.eos_id)
    state, logits = step(params, state, token)
    return i + 1, state, logits, tokens, scores, done

  carry = (jnp.int32(0), state, logits, jnp.zeros(
      (rows, length), jnp.int32), jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), bool))
  _, _, _, tokens, scores, _ = jax.lax.while_loop(cond, body, carry)
  return DecodeOutput(tokens=tokens, scores=scores)


def _gather_beams(x, index):
  """x [B, K', ...], index [B, K] -> [B, K, ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_loop(start, step, params, batch, cfg: DecodeConfig):
  """Beam search with alive and finished beams, after T5X's `beam_search`.

  Each step extends the K alive beams by every token and takes the 2K best candidates by
  log-prob (2K, so that K survive even if K of them end). Candidates that end (EOS, or reaching
  max_decode_length, which also counts as finishing) join the finished pool scored by
  log p / length_penalty, but only if they rank among the top K candidates of the step (as in
  HuggingFace's beam scorer; T5X admits all 2K): this makes num_beams=1 exactly greedy search
  when alpha = 0, and changes nothing once K covers all candidates. The K best non-ending
  candidates stay alive. Stops when no alive beam can still beat the K-th finished score.
  """
  k, length, alpha = cfg.num_beams, cfg.max_decode_length, cfg.length_penalty_alpha
  state, logits = start(params, batch)
  batch_size, vocab = logits.shape
  if 2 * k > k * vocab:
    raise ValueError('beam search needs a vocabulary of at least 2 tokens')

  # Every example's K beams start identical: repeat the batch K times (rows b*K .. b*K+K-1).
  state = _map_batch(lambda x, axis: jnp.repeat(x, k, axis=axis), state)
  logits = jnp.repeat(logits, k, axis=0)
  alive_log_probs = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch_size, 1))

  def cond(carry):
    i, _, _, _, alive_log_probs, _, finished_scores = carry
    # The best any alive beam can reach: its log-prob can only fall, so it is bounded by the
    # current one over the largest length penalty still possible (alpha of either sign).
    best_penalty = jnp.maximum(length_penalty(length, alpha), length_penalty(i + 1, alpha))
    best_alive = alive_log_probs[:, 0] / best_penalty
    can_improve = best_alive > finished_scores[:, -1]
    return (i < length) & jnp.any(can_improve)

  def body(carry):
    i, state, logits, alive_seqs, alive_log_probs, finished_seqs, finished_scores = carry
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch_size, k, vocab)
    candidates = (log_probs + alive_log_probs[:, :, None]).reshape(batch_size, k * vocab)
    top_log_probs, top_index = jax.lax.top_k(candidates, 2 * k)
    parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    seqs = _gather_beams(alive_seqs, parent)
    seqs = jax.lax.dynamic_update_slice(seqs, token[:, :, None], (0, 0, i))
    real = top_log_probs > NEG_INF / 2
    ends = (token == cfg.eos_id) | (i == length - 1)

    # Finished pool: merge this step's ending candidates (top-K ranks only) with the old pool.
    new_scores = top_log_probs / length_penalty(i + 1, alpha)
    admit = ends & real & (jnp.arange(2 * k) < k)[None, :]
    new_scores = jnp.where(admit, new_scores, NEG_INF)
    pool_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
    pool_seqs = jnp.concatenate([finished_seqs, seqs], axis=1)
    finished_scores, keep = jax.lax.top_k(pool_scores, k)
    finished_seqs = _gather_beams(pool_seqs, keep)

    # Alive: the K best candidates that did not end.
    alive_log_probs, keep = jax.lax.top_k(jnp.where(ends | ~real, NEG_INF, top_log_probs), k)
    alive_seqs = _gather_beams(seqs, keep)
    rows = (jnp.arange(batch_size)[:, None] * k + _gather_beams(parent, keep)).reshape(-1)
    state = _map_batch(lambda x, axis: jnp.take(x, rows, axis=axis), state, skip_invariant=True)
    state, logits = step(params, state, _gather_beams(token, keep).reshape(-1))
    return (i + 1, state, logits, alive_seqs, alive_log_probs, finished_seqs, finished_scores)

  seqs = jnp.zeros((batch_size, k, length), jnp.int32)
  carry = (jnp.int32(0), state, logits, seqs, alive_log_probs, seqs,
           jnp.full((batch_size, k), NEG_INF, jnp.float32))
  carry = jax.lax.while_loop(cond, body, carry)
  finished_seqs, finished_scores = carry[5], carry[6]
  return DecodeOutput(tokens=finished_seqs[:, 0], scores=finished_scores[:, 0])


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _compiled(model, cfg: DecodeConfig, use_cache: bool, prefix_lm: bool, mesh, rules):
  """One jitted decode per (model, config, mode, mesh, rules). The mesh and rules are part of
  the key because the sharding constraints they resolve to are fixed at trace time; the jitted
  function enters them itself (partitioning.jit)."""
  if model.cfg.architecture == 'encoder_decoder':
    start, step = _encdec_fns(model, cfg.max_decode_length, use_cache)
  else:
    start, step = _decoder_only_fns(model, cfg.max_decode_length, use_cache, prefix_lm)

  def run(params, batch, rng):
    if cfg.method == 'beam':
      return _beam_loop(start, step, params, batch, cfg)
    return _sample_loop(start, step, params, batch, cfg, rng)

  return partitioning.jit(run, mesh, rules)


def jitted_decode(model: nn.Module, cfg: DecodeConfig, mesh, rules, *, prefix_lm: bool = False,
                  use_cache: bool = True) -> partitioning.Partitioned:
  """The jitted `(params, batch, rng) -> DecodeOutput` that `decode` calls, for ahead-of-time
  lowering from ShapeDtypeStructs (t5lite.aot); `batch` holds only the inputs `decode` keeps."""
  return _compiled(model, cfg, use_cache, prefix_lm, mesh, partitioning.rules_tuple(rules))


@functools.lru_cache(maxsize=16)
def _param_shardings(model, mesh, rules):
  """From the logical axis names the parameters carry (traced abstractly, nothing allocated)."""
  return partitioning.abstract_params(model, mesh, rules)[1]


def decode(model: nn.Module, params: Any, batch: dict[str, Any], cfg: DecodeConfig,
           rng: jax.Array | None = None, *, prefix_lm: bool = False, use_cache: bool = True,
           mesh=None, rules=None) -> DecodeOutput:
  """Decodes a batch (module docstring for the batch layout). `rng` seeds sampling (default
  PRNGKey(0)); `prefix_lm` makes a decoder-only prompt bidirectional; `mesh` and `rules`
  (default: partitioning.DEFAULT_RULES) run it sharded under those logical axis rules."""
  key = 'encoder_input_tokens' if model.cfg.architecture == 'encoder_decoder' else (
      'decoder_prompt_tokens')
  if key not in batch:
    raise KeyError(f'decoding a {model.cfg.architecture} model needs batch[{key!r}]')
  batch = {
      k: jnp.asarray(v, jnp.int32) for k, v in batch.items() if k in (key, 'encoder_segment_ids')
  }
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if mesh is None:
    return _compiled(model, cfg, use_cache, prefix_lm, None, None)(params, batch, rng)
  rules = partitioning.rules_tuple(rules if rules is not None else partitioning.DEFAULT_RULES)
  # Parameters by their logical axis names, rows over the `batch` rule's mesh axes (no-ops
  # for arrays already placed so, e.g. a train state's parameters).
  params = jax.device_put(params, _param_shardings(model, mesh, rules))
  batch = jax.device_put(batch, partitioning.batch_sharding(mesh, rules))
  return _compiled(model, cfg, use_cache, prefix_lm, mesh, rules)(params, batch, rng)
