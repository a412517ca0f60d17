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

ENCDEC_FEATURES = ("encoder_input_tokens", "decoder_target_tokens",
                   "decoder_input_tokens", "decoder_loss_weights")
PACKING_FEATURES = ("encoder_segment_ids", "decoder_segment_ids",
                    "encoder_positions", "decoder_positions")


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
        n_in = min(len(ex["inputs"]), inputs_length)
        n_tg = min(len(ex["targets"]), targets_length)
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

    enc, enc_seg, enc_pos = _fill(segments("inputs", inputs_length), inputs_length)
    dec, dec_seg, dec_pos = _fill(segments("targets", targets_length), targets_length)

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
        "encoder_input_tokens": enc,
        "decoder_target_tokens": dec,
        "decoder_input_tokens": dec_in,
        "decoder_loss_weights": (dec != 0).astype(np.int32),
    }
    if pack:
        out.update(encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg,
                   encoder_positions=enc_pos, decoder_positions=dec_pos)
    return out


def pad_rows(features: Mapping[str, np.ndarray], n_rows: int) -> dict[str, np.ndarray]:
    """Pads every feature with all-zero rows up to `n_rows` (a fixed batch size).

    Zero rows are pure padding under every feature (loss weight 0, segment 0).
    Raises ValueError if a feature already has more than `n_rows` rows.
    """
    out = {}
    for name, x in features.items():
        if x.shape[0] > n_rows:
            raise ValueError(f"feature {name!r} has {x.shape[0]} rows, more than n_rows={n_rows}.")
        pad = np.zeros((n_rows - x.shape[0],) + x.shape[1:], x.dtype)
        out[name] = np.concatenate([x, pad], axis=0)
    return out
