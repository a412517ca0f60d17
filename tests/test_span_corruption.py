"""Span corruption (T5 pretraining objective) in t5lite.data.preprocessors.

Statistics are computed from the masks and, independently, from the outputs
(counting sentinel-led spans in the targets), and merging is checked with a
merge written here, not only with the library's.
"""

import numpy as np
import pytest

from t5lite.data import preprocessors as P

VOCAB = 2048
EOS = 1
FIRST_SENTINEL = VOCAB - 100


def hand_merge(inputs, targets, vocab_size=VOCAB):
  """Test-local inverse: map sentinel -> following target tokens, splice into inputs."""
  inputs, targets = list(inputs), list(targets)
  assert inputs[-1] == EOS and targets[-1] == EOS
  inputs, targets = inputs[:-1], targets[:-1]
  spans, key = {}, None
  for t in targets:
    if t >= vocab_size - 100:
      key = t
      spans[key] = []
    else:
      spans[key].append(t)
  merged = []
  for t in inputs:
    merged += spans.pop(t) if t >= vocab_size - 100 else [t]
  assert not spans, 'every target span must have a sentinel in the inputs'
  return merged


def mask_runs(mask):
  """Lengths of the True runs in a boolean mask."""
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def test_random_spans_helper_t5_value():
  assert P.random_spans_helper(512, 0.15, 3.0) == (568, 114)


@pytest.mark.parametrize('inputs_length', [16, 64, 100, 512, 1024])
def test_random_spans_helper_is_tight(inputs_length):
  raw, targets_length = P.random_spans_helper(inputs_length, 0.15, 3.0)
  tokens = np.arange(3, 3 + raw)
  out = P.span_corruption(tokens, np.random.default_rng(0), VOCAB)
  assert len(out['inputs']) == inputs_length
  assert len(out['targets']) == targets_length
  longer = P.span_corruption(np.arange(3, 4 + raw), np.random.default_rng(0), VOCAB)
  assert len(longer['inputs']) > inputs_length  # raw is the largest that fits


def test_tiny_example_with_fixed_mask():
  tokens = np.array([10, 11, 12, 13, 14, 15, 16])
  mask = np.array([0, 0, 1, 1, 0, 1, 0], bool)
  out = P.corrupt_with_mask(tokens, mask, vocab_size=100)
  np.testing.assert_array_equal(out['inputs'], [10, 11, 99, 14, 98, 16, 1])
  np.testing.assert_array_equal(out['targets'], [99, 12, 13, 98, 15, 1])
  assert out['inputs'].dtype == np.int32 and out['targets'].dtype == np.int32
  # A mask that starts with noise (not produced by T5's sampler) also works.
  out = P.corrupt_with_mask(np.array([10, 11, 12, 13]), np.array([1, 1, 0, 0], bool), 100)
  np.testing.assert_array_equal(out['inputs'], [99, 12, 13, 1])
  np.testing.assert_array_equal(out['targets'], [99, 10, 11, 1])


def test_too_many_spans_is_a_clear_error():
  mask = np.tile([False, True], 101)
  with pytest.raises(ValueError, match='sentinels'):
    P.corrupt_with_mask(np.arange(3, 3 + len(mask)), mask, VOCAB)


def test_noise_mask_shape_and_structure():
  rng = np.random.default_rng(1)
  for length in [2, 3, 10, 568, 1000]:
    mask = P.random_spans_noise_mask(length, 0.15, 3.0, rng)
    assert mask.shape == (length,) and mask.dtype == bool
    assert not mask[0] and mask[-1]  # non-noise first, noise last (T5's interleave)
    assert 1 <= mask.sum() <= length - 1


def test_statistics_over_10000_examples():
  length, n = 568, 10_000
  rng = np.random.default_rng(1234)
  tokens = np.arange(3, 3 + length)  # distinct ids, all below the sentinels
  masks = np.stack([P.random_spans_noise_mask(length, 0.15, 3.0, rng) for _ in range(n)])

  # From the masks.
  runs = [mask_runs(m) for m in masks]
  num_noise = masks.sum()
  num_spans = sum(len(r) for r in runs)
  assert abs(num_noise / masks.size - 0.15) < 0.01
  assert abs(num_noise / num_spans - 3.0) < 0.2
  span_lengths = np.concatenate(runs)
  assert span_lengths.min() >= 1 and span_lengths.std() > 0.5  # random, not fixed-length
  # Noise is spread over the sequence, not bunched at one end.
  freq = masks.mean(axis=0)
  assert np.all(np.abs(freq[50:-50] - 0.15) < 0.03)
  # Masks differ from example to example.
  assert len({m.tobytes() for m in masks[:100]}) == 100

  # From the outputs, independently of the mask: count sentinel-led spans.
  rng = np.random.default_rng(1234)
  out_noise = out_spans = 0
  for i in range(n):
    out = P.span_corruption(tokens, rng, VOCAB)
    targets = out['targets'][:-1]
    is_sentinel = targets >= FIRST_SENTINEL
    out_spans += is_sentinel.sum()
    out_noise += (~is_sentinel).sum()
    if i < 200:
      assert hand_merge(out['inputs'], out['targets']) == tokens.tolist()
  assert abs(out_noise / (n * length) - 0.15) < 0.01
  assert abs(out_noise / out_spans - 3.0) < 0.2


def test_sentinels_count_down_and_eos_appended():
  rng = np.random.default_rng(7)
  tokens = rng.integers(3, FIRST_SENTINEL, size=300)
  out = P.span_corruption(tokens, rng, VOCAB)
  inputs, targets = out['inputs'], out['targets']
  assert inputs[-1] == EOS and targets[-1] == EOS
  assert (inputs == EOS).sum() == 1 and (targets == EOS).sum() == 1
  in_sent = inputs[inputs >= FIRST_SENTINEL]
  tg_sent = targets[targets >= FIRST_SENTINEL]
  k = len(tg_sent)
  assert k >= 1
  np.testing.assert_array_equal(in_sent, VOCAB - 1 - np.arange(k))
  np.testing.assert_array_equal(tg_sent, VOCAB - 1 - np.arange(k))
  assert targets[0] == VOCAB - 1  # targets start with <extra_id_0>


def test_merge_inverts_corruption():
  rng = np.random.default_rng(3)
  for length in [2, 5, 57, 568]:
    tokens = rng.integers(3, FIRST_SENTINEL, size=length)
    out = P.span_corruption(tokens, rng, VOCAB, noise_density=0.3, mean_noise_span_length=2.0)
    assert hand_merge(out['inputs'], out['targets']) == tokens.tolist()
    np.testing.assert_array_equal(P.merge_span_corruption(out['inputs'], out['targets'], VOCAB),
                                  tokens)


def test_same_rng_state_same_output():
  tokens = np.arange(3, 200)
  a = P.span_corruption(tokens, np.random.default_rng(5), VOCAB)
  b = P.span_corruption(tokens, np.random.default_rng(5), VOCAB)
  c = P.span_corruption(tokens, np.random.default_rng(6), VOCAB)
  np.testing.assert_array_equal(a['inputs'], b['inputs'])
  np.testing.assert_array_equal(a['targets'], b['targets'])
  assert not np.array_equal(a['inputs'], c['inputs'])


def test_too_short_is_a_clear_error():
  with pytest.raises(ValueError, match='at least 2'):
    P.span_corruption(np.array([5]), np.random.default_rng(0), VOCAB)


def test_split_tokens():
  chunks = P.split_tokens([[1, 2, 3, 4, 5], [6, 7], [], [8, 9, 10]], 4)
  assert [c.tolist() for c in chunks] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
  assert all(c.dtype == np.int32 for c in chunks)
  assert [c.tolist() for c in P.split_tokens([[1, 2], [3, 4]], 2)] == [[1, 2], [3, 4]]
  assert P.split_tokens([], 4) == []
