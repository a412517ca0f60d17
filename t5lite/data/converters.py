"""Encoder-decoder feature converter: examples -> fixed-shape model batches.

Follows the contract of seqio's `EncDecFeatureConverter` (T5X): given examples
with EOS-terminated 'inputs' and 'targets', produce int32 arrays
[rows, length] named

    encoder_input_tokens   inputs, zero-padded
    decoder_target_tokens  targets, zero-padded
    decoder_input_tokens   targets shifted right by one with 0 as BOS
    decoder_loss_weights   1 where decoder_target_tokens != 0, else 0

and, when packed (several examples per row), also

    encoder_segment_ids / decoder_segment_ids   1, 2, 3... per example, 0 on padding
    encoder_positions / decoder_positions       0, 1, 2... restarting per example

When packed the decoder shift restarts at every segment: each example's first
decoder input is 0, never the previous example's last target (which would leak
one token across examples).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from t5lite.data.preprocessors import random_spans_helper

ENCDEC_FEATURES = ('encoder_input_tokens', 'decoder_target_tokens', 'decoder_input_tokens',
                   'decoder_loss_weights')
PACKING_FEATURES = ('encoder_segment_ids', 'decoder_segment_ids', 'encoder_positions',
                    'decoder_positions')


def _pack_rows(examples: Sequence[Mapping[str, np.ndarray]], inputs_length: int,
               targets_length: int) -> list[list[int]]:
  """Greedy in-order packing: indices of the examples that share each row.

    An example joins the current row if both its inputs and its targets still
    fit, else it opens a new row. Keeping order (rather than best-fit) makes the
    output a pure function of the input list, which exact resumption relies on.
    """
  rows: list[list[int]] = []
  used_in = used_tg = 0
  for i, ex in enumerate(examples):
    n_in = min(len(ex['inputs']), inputs_length)
    n_tg = min(len(ex['targets']), targets_length)
    if rows and used_in + n_in <= inputs_length and used_tg + n_tg <= targets_length:
      rows[-1].append(i)
      used_in += n_in
      used_tg += n_tg
    else:
      rows.append([i])
      used_in, used_tg = n_in, n_tg
  return rows


def _fill(rows: list[list[np.ndarray]], length: int):
  """Lays out each row's segments: (tokens, segment_ids, positions), zero-padded."""
  n = len(rows)
  tokens = np.zeros([n, length], np.int32)
  segment_ids = np.zeros([n, length], np.int32)
  positions = np.zeros([n, length], np.int32)
  for r, segments in enumerate(rows):
    start = 0
    for s, seg in enumerate(segments):
      end = start + len(seg)
      tokens[r, start:end] = seg
      segment_ids[r, start:end] = s + 1
      positions[r, start:end] = np.arange(len(seg))
      start = end
  return tokens, segment_ids, positions


def encdec_features(examples: Sequence[Mapping[str, np.ndarray]], inputs_length: int,
                    targets_length: int, pack: bool) -> dict[str, np.ndarray]:
  """Converts examples to encoder-decoder features (see the module docstring).

    Inputs/targets longer than their length are truncated (as seqio does).
    Unpacked: one example per row, len(examples) rows. Packed: greedy in-order
    packing, so rows <= len(examples), and no example is split across rows.
    """
  if pack:
    groups = _pack_rows(examples, inputs_length, targets_length)
  else:
    groups = [[i] for i in range(len(examples))]

  def segments(key, length):
    return [[np.asarray(examples[i][key], np.int32)[:length] for i in g] for g in groups]

  enc, enc_seg, enc_pos = _fill(segments('inputs', inputs_length), inputs_length)
  dec, dec_seg, dec_pos = _fill(segments('targets', targets_length), targets_length)

  # Shift right with 0 as BOS (seqio's `autoregressive_inputs`). Packed: where
  # the segment id changes from the previous position the input is 0 again.
  # Unpacked rows are a plain shift, as in seqio (so the position after EOS
  # sees EOS; its loss weight is 0 and causal attention hides it).
  dec_in = np.zeros_like(dec)
  dec_in[:, 1:] = dec[:, :-1]
  if pack:
    prev_seg = np.zeros_like(dec_seg)
    prev_seg[:, 1:] = dec_seg[:, :-1]
    dec_in = np.where(dec_seg == prev_seg, dec_in, 0).astype(np.int32)

  out = {
      'encoder_input_tokens': enc,
      'decoder_target_tokens': dec,
      'decoder_input_tokens': dec_in,
      'decoder_loss_weights': (dec != 0).astype(np.int32),
  }
  if pack:
    out.update(encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg, encoder_positions=enc_pos,
               decoder_positions=dec_pos)
  return out


def pad_rows(features: Mapping[str, np.ndarray], n_rows: int) -> dict[str, np.ndarray]:
  """Pads every feature with all-zero rows up to `n_rows` (a fixed batch size).

    Zero rows are pure padding under every feature (loss weight 0, segment 0).
    Raises ValueError if a feature already has more than `n_rows` rows.
    """
  out = {}
  for name, x in features.items():
    if x.shape[0] > n_rows:
      raise ValueError(f'feature {name!r} has {x.shape[0]} rows, more than n_rows={n_rows}.')
    pad = np.zeros((n_rows - x.shape[0],) + x.shape[1:], x.dtype)
    out[name] = np.concatenate([x, pad], axis=0)
  return out


# ---------------------------------------------------------------------------
# Decoder-only converters and the budget-driven packer the task pipeline uses.
#
# Decoder-only (seqio `LMFeatureConverter`): examples with 'targets';
# lengths {'targets': T}. Features: decoder_target_tokens, decoder_input_tokens
# (shifted right per segment, 0 as BOS), decoder_loss_weights, and when packed
# decoder_segment_ids / decoder_positions.
#
# Prefix LM (seqio `PrefixLMFeatureConverter`): examples with 'inputs' and
# 'targets'; lengths {'inputs': I, 'targets': T}; one decoder sequence of
# length I + T holding inputs then targets. decoder_causal_attention is 1 on
# the positions that attend bidirectionally: the len(inputs) + 1 first
# positions of each segment (in decoder-input space the inputs sit at 1..len,
# behind the BOS at 0). Loss on the targets only unless
# loss_on_targets_only=False.
# ---------------------------------------------------------------------------

DECODER_FEATURES = ('decoder_target_tokens', 'decoder_input_tokens', 'decoder_loss_weights')
DECODER_PACKING_FEATURES = ('decoder_segment_ids', 'decoder_positions')


def greedy_groups(sizes: Sequence[Sequence[int]], budgets: Sequence[int]) -> list[list[int]]:
  """Greedy in-order packing under several budgets (e.g. inputs and targets lengths).

    sizes[i][j] is example i's use of budget j (already truncated to it).
    """
  rows: list[list[int]] = []
  used = [0] * len(budgets)
  for i, size in enumerate(sizes):
    if rows and all(u + s <= b for u, s, b in zip(used, size, budgets)):
      rows[-1].append(i)
      used = [u + s for u, s in zip(used, size)]
    else:
      rows.append([i])
      used = list(size)
  return rows


def _shift_right(tokens: np.ndarray, segment_ids: np.ndarray | None) -> np.ndarray:
  out = np.zeros_like(tokens)
  out[:, 1:] = tokens[:, :-1]
  if segment_ids is not None:
    prev = np.zeros_like(segment_ids)
    prev[:, 1:] = segment_ids[:, :-1]
    out = np.where(segment_ids == prev, out, 0).astype(np.int32)
  return out


def decoder_features(examples: Sequence[Mapping[str, np.ndarray]], targets_length: int, pack: bool,
                     groups: list[list[int]] | None = None) -> dict[str, np.ndarray]:
  """Decoder-only (causal LM) features; `groups` overrides the packing."""
  if groups is None:
    groups = (greedy_groups([[min(len(ex['targets']), targets_length)] for ex in examples],
                            [targets_length]) if pack else [[i] for i in range(len(examples))])
  segs = [[np.asarray(examples[i]['targets'], np.int32)[:targets_length] for i in g] for g in groups
         ]
  dec, seg, pos = _fill(segs, targets_length)
  out = {
      'decoder_target_tokens': dec,
      'decoder_input_tokens': _shift_right(dec, seg if pack else None),
      'decoder_loss_weights': (dec != 0).astype(np.int32)
  }
  if pack:
    out.update(decoder_segment_ids=seg, decoder_positions=pos)
  return out


def prefix_lm_features(examples: Sequence[Mapping[str, np.ndarray]], inputs_length: int,
                       targets_length: int, pack: bool, loss_on_targets_only: bool = True,
                       groups: list[list[int]] | None = None) -> dict[str, np.ndarray]:
  """Prefix LM features (see above); decoder length inputs_length + targets_length."""
  length = inputs_length + targets_length
  ins = [np.asarray(ex['inputs'], np.int32)[:inputs_length] for ex in examples]
  tgs = [np.asarray(ex['targets'], np.int32)[:targets_length] for ex in examples]
  if groups is None:
    groups = (greedy_groups([[len(a) + len(b)] for a, b in zip(ins, tgs)], [length])
              if pack else [[i] for i in range(len(examples))])
  dec, seg, pos = _fill([[np.concatenate([ins[i], tgs[i]]) for i in g] for g in groups], length)
  is_target = np.zeros_like(dec)
  causal = np.zeros_like(dec)
  for r, g in enumerate(groups):
    start = 0
    for i in g:
      n_in, n_tg = len(ins[i]), len(tgs[i])
      causal[r, start:start + n_in + 1] = 1
      is_target[r, start + n_in:start + n_in + n_tg] = 1
      start += n_in + n_tg
  # The "+1" position may be padding (or the next segment) when an example has
  # no targets; causal attention there is harmless but keep it inside the segment.
  causal = np.where(seg > 0, causal, 0).astype(np.int32)
  weights = is_target if loss_on_targets_only else (dec != 0).astype(np.int32)
  out = {
      'decoder_target_tokens': dec,
      'decoder_input_tokens': _shift_right(dec, seg if pack else None),
      'decoder_loss_weights': weights.astype(np.int32), 'decoder_causal_attention': causal
  }
  if pack:
    out.update(decoder_segment_ids=seg, decoder_positions=pos)
  return out


class Converter:
  """A feature converter by name: how examples use the length budgets, and the features.

    kind: 'encdec' (lengths inputs, targets), 'decoder' (targets) or
    'prefix_lm' (inputs, targets; one decoder sequence of their sum).
    """

  KINDS = ('encdec', 'decoder', 'prefix_lm')

  def __init__(self, kind: str, lengths: Mapping[str, int], loss_on_targets_only: bool = True):
    if kind not in self.KINDS:
      raise ValueError(f'unknown converter {kind!r}; expected one of {self.KINDS}.')
    need = ('targets',) if kind == 'decoder' else ('inputs', 'targets')
    missing = [k for k in need if k not in lengths]
    if missing:
      raise ValueError(f'converter {kind!r} needs feature lengths for {need}; '
                       f'missing {missing} in {dict(lengths)}.')
    self.kind = kind
    self.lengths = {k: int(lengths[k]) for k in need}
    self.loss_on_targets_only = loss_on_targets_only
    self.features = need

  def budgets(self) -> list[int]:
    if self.kind == 'encdec':
      return [self.lengths['inputs'], self.lengths['targets']]
    if self.kind == 'decoder':
      return [self.lengths['targets']]
    return [self.lengths['inputs'] + self.lengths['targets']]

  def sizes(self, ex: Mapping[str, np.ndarray]) -> list[int]:
    n = {k: min(len(ex[k]), self.lengths[k]) for k in self.features}
    if self.kind == 'prefix_lm':
      return [n['inputs'] + n['targets']]
    return [n[k] for k in self.features]

  def dropped_tokens(self, ex: Mapping[str, np.ndarray]) -> int:
    """Tokens truncation would cut from this example."""
    return sum(max(len(ex[k]) - self.lengths[k], 0) for k in self.features)

  def __call__(self, examples, groups, pack: bool) -> dict[str, np.ndarray]:
    if self.kind == 'encdec':
      return encdec_from_groups(examples, groups, self.lengths['inputs'], self.lengths['targets'],
                                pack)
    if self.kind == 'decoder':
      return decoder_features(examples, self.lengths['targets'], pack, groups=groups)
    return prefix_lm_features(examples, self.lengths['inputs'], self.lengths['targets'], pack,
                              self.loss_on_targets_only, groups=groups)


def encdec_from_groups(examples, groups, inputs_length: int, targets_length: int,
                       pack: bool) -> dict[str, np.ndarray]:
  """`encdec_features` with the packing given as groups of example indices."""

  def segments(key, length):
    return [[np.asarray(examples[i][key], np.int32)[:length] for i in g] for g in groups]

  enc, enc_seg, enc_pos = _fill(segments('inputs', inputs_length), inputs_length)
  dec, dec_seg, dec_pos = _fill(segments('targets', targets_length), targets_length)
  out = {
      'encoder_input_tokens': enc, 'decoder_target_tokens': dec,
      'decoder_input_tokens': _shift_right(dec, dec_seg if pack else None),
      'decoder_loss_weights': (dec != 0).astype(np.int32)
  }
  if pack:
    out.update(encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg, encoder_positions=enc_pos,
               decoder_positions=dec_pos)
  return out


# --- feature lengths of a run ----------------------------------------------------------------


def _span_corruption_targets(inputs_length: int) -> int:
  # T5's span corruption: noise density 0.15, mean noise span length 3.
  return random_spans_helper(inputs_length, 0.15, 3.0)[1]


# The parameter `targets_length` is config.data's name; it shadows the function below on purpose.
# pylint: disable=redefined-outer-name
def targets_length(inputs_length: int, targets_length: int = 0) -> int:
  """`targets_length`, or with 0 T5's choice for span corruption: the targets that
    `inputs_length` tokens of corrupted text produce (noise 0.15, mean span 3), e.g.
    512 -> 114, 128 -> 29."""
  return targets_length or _span_corruption_targets(inputs_length)


def feature_lengths(converter: str, inputs_length: int, targets_length: int = 0) -> dict[str, int]:
  """The pipeline's feature lengths of a run (config.data's converter, inputs_length and
    targets_length), the same for training, validation and evaluation: 'inputs' and 'targets'
    for 'encdec' and 'prefix_lm'; for 'decoder' one 'targets' sequence as long as both.
    targets_length 0 means T5's choice (see `targets_length`)."""
  if converter not in Converter.KINDS:
    raise ValueError(f'unknown converter {converter!r}; expected one of {Converter.KINDS}.')
  targets = targets_length or _span_corruption_targets(inputs_length)
  if converter == 'decoder':
    return {'targets': inputs_length + targets}
  return {'inputs': inputs_length, 'targets': targets}
