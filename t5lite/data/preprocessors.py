"""Token-level preprocessors in plain numpy: chunking and T5 span corruption.

Span corruption is the T5 pretraining objective (Raffel et al. 2020, "Exploring
the Limits of Transfer Learning with a Unified Text-to-Text Transformer",
section 3.1.4; reference implementation `t5.data.preprocessors.span_corruption`
/ `random_spans_noise_mask`). A fraction `noise_density` of the tokens, in
spans of mean length `mean_noise_span_length`, is dropped from the inputs; each
dropped span is replaced by one sentinel, and the targets list the dropped
spans, each led by its sentinel:

    tokens   a b c d e f g
    mask     . . X X . X .
    inputs   a b <s0> e <s1> g EOS
    targets  <s0> c d <s1> f EOS

Sentinel k (k = 0, 1, ...) is id `vocab_size - 1 - k` (T5's `<extra_id_k>`).
All randomness comes from a caller-supplied `np.random.Generator`, so the
pipeline can derive it from (seed, element index) and stay deterministic.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from t5lite.data.vocab import EOS_ID

NUM_SENTINELS = 100  # T5's extra_ids


def noise_span_counts(length: int, noise_density: float,
                      mean_noise_span_length: float) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) for a sequence of `length` tokens.

    T5's formulas: round(length * density) noise tokens, clipped so at least one
    token is noise and one is not; round(noise / mean) spans, at least one.
    We also cap spans at the number of non-noise tokens (only reachable with
    extreme densities): the interleaving needs a non-empty non-noise segment
    before every noise span.
    """
  num_noise = int(round(length * noise_density))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  num_spans = min(num_spans, length - num_noise)
  return num_noise, num_spans


def random_spans_helper(inputs_length: int, noise_density: float,
                        mean_noise_span_length: float) -> tuple[int, int]:
  """Raw chunk length whose span-corrupted inputs (+EOS) are exactly `inputs_length`.

    Follows `t5.data.preprocessors.random_spans_helper`: corrupting L tokens
    gives inputs of L - noise + spans + 1 tokens (one sentinel per span, plus
    EOS) and targets of noise + spans + 1; return the largest L whose inputs
    fit, and the resulting targets length. E.g. (512, 0.15, 3.0) -> (568, 114).
    """
  if inputs_length < 2:
    raise ValueError(f'inputs_length must be >= 2, got {inputs_length}.')

  def lengths(tokens_length: int) -> tuple[int, int]:
    noise, spans = noise_span_counts(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length - noise + spans + 1, noise + spans + 1

  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, lengths(tokens_length)[1]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Lengths of a uniformly random partition of num_items into non-empty segments.

    Same distribution as T5's shuffle-the-segment-starts trick: choose
    num_segments - 1 distinct cut points among the num_items - 1 gaps.
    """
  cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """Boolean mask of `length` with T5-style random noise spans (True = noise).

    The noise tokens are split into num_spans non-empty spans and the other
    tokens into as many non-empty runs; they alternate, starting with a
    non-noise run, so the mask never starts with noise and always ends with it.
    """
  if length < 2:
    raise ValueError(f'span corruption needs at least 2 tokens, got {length}.')
  num_noise, num_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  # [nonnoise_0, noise_0, nonnoise_1, noise_1, ...]
  run_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  is_noise_run = np.tile([False, True], num_spans)
  return np.repeat(is_noise_run, run_lengths)


def corrupt_with_mask(tokens: np.ndarray, noise_mask: np.ndarray, vocab_size: int,
                      eos_id: int = EOS_ID,
                      num_sentinels: int = NUM_SENTINELS) -> dict[str, np.ndarray]:
  """Span-corrupts `tokens` with a given mask (see the module docstring).

    Works for any mask, also one that starts with noise. Raises ValueError when
    the mask has more spans than there are sentinels.
    """
  tokens = np.asarray(tokens)
  noise_mask = np.asarray(noise_mask, dtype=bool)
  if tokens.ndim != 1 or tokens.shape != noise_mask.shape:
    raise ValueError(f'tokens {tokens.shape} and noise_mask {noise_mask.shape} '
                     'must be 1-D and of the same shape.')
  prev = np.concatenate([[False], noise_mask[:-1]])
  span_start = noise_mask & ~prev
  num_spans = int(span_start.sum())
  if num_spans > num_sentinels:
    raise ValueError(f'{num_spans} noise spans but only {num_sentinels} sentinels; '
                     'use shorter sequences or a larger mean_noise_span_length.')
  sentinels = vocab_size - 1 - np.arange(num_spans)
  eos = np.array([eos_id])

  # Inputs: each span start becomes its sentinel, the rest of the span goes.
  inputs = tokens.copy()
  inputs[span_start] = sentinels
  inputs = inputs[~noise_mask | span_start]

  # Targets: the noise tokens, with each span's sentinel inserted before it.
  noise_tokens = tokens[noise_mask]
  start_in_noise = np.cumsum(noise_mask)[span_start] - 1
  targets = np.insert(noise_tokens, start_in_noise, sentinels)

  return {
      'inputs': np.concatenate([inputs, eos]).astype(np.int32),
      'targets': np.concatenate([targets, eos]).astype(np.int32)
  }


def span_corruption(tokens: np.ndarray, rng: np.random.Generator, vocab_size: int,
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                    eos_id: int = EOS_ID) -> dict[str, np.ndarray]:
  """T5 span corruption of one token sequence (>= 2 tokens) -> {'inputs', 'targets'}.

    Both outputs are int32 and EOS-terminated. With T5's defaults (0.15, 3.0),
    100 sentinels are enough for sequences up to about 2000 tokens; beyond that
    a ValueError says so.
    """
  tokens = np.asarray(tokens)
  mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
  return corrupt_with_mask(tokens, mask, vocab_size, eos_id=eos_id)


def merge_span_corruption(inputs: np.ndarray, targets: np.ndarray, vocab_size: int,
                          eos_id: int = EOS_ID, num_sentinels: int = NUM_SENTINELS) -> np.ndarray:
  """Inverse of `span_corruption`: puts each target span back at its sentinel.

    Everything from the first EOS on (and padding zeros) is ignored. A sentinel
    in the inputs with no span in the targets (e.g. targets truncated) is kept.
    """

  def strip(x):
    x = np.asarray(x)
    eos = np.flatnonzero(x == eos_id)
    x = x[:eos[0]] if len(eos) else x
    return x[x != 0]

  inputs, targets = strip(inputs), strip(targets)
  first_sentinel = vocab_size - num_sentinels
  spans: dict[int, list[int]] = {}
  current = None
  for t in targets.tolist():
    if t >= first_sentinel:
      current = spans.setdefault(t, [])
    elif current is not None:
      current.append(t)
  out: list[int] = []
  for t in inputs.tolist():
    if t >= first_sentinel and t in spans:
      out.extend(spans[t])
    else:
      out.append(t)
  return np.asarray(out, dtype=np.int32)


def split_tokens(documents_tokens: Iterable[Iterable[int]], length: int) -> list[np.ndarray]:
  """Concatenates all documents and cuts the stream into chunks of `length`.

    As T5's `reduce_concat_tokens` + `split_tokens` for pretraining: documents
    run into each other with no separator, so no token is wasted on padding.
    The last chunk is kept even if shorter (it is the only short one).
    """
  if length < 1:
    raise ValueError(f'length must be >= 1, got {length}.')
  parts = [
      np.asarray(list(d) if not isinstance(d, np.ndarray) else d, dtype=np.int32)
      for d in documents_tokens
  ]
  stream = np.concatenate(parts) if parts else np.zeros([0], np.int32)
  return [stream[i:i + length] for i in range(0, len(stream), length)]


# ---------------------------------------------------------------------------
# Task preprocessors: small per-example steps composed by `t5lite.data.tasks`.
#
# Every step has the signature `step(example: dict, ctx: Context) -> dict`
# (bind its options with functools.partial; partials of these top-level
# functions pickle, so grain worker processes can run them). `ctx` carries the
# task name, its output features, the feature lengths of this run and an rng
# keyed by (seed, element index), so a step is a pure function of its input.
#
# Objective steps (span corruption, prefix LM, ...) read token ids and return
# 'inputs'/'targets' *without* EOS: the task appends EOS to every output
# feature with add_eos=True as its last step, after trimming to the length.
# ---------------------------------------------------------------------------

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence


class NeedsLengthsError(ValueError):
  """A step that sizes its output by the feature lengths (a random chunk, a concatenate-and-split)
  ran without them: the caller must say the lengths (the evaluator then uses the training ones)."""


class InvalidExampleError(ValueError):
  """An example lacks a feature or has an empty one.

    The task pipeline turns it into a dropped example (counted) when the task
    has `drop_invalid=True`; otherwise it propagates with the task and feature
    named in the message.
    """


@dataclasses.dataclass
class Context:
  """What a step may know besides the example. All fields optional."""
  task_name: str = '<no task>'
  output_features: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  sequence_length: Mapping[str, int] | None = None
  rng: np.random.Generator | None = None


def _get(example: Mapping[str, Any], key: str, ctx: Context):
  if key not in example:
    raise InvalidExampleError(f'task {ctx.task_name!r}: example has no feature {key!r} '
                              f'(it has {sorted(example)}).')
  return example[key]


def _vocab(ctx: Context, key: str):
  feature = ctx.output_features.get(key) or ctx.output_features.get('targets')
  if feature is None:
    raise ValueError(f'task {ctx.task_name!r}: no output feature {key!r} to take a '
                     'vocabulary from.')
  return feature.vocabulary


def rekey(example, ctx: Context, key_map: Mapping[str, str | None]):
  """{new: example[old]}; old None makes an empty string. Other keys are dropped."""
  return {new: ('' if old is None else _get(example, old, ctx)) for new, old in key_map.items()}


def tokenize(example, ctx: Context, keys: Sequence[str] | None = None):
  """Encodes string features with their output feature's vocabulary (no EOS).

    `keys` defaults to the task's output features present in the example;
    features that are already token arrays are left as they are.
    """
  out = dict(example)
  for key in (keys if keys is not None else [k for k in ctx.output_features if k in example]):
    value = _get(example, key, ctx)
    if isinstance(value, bytes):
      value = value.decode('utf-8')
    if isinstance(value, str):
      out[key] = np.asarray(_vocab(ctx, key).encode(value), np.int32)
  return out


def trim(example, ctx: Context, reserve_eos: bool = True):
  """Cuts each output feature to its length in ctx.sequence_length (minus 1 for EOS)."""
  if not ctx.sequence_length:
    return example
  out = dict(example)
  for key, feature in ctx.output_features.items():
    if key in out and key in ctx.sequence_length:
      keep = ctx.sequence_length[key] - (1 if reserve_eos and feature.add_eos else 0)
      out[key] = np.asarray(out[key])[:max(keep, 0)]
  return out


def append_eos(example, ctx: Context):
  """Appends EOS to every output feature whose add_eos is True."""
  out = dict(example)
  for key, feature in ctx.output_features.items():
    if key in out and feature.add_eos:
      out[key] = np.concatenate([np.asarray(out[key], np.int32),
                                 [feature.vocabulary.eos_id]]).astype(np.int32)
  return out


def _tokens(example, ctx: Context, key: str) -> np.ndarray:
  tokens = np.asarray(_get(example, key, ctx))
  if tokens.dtype.kind not in 'iu':
    raise ValueError(f'task {ctx.task_name!r}: feature {key!r} must be token ids here; '
                     'put a `tokenize` step before the objective.')
  return tokens.astype(np.int32)


def causal_lm(example, ctx: Context, key: str = 'targets'):
  """Language modelling: the whole sequence is the target (decoder-only)."""
  return {'targets': _tokens(example, ctx, key)}


def _split_range(n: int, inputs_room: int | None, targets_room: int | None) -> tuple[int, int]:
  """Split points s (inputs = tokens[:s]) with both sides non-empty and fitting."""
  lo, hi = 1, n - 1
  if targets_room is not None:
    lo = max(lo, n - targets_room)
  if inputs_room is not None:
    hi = min(hi, inputs_room)
  if lo > hi:
    raise ValueError(f'cannot split {n} tokens into inputs <= {inputs_room} and '
                     f'targets <= {targets_room}, both non-empty.')
  return lo, hi


def _rooms(ctx: Context, reserved_inputs: int = 0):
  """Token room per side before EOS (and `reserved_inputs`, e.g. a mode token)."""
  lengths = ctx.sequence_length or {}

  def room(key, extra):
    if key not in lengths:
      return None
    feature = ctx.output_features.get(key)
    return lengths[key] - extra - (1 if feature is None or feature.add_eos else 0)

  return room('inputs', reserved_inputs), room('targets', 0)


def prefix_lm(example, ctx: Context, key: str = 'targets'):
  """Prefix LM: split at a uniformly random point; prefix -> inputs, rest -> targets.

    The split point is uniform over the points that leave both parts non-empty
    and, when ctx.sequence_length gives 'inputs'/'targets' lengths, within them
    (so nothing is trimmed later). With n tokens and no lengths: uniform in
    [1, n-1], as T5's prefix LM objective (Raffel et al. 2020, section 3.3.3).
    """
  tokens = _tokens(example, ctx, key)
  if len(tokens) < 2:
    raise InvalidExampleError(f'task {ctx.task_name!r}: prefix LM needs >= 2 tokens in '
                              f'{key!r}, got {len(tokens)}.')
  lo, hi = _split_range(len(tokens), *_rooms(ctx))
  s = int(ctx.rng.integers(lo, hi + 1))
  return {'inputs': tokens[:s], 'targets': tokens[s:]}


def _strip_eos(out: dict) -> dict:
  return {k: v[:-1] for k, v in out.items()}


def span_corruption_step(example, ctx: Context, noise_density: float = 0.15,
                         mean_noise_span_length: float = 3.0, key: str = 'targets'):
  """T5 span corruption (see `span_corruption`) as a task step."""
  tokens = _tokens(example, ctx, key)
  if len(tokens) < 2:
    raise InvalidExampleError(f'task {ctx.task_name!r}: span corruption needs >= 2 tokens '
                              f'in {key!r}, got {len(tokens)}.')
  out = span_corruption(tokens, ctx.rng,
                        _vocab(ctx, 'targets').vocab_size, noise_density, mean_noise_span_length)
  return _strip_eos(out)


def iid_noise_mask(length: int, noise_density: float, rng: np.random.Generator) -> np.ndarray:
  """Each token is noise independently with probability noise_density (seqio's iid_noise_mask)."""
  return rng.random(length) < noise_density


def iid_denoising(example, ctx: Context, noise_density: float = 0.15, key: str = 'targets'):
  """i.i.d. denoising (T5 paper section 3.3.2): iid mask, each noise run -> one sentinel."""
  tokens = _tokens(example, ctx, key)
  mask = iid_noise_mask(len(tokens), noise_density, ctx.rng)
  return _strip_eos(corrupt_with_mask(tokens, mask, _vocab(ctx, 'targets').vocab_size))


# --- UL2 mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning
# Paradigms", section 3.1). Mode tokens: the three *lowest* sentinel ids of the
# vocabulary are reserved for them (ids vocab_size-100, -99, -98 with 100 extra
# ids, i.e. <extra_id_99>, <extra_id_98>, <extra_id_97>), so no SentencePiece
# model has to be retrained and the ids cannot collide with text. UL2 denoisers
# then use at most 97 sentinels per example.

MODE_TOKENS = ('[NLU]', '[NLG]', '[S2S]')  # R, X, S denoisers
NUM_RESERVED_SENTINELS = len(MODE_TOKENS)


def mode_token_id(vocab_size: int, mode: str, num_sentinels: int = NUM_SENTINELS) -> int:
  """Id of a UL2 mode token: [NLU] -> lowest sentinel, [NLG] next, [S2S] next."""
  if mode not in MODE_TOKENS:
    raise ValueError(f'unknown UL2 mode token {mode!r}; expected one of {MODE_TOKENS}.')
  return vocab_size - num_sentinels + MODE_TOKENS.index(mode)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One UL2 denoiser. kind 'span' (mean span, density) or 'prefix' (S)."""
  mode: str
  kind: str = 'span'
  mean_noise_span_length: float = 3.0
  noise_density: float = 0.15
  rate: float = 1.0


# UL2's seven denoisers; equal rates by default (configurable).
UL2_DENOISERS = (
    Denoiser('[NLU]', 'span', 3.0, 0.15),
    Denoiser('[NLU]', 'span', 8.0, 0.15),
    Denoiser('[NLG]', 'span', 3.0, 0.5),
    Denoiser('[NLG]', 'span', 8.0, 0.5),
    Denoiser('[NLG]', 'span', 64.0, 0.15),
    Denoiser('[NLG]', 'span', 64.0, 0.5),
    Denoiser('[S2S]', 'prefix'),
)


@functools.lru_cache(maxsize=256)
def fitting_raw_length(inputs_room: int, targets_room: int | None, noise_density: float,
                       mean_noise_span_length: float, max_spans: int) -> int:
  """Largest raw length L whose span-corrupted inputs/targets (no EOS) fit the rooms.

    Generalises `random_spans_helper` to a targets bound and a sentinel budget.
    """
  best = 0
  limit = inputs_room + (targets_room or inputs_room) + 1
  for length in range(2, limit + 1):
    noise, spans = noise_span_counts(length, noise_density, mean_noise_span_length)
    if (length - noise + spans <= inputs_room and spans <= max_spans
        and (targets_room is None or noise + spans <= targets_room)):
      best = length
  if best < 2:
    raise ValueError(f'no raw length fits inputs <= {inputs_room}, targets <= '
                     f'{targets_room} at density {noise_density}, mean span '
                     f'{mean_noise_span_length}.')
  return best


def denoiser_raw_length(d: Denoiser, inputs_room: int, targets_room: int | None) -> int:
  if d.kind == 'prefix':
    return max(inputs_room, targets_room or 0) if targets_room else inputs_room
  return fitting_raw_length(inputs_room, targets_room, d.noise_density, d.mean_noise_span_length,
                            NUM_SENTINELS - NUM_RESERVED_SENTINELS)


def ul2_raw_length(sequence_length: Mapping[str, int],
                   denoisers: Sequence[Denoiser] = UL2_DENOISERS) -> int:
  """Chunk length to cut the corpus into for UL2: the longest any denoiser uses."""
  inputs_room = sequence_length['inputs'] - 2  # mode token + EOS
  targets_room = sequence_length['targets'] - 1 if 'targets' in sequence_length else None
  return max(denoiser_raw_length(d, inputs_room, targets_room) for d in denoisers)


def ul2_denoise(example, ctx: Context, denoisers: Sequence[Denoiser] = UL2_DENOISERS,
                key: str = 'targets'):
  """UL2 mixture of denoisers: pick one by rate, crop a fitting window, apply, prepend mode.

    Span denoisers use the largest window whose corrupted inputs and targets fit
    the lengths (crop start uniform); S (prefix LM) splits a window of
    max(inputs, targets) room uniformly among the fitting split points.
    Without ctx.sequence_length the whole sequence is used.
    """
  tokens = _tokens(example, ctx, key)
  if len(tokens) < 2:
    raise InvalidExampleError(f'task {ctx.task_name!r}: UL2 needs >= 2 tokens in {key!r}, '
                              f'got {len(tokens)}.')
  rates = np.array([d.rate for d in denoisers], np.float64)
  d = denoisers[int(ctx.rng.choice(len(denoisers), p=rates / rates.sum()))]
  vocab_size = _vocab(ctx, 'targets').vocab_size
  inputs_room, targets_room = _rooms(ctx, reserved_inputs=1)
  if inputs_room is not None:
    window = min(len(tokens), denoiser_raw_length(d, inputs_room, targets_room))
    start = int(ctx.rng.integers(0, len(tokens) - window + 1))
    tokens = tokens[start:start + window]
  if d.kind == 'prefix':
    lo, hi = _split_range(len(tokens), inputs_room, targets_room)
    s = int(ctx.rng.integers(lo, hi + 1))
    out = {'inputs': tokens[:s], 'targets': tokens[s:]}
  else:
    mask = random_spans_noise_mask(len(tokens), d.noise_density, d.mean_noise_span_length, ctx.rng)
    out = _strip_eos(
        corrupt_with_mask(tokens, mask, vocab_size,
                          num_sentinels=NUM_SENTINELS - NUM_RESERVED_SENTINELS))
  mode = mode_token_id(vocab_size, d.mode)
  out['inputs'] = np.concatenate([[mode], out['inputs']]).astype(np.int32)
  return out


# --- Dataset-level step: concatenate every document and cut fixed-length chunks.


def span_corruption_raw_length(sequence_length: Mapping[str, int], noise_density: float = 0.15,
                               mean_noise_span_length: float = 3.0) -> int:
  """Raw chunk length that fills 'inputs' exactly (T5's helper; 512 -> 568)."""
  return random_spans_helper(sequence_length['inputs'], noise_density, mean_noise_span_length)[0]


def prefix_lm_raw_length(sequence_length: Mapping[str, int]) -> int:
  """max(inputs, targets) - 1: leaves a wide uniform range of fitting split points."""
  return max(sequence_length['inputs'], sequence_length.get('targets', 0)) - 1


def causal_lm_raw_length(sequence_length: Mapping[str, int]) -> int:
  return sequence_length['targets'] - 1


class RandomChunk:
  """Per-example step: a random window of `length_fn(sequence_length)` tokens of `key` (the
    whole of a shorter document). T5's `select_random_chunk`, used where ConcatAndSplit cannot be:
    it runs lazily per document, so a C4-sized source is never materialised; short chunks are
    packed together by the feature converter instead of being concatenated first. Each document
    gives one chunk per epoch, a fresh random one every epoch.
    """

  def __init__(self, length_fn: Callable[[Mapping[str, int]], int], key: str = 'targets'):
    self.length_fn = length_fn
    self.key = key

  def __call__(self, example, ctx: Context):
    if not ctx.sequence_length:
      raise NeedsLengthsError(f'task {ctx.task_name!r}: RandomChunk needs feature lengths.')
    tokens = _tokens(example, ctx, self.key)
    length = self.length_fn(ctx.sequence_length)
    if len(tokens) <= length:
      return {**example, self.key: tokens}
    start = int(ctx.rng.integers(0, len(tokens) - length + 1))
    return {**example, self.key: tokens[start:start + length]}


class ConcatAndSplit:
  """Dataset-level step: all documents' tokens end to end, cut into chunks.

    T5's `reduce_concat_tokens` + `split_tokens` for pretraining. It sees the
    whole source at once, so the task pipeline materialises everything up to
    this step in memory: right for small corpora (the embedded one), wrong for
    C4-sized data, where a per-example crop is the scalable choice.
    `length_fn(sequence_length) -> chunk length`; chunks shorter than
    `min_length` (only the last can be) are dropped.
    """
  dataset_level = True

  def __init__(self, length_fn: Callable[[Mapping[str, int]], int], key: str = 'targets',
               min_length: int = 2):
    self.length_fn = length_fn
    self.key = key
    self.min_length = min_length

  def __call__(self, examples: Sequence[Mapping[str, Any]], ctx: Context) -> list[dict]:
    if not ctx.sequence_length:
      raise NeedsLengthsError(f'task {ctx.task_name!r}: ConcatAndSplit needs feature lengths.')
    length = self.length_fn(ctx.sequence_length)
    chunks = split_tokens((_tokens(ex, ctx, self.key) for ex in examples), length)
    return [{self.key: c} for c in chunks if len(c) >= self.min_length]
