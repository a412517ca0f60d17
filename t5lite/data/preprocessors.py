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

EOS_ID = 1
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
        raise ValueError(f"inputs_length must be >= 2, got {inputs_length}.")

    def lengths(tokens_length: int) -> tuple[int, int]:
        noise, spans = noise_span_counts(tokens_length, noise_density, mean_noise_span_length)
        return tokens_length - noise + spans + 1, noise + spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random partition of num_items into non-empty segments.

    Same distribution as T5's shuffle-the-segment-starts trick: choose
    num_segments - 1 distinct cut points among the num_items - 1 gaps.
    """
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, noise_density: float,
                            mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of `length` with T5-style random noise spans (True = noise).

    The noise tokens are split into num_spans non-empty spans and the other
    tokens into as many non-empty runs; they alternate, starting with a
    non-noise run, so the mask never starts with noise and always ends with it.
    """
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}.")
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
        raise ValueError(f"tokens {tokens.shape} and noise_mask {noise_mask.shape} "
                         "must be 1-D and of the same shape.")
    prev = np.concatenate([[False], noise_mask[:-1]])
    span_start = noise_mask & ~prev
    num_spans = int(span_start.sum())
    if num_spans > num_sentinels:
        raise ValueError(f"{num_spans} noise spans but only {num_sentinels} sentinels; "
                         "use shorter sequences or a larger mean_noise_span_length.")
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

    return {"inputs": np.concatenate([inputs, eos]).astype(np.int32),
            "targets": np.concatenate([targets, eos]).astype(np.int32)}


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
                          eos_id: int = EOS_ID,
                          num_sentinels: int = NUM_SENTINELS) -> np.ndarray:
    """Inverse of `span_corruption`: puts each target span back at its sentinel.

    Everything from the first EOS on (and padding zeros) is ignored. A sentinel
    in the inputs with no span in the targets (e.g. targets truncated) is kept.
    """
    def strip(x):
        x = np.asarray(x)
        eos = np.flatnonzero(x == eos_id)
        x = x[: eos[0]] if len(eos) else x
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
        raise ValueError(f"length must be >= 1, got {length}.")
    parts = [np.asarray(list(d) if not isinstance(d, np.ndarray) else d, dtype=np.int32)
             for d in documents_tokens]
    stream = np.concatenate(parts) if parts else np.zeros([0], np.int32)
    return [stream[i:i + length] for i in range(0, len(stream), length)]
