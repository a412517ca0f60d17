"""Prefix LM, causal LM, iid denoising, UL2 and the decoder-only / prefix-LM converters.

Truths used: hand-written arrays, exact reconstruction of the original tokens, and
frequencies compared with the configured parameters over many draws.
"""

import numpy as np
import pytest

from t5lite.data import converters as C
from t5lite.data import preprocessors as P

VOCAB = 2048
FIRST_SENTINEL = VOCAB - 100


class FakeVocab:
  vocab_size = VOCAB
  extra_ids = 100
  eos_id = 1


class F:  # minimal output feature
  vocabulary = FakeVocab()
  add_eos = True


def ctx(seed, lengths=None):
  return P.Context(task_name='t', output_features={'inputs': F(), 'targets': F()},
                   sequence_length=lengths, rng=np.random.default_rng(seed))


def merge(inputs, targets):
  """Test-local inverse of span corruption (no EOS): sentinel -> its target span."""
  spans, key = {}, None
  for t in targets:
    if t >= FIRST_SENTINEL:
      key = t
      spans[key] = []
    else:
      spans[key].append(int(t))
  out = []
  for t in inputs:
    out += spans.pop(t) if t >= FIRST_SENTINEL else [int(t)]
  assert not spans
  return out


def test_prefix_lm_split_is_uniform_and_lossless():
  tokens = np.arange(3, 13)  # n = 10: split points 1..9
  counts = np.zeros(10)
  for i in range(9000):
    out = P.prefix_lm({'targets': tokens}, ctx(i))
    assert np.concatenate([out['inputs'], out['targets']]).tolist() == tokens.tolist()
    counts[len(out['inputs'])] += 1
  assert counts[0] == 0
  freq = counts[1:] / counts.sum()
  assert np.all(np.abs(freq - 1 / 9) < 0.02)


def test_prefix_lm_respects_lengths():
  tokens = np.arange(3, 103)  # 100 tokens; inputs <= 79 (+EOS = 80), targets <= 39
  seen = set()
  for i in range(2000):
    out = P.prefix_lm({'targets': tokens}, ctx(i, {'inputs': 80, 'targets': 40}))
    assert len(out['inputs']) <= 79 and len(out['targets']) <= 39
    seen.add(len(out['inputs']))
  assert seen == set(range(61, 80))  # every fitting split point occurs


def test_causal_lm():
  out = P.causal_lm({'targets': np.array([5, 6, 7])}, ctx(0))
  assert out['targets'].tolist() == [5, 6, 7]


def test_iid_denoising_rate_and_merge():
  tokens = np.arange(3, 403)
  noise = total = 0
  for i in range(500):
    out = P.iid_denoising({'targets': tokens}, ctx(i), noise_density=0.15)
    assert merge(out['inputs'], out['targets']) == tokens.tolist()
    noise += (out['targets'] < FIRST_SENTINEL).sum()
    total += len(tokens)
  assert abs(noise / total - 0.15) < 0.005


def test_mode_token_ids():
  assert P.mode_token_id(VOCAB, '[NLU]') == VOCAB - 100
  assert P.mode_token_id(VOCAB, '[NLG]') == VOCAB - 99
  assert P.mode_token_id(VOCAB, '[S2S]') == VOCAB - 98
  with pytest.raises(ValueError, match='mode token'):
    P.mode_token_id(VOCAB, '[XYZ]')


def _window_of(window, tokens):
  # tokens are consecutive ints, so a window is consecutive too
  return window == list(range(window[0], window[0] + len(window))) and window[0] >= tokens[0] \
      and window[-1] <= tokens[-1]


def test_ul2_mode_frequencies_and_fit():
  tokens = np.arange(3, 3 + 700)
  lengths = {'inputs': 128, 'targets': 64}
  modes = {P.mode_token_id(VOCAB, m): m for m in P.MODE_TOKENS}
  counts = dict.fromkeys(P.MODE_TOKENS, 0)
  n = 3500
  for i in range(n):
    out = P.ul2_denoise({'targets': tokens}, ctx(i, lengths))
    counts[modes[int(out['inputs'][0])]] += 1
    assert len(out['inputs']) <= 127 and len(out['targets']) <= 63  # room for EOS
    assert not np.isin(out['inputs'][1:], list(modes)).any()
    assert not np.isin(out['targets'], list(modes)).any()
    body = out['inputs'][1:]
    if modes[int(out['inputs'][0])] == '[S2S]':
      rebuilt = np.concatenate([body, out['targets']]).tolist()
    else:
      rebuilt = merge(body, out['targets'])
    assert _window_of(rebuilt, tokens)
  # Default: 7 denoisers, equal rates -> R 2/7, X 4/7, S 1/7.
  for mode, want in (('[NLU]', 2 / 7), ('[NLG]', 4 / 7), ('[S2S]', 1 / 7)):
    assert abs(counts[mode] / n - want) < 0.03, (mode, counts)


@pytest.mark.parametrize('mean,density', [(3.0, 0.15), (8.0, 0.15), (3.0, 0.5), (8.0, 0.5),
                                          (64.0, 0.5)])
def test_ul2_denoiser_statistics(mean, density):
  d = (P.Denoiser('[NLG]', 'span', mean, density),)
  tokens = np.arange(3, 1903)  # stays below the sentinels
  lengths = {'inputs': 512, 'targets': 512}
  noise = raw = spans = 0
  for i in range(300):
    out = P.ul2_denoise({'targets': tokens}, ctx(i, lengths), denoisers=d)
    assert out['inputs'][0] == P.mode_token_id(VOCAB, '[NLG]')
    tg = out['targets']
    noise += (tg < FIRST_SENTINEL).sum()
    spans += (tg >= FIRST_SENTINEL).sum()
    raw += len(merge(out['inputs'][1:], tg))
  assert abs(noise / raw - density) < 0.01
  assert abs(noise / spans - mean) / mean < 0.1


def test_ul2_custom_rates():
  d = (P.Denoiser('[NLU]', rate=3.0), P.Denoiser('[S2S]', 'prefix', rate=1.0))
  tokens = np.arange(3, 303)
  s2s = sum(
      int(
          P.ul2_denoise({'targets': tokens}, ctx(i, {'inputs': 64, 'targets': 64}), denoisers=d)
          ['inputs'][0]) == VOCAB - 98 for i in range(4000))
  assert abs(s2s / 4000 - 0.25) < 0.02


# --- converters -----------------------------------------------------------------------


def test_decoder_features_packed_by_hand():
  exs = [{'targets': np.array([3, 4, 1])}, {'targets': np.array([5, 1])},
         {'targets': np.array([6, 7, 8, 1])}]
  f = C.decoder_features(exs, 6, pack=True)
  want = {
      'decoder_target_tokens': [[3, 4, 1, 5, 1, 0], [6, 7, 8, 1, 0, 0]],
      'decoder_input_tokens': [[0, 3, 4, 0, 5, 0], [0, 6, 7, 8, 0, 0]],
      'decoder_loss_weights': [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]],
      'decoder_segment_ids': [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]],
      'decoder_positions': [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]],
  }
  assert set(f) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(f[k], v, err_msg=k)


def test_prefix_lm_features_by_hand():
  # seqio's PrefixLMFeatureConverter example: inputs [9, 4, 6, 1], targets [3, 9, 1].
  f = C.prefix_lm_features([{'inputs': np.array([9, 4, 6, 1]), 'targets': np.array([3, 9, 1])}], 5,
                           4, pack=False)
  np.testing.assert_array_equal(f['decoder_target_tokens'], [[9, 4, 6, 1, 3, 9, 1, 0, 0]])
  np.testing.assert_array_equal(f['decoder_input_tokens'], [[0, 9, 4, 6, 1, 3, 9, 1, 0]])
  np.testing.assert_array_equal(f['decoder_loss_weights'], [[0, 0, 0, 0, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(f['decoder_causal_attention'], [[1, 1, 1, 1, 1, 0, 0, 0, 0]])
  g = C.prefix_lm_features([{'inputs': np.array([9, 1]), 'targets': np.array([3, 1])}] * 2, 4, 4,
                           pack=True, loss_on_targets_only=False)
  np.testing.assert_array_equal(g['decoder_target_tokens'], [[9, 1, 3, 1, 9, 1, 3, 1]])
  np.testing.assert_array_equal(g['decoder_input_tokens'], [[0, 9, 1, 3, 0, 9, 1, 3]])
  np.testing.assert_array_equal(g['decoder_causal_attention'], [[1, 1, 1, 0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(g['decoder_segment_ids'], [[1, 1, 1, 1, 2, 2, 2, 2]])
  np.testing.assert_array_equal(g['decoder_positions'], [[0, 1, 2, 3, 0, 1, 2, 3]])
  np.testing.assert_array_equal(g['decoder_loss_weights'], [[1, 1, 1, 1, 1, 1, 1, 1]])


def _random_examples(rng, n, kind):
  exs = []
  for _ in range(n):
    tg = np.append(rng.integers(3, 100, rng.integers(1, 12)), 1)
    ex = {'targets': tg}
    if kind != 'decoder':
      ex['inputs'] = np.append(rng.integers(3, 100, rng.integers(1, 12)), 1)
    exs.append(ex)
  return exs


@pytest.mark.parametrize('kind', ['decoder', 'prefix_lm', 'encdec'])
def test_packing_loses_and_duplicates_nothing(kind):
  rng = np.random.default_rng(0)
  exs = _random_examples(rng, 200, kind)
  lengths = {'targets': 16} if kind == 'decoder' else {'inputs': 16, 'targets': 16}
  conv = C.Converter(kind, lengths)
  groups = C.greedy_groups([conv.sizes(e) for e in exs], conv.budgets())
  f = conv(exs, groups, pack=True)
  assert sum(len(g) for g in groups) == len(exs)
  assert len(groups) < len(exs) * 0.8  # really packs
  name = 'encoder_input_tokens' if kind == 'encdec' else 'decoder_target_tokens'
  seg_name = 'encoder_segment_ids' if kind == 'encdec' else 'decoder_segment_ids'
  pos_name = 'encoder_positions' if kind == 'encdec' else 'decoder_positions'
  rebuilt = []
  for r in range(len(groups)):
    toks, seg, pos = f[name][r], f[seg_name][r], f[pos_name][r]
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))
      rebuilt.append(toks[where].tolist())
    assert (toks[seg == 0] == 0).all()
    # the decoder input is the target shifted right inside each segment
    dseg, dtg, din = f['decoder_segment_ids'][r], f['decoder_target_tokens'][r], \
        f['decoder_input_tokens'][r]
    for t in range(len(dseg)):
      if dseg[t]:
        want = dtg[t - 1] if t and dseg[t - 1] == dseg[t] else 0
        assert din[t] == want
  if kind == 'encdec':
    want = [e['inputs'].tolist() for e in exs]
  elif kind == 'prefix_lm':
    want = [e['inputs'].tolist() + e['targets'].tolist() for e in exs]
  else:
    want = [e['targets'].tolist() for e in exs]
  assert rebuilt == want
  if kind == 'prefix_lm':  # loss exactly on targets
    assert f['decoder_loss_weights'].sum() == sum(len(e['targets']) for e in exs)


def test_feature_lengths_by_hand():
  # targets 0: T5's span-corruption targets for the inputs length (random_spans_helper).
  assert C.targets_length(128) == 29 and C.targets_length(512) == 114
  assert C.targets_length(512, 7) == 7
  assert C.feature_lengths('encdec', 512, 0) == {'inputs': 512, 'targets': 114}
  assert C.feature_lengths('prefix_lm', 128, 0) == {'inputs': 128, 'targets': 29}
  assert C.feature_lengths('encdec', 64, 8) == {'inputs': 64, 'targets': 8}
  assert C.feature_lengths('decoder', 128, 0) == {'targets': 128 + 29}
  assert C.feature_lengths('decoder', 64, 8) == {'targets': 72}
  with pytest.raises(ValueError, match='unknown converter'):
    C.feature_lengths('encoder', 64, 8)
