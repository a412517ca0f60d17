"""Decoding against independent truths: the training-path model re-run step by step, exhaustive
search, hand-made logits, softmax frequencies, one device."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from t5lite import partitioning
from t5lite.models import decoding
from t5lite.models.decoding import DecodeConfig
from t5lite.models.presets import ModelConfig, model_config
from t5lite.models.t5 import make_model

STEPS = 6
VOCAB = 32


def tiny(architecture, variant='v1_1', vocab=VOCAB, **overrides):
  c = model_config('tiny', variant=variant, vocab_size=vocab, architecture=architecture)
  c.dtype = 'float32'
  c.update(overrides)
  return ModelConfig.from_config(c)


def random_params(model, seed):
  """Parameters drawn in numpy from the abstract shapes (model.init compiles slowly on CPU),
  scaled about like the model's own initialiser so logits are spread out (no near-ties)."""
  example = {'decoder_input_tokens': jnp.ones((1, 1), jnp.int32)}
  if model.cfg.architecture == 'encoder_decoder':
    example['encoder_input_tokens'] = jnp.ones((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), **example)))
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    names = [k.key for k in path]
    shape = leaf.shape
    if names[-1] == 'scale':
      return (1 + 0.1 * rng.randn(*shape)).astype(np.float32)
    # Embeddings quieter and residual branches louder than at init: a random model whose
    # stream is dominated by the input embedding just repeats its input token (tied logits).
    std = {'embedding': 0.3, 'rel_embedding': 1.0}.get(names[-1])
    if std is None:
      fan_in = {'out': shape[0] * shape[1], 'query': shape[0] * shape[-1]}.get(names[-2], shape[0])
      std = fan_in**-0.5 * (4.0 if names[-2] in ('out', 'wo') else 1.0)
    return (std * rng.randn(*shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract['params'])


def stack_layers(params):
  """Unrolled layers_i -> one scanned `layers` stack (the same weights)."""
  out = dict(params)
  for name in ('encoder', 'decoder'):
    if name in out:
      stack = dict(out[name])
      layers = [stack.pop(f'layers_{i}') for i in range(2)]
      stack['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
      out[name] = stack
  return out


@functools.lru_cache(maxsize=None)
def forward(model):
  """The training path: full model on whole sequences."""
  return jax.jit(lambda params, batch: model.apply({'params': params}, **batch))


def reference_greedy(model, params, batch, eos, prefix_lm=False):
  """Greedy decoding by re-running the full model on each example's growing prefix: the
  sequence sits in a fixed buffer whose not-yet-generated slots are zeros that causal
  attention keeps out of view. Returns tokens [B, STEPS] (0 after EOS) and summed log-probs."""
  if 'encoder_input_tokens' in batch:
    rows = len(batch['encoder_input_tokens'])
    buffer = np.zeros((rows, STEPS), np.int32)  # decoder inputs: start token 0, then tokens
    position = np.zeros(rows, int)
    inputs = lambda: dict(encoder_input_tokens=batch['encoder_input_tokens'],
                          decoder_input_tokens=buffer)
  else:
    prompts = batch['decoder_prompt_tokens']
    rows, width = prompts.shape
    lengths = 1 + (prompts != 0).sum(1)  # BOS + prompt
    buffer = np.zeros((rows, width + 1 + STEPS), np.int32)
    buffer[:, 1:width + 1] = prompts
    causal = (np.arange(buffer.shape[1])[None] < lengths[:, None]).astype(np.int32)
    position = lengths - 1
    inputs = lambda: dict(decoder_input_tokens=buffer, decoder_causal_attention=causal
                          if prefix_lm else None)
  tokens = np.zeros((rows, STEPS), np.int32)
  scores = np.zeros(rows, np.float32)
  done = np.zeros(rows, bool)
  for t in range(STEPS):
    logits = np.asarray(forward(model)(params, inputs()))[np.arange(rows), position]
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    token = logits.argmax(-1)
    scores += np.where(done, 0, log_probs[np.arange(rows), token])
    tokens[:, t] = np.where(done, 0, token)
    done |= tokens[:, t] == eos
    position = position + 1
    if t + 1 < STEPS:
      buffer[np.arange(rows), position] = tokens[:, t]
  return tokens, scores


def pick_eos(tokens):
  """A token that one example first emits mid-way and another never emits: used as EOS, it
  stops the first example early and leaves the other running to the end."""
  for b, t in itertools.product(range(len(tokens)), range(1, STEPS - 1)):
    tok = tokens[b, t]
    others = [tokens[o] for o in range(len(tokens)) if o != b]
    if tok != 0 and tok not in tokens[b, :t] and any(tok not in other for other in others):
      return int(tok)
  raise AssertionError('no suitable EOS token in the reference output')


CASES = {  # name: (architecture, variant, prefix_lm)
    'encdec_v1_0': ('encoder_decoder', 'v1_0', False),
    'encdec_v1_1': ('encoder_decoder', 'v1_1', False),
    'causal_lm': ('decoder_only', 'v1_1', False),
    'prefix_lm': ('decoder_only', 'v1_1', True),
}


@functools.lru_cache(maxsize=None)
def setup(name):
  """Models (unrolled; scanned with full remat), shared weights, a padded batch of 4 examples of
  different lengths, an EOS that stops some examples only, and the reference output."""
  architecture, variant, prefix_lm = CASES[name]
  unrolled = make_model(tiny(architecture, variant))
  scanned = make_model(tiny(architecture, variant, scan_layers=True, remat_policy='full'))
  params = random_params(unrolled, seed=len(name))
  rng = np.random.RandomState(1)
  if architecture == 'encoder_decoder':
    lengths, width, key = (7, 4, 2, 5), 7, 'encoder_input_tokens'
  else:
    lengths, width, key = (4, 1, 0, 3), 4, 'decoder_prompt_tokens'  # 0: an empty prompt
  tokens = np.zeros((4, width), np.int32)
  for row, n in enumerate(lengths):
    tokens[row, :n] = rng.randint(2, VOCAB, n)
  batch = {key: tokens}
  free_tokens = reference_greedy(unrolled, params, batch, eos=-1, prefix_lm=prefix_lm)[0]
  eos = pick_eos(free_tokens)
  ref_tokens, ref_scores = reference_greedy(unrolled, params, batch, eos, prefix_lm)
  return dict(unrolled=unrolled, scanned=scanned, params=params, stacked=stack_layers(params),
              batch=batch, prefix_lm=prefix_lm, eos=eos, free_tokens=free_tokens,
              ref_tokens=ref_tokens, ref_scores=ref_scores,
              cfg=DecodeConfig(max_decode_length=STEPS, eos_id=eos))


def run(s, cfg, scan=False, **kwargs):
  model, params = (s['scanned'], s['stacked']) if scan else (s['unrolled'], s['params'])
  out = decoding.decode(model, params, s['batch'], cfg, prefix_lm=s['prefix_lm'], **kwargs)
  return np.asarray(out.tokens), np.asarray(out.scores)


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scan_remat'])
@pytest.mark.parametrize('name', list(CASES))
def test_cached_greedy_matches_step_by_step_full_model(name, scan):
  s = setup(name)
  tokens, scores = run(s, s['cfg'], scan)
  np.testing.assert_array_equal(tokens, s['ref_tokens'])
  np.testing.assert_allclose(scores, s['ref_scores'], rtol=1e-5, atol=1e-4)
  # EOS stops each example on its own and pads it with 0; the others run to the end.
  stopped = (tokens == s['eos']).any(1)
  assert stopped.any() and not stopped.all()
  for row in np.nonzero(stopped)[0]:
    end = list(tokens[row]).index(s['eos'])
    assert end < STEPS - 1 and (tokens[row, end + 1:] == 0).all()
  if name == 'prefix_lm' and not scan:  # the uncached baseline of benchmarks/decoding.py
    uncached = run(s, s['cfg'], use_cache=False)
    np.testing.assert_array_equal(uncached[0], s['ref_tokens'])
    np.testing.assert_allclose(uncached[1], s['ref_scores'], rtol=1e-5, atol=1e-4)


def test_prefix_lm_and_causal_lm_cases_differ():
  # Same weights and prompts: a bidirectional prompt changes what is generated, so the
  # prefix-LM case above checks something the causal case does not.
  causal, prefix = setup('causal_lm'), setup('prefix_lm')
  assert not np.array_equal(causal['free_tokens'], prefix['free_tokens'])


def test_beam_search_with_one_beam_is_greedy():
  # Alpha 0: with a length bonus, one beam may rightly prefer a longer hypothesis to greedy's.
  s = setup('prefix_lm')
  cfg = DecodeConfig(method='beam', num_beams=1, length_penalty_alpha=0.0, max_decode_length=STEPS,
                     eos_id=s['eos'])
  tokens, scores = run(s, cfg)
  np.testing.assert_array_equal(tokens, s['ref_tokens'])
  np.testing.assert_allclose(scores, s['ref_scores'], rtol=1e-5, atol=1e-4)


def test_sampling_with_top_k_one_is_greedy():
  s = setup('encdec_v1_0')
  cfg = DecodeConfig(method='sample', temperature=0.7, top_k=1, max_decode_length=STEPS,
                     eos_id=s['eos'])
  tokens, scores = run(s, cfg, rng=jax.random.PRNGKey(7))
  np.testing.assert_array_equal(tokens, s['ref_tokens'])
  np.testing.assert_allclose(scores, s['ref_scores'], rtol=1e-5, atol=1e-4)


def test_top_p_and_top_k_keep_exactly_the_expected_tokens():
  probs = np.array([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])  # sorted: .4 .25 .15 .1 .05 .05
  logits = jnp.asarray(np.log(probs)[None] + 3.0, jnp.float32)  # softmax is shift-invariant

  def kept(**kw):
    filtered = decoding.filter_logits(logits, DecodeConfig(method='sample', **kw))
    return np.asarray(jax.nn.softmax(filtered))[0]

  def renormalised(ids):
    out = np.zeros_like(probs)
    out[ids] = probs[ids] / probs[ids].sum()
    return out

  # Nucleus: a token stays while the mass before it is < p.
  np.testing.assert_allclose(kept(top_p=0.6), renormalised([1, 3]), atol=1e-6)  # .4 < .6, .65
  np.testing.assert_allclose(kept(top_p=0.7), renormalised([1, 3, 4]), atol=1e-6)
  np.testing.assert_allclose(kept(top_p=0.3), renormalised([1]), atol=1e-6)
  np.testing.assert_allclose(kept(top_p=1.0), probs, atol=1e-6)
  np.testing.assert_allclose(kept(top_k=3), renormalised([1, 3, 4]), atol=1e-6)
  # Top-k first, then the nucleus of the renormalised rest (.5 .3125 .1875).
  np.testing.assert_allclose(kept(top_k=3, top_p=0.55), renormalised([1, 3]), atol=1e-6)
  np.testing.assert_allclose(kept(top_k=3, top_p=0.45), renormalised([1]), atol=1e-6)
  # Temperature 2 flattens: p ** (1/2), renormalised, before the nucleus is taken.
  warm = np.sqrt(probs) / np.sqrt(probs).sum()
  np.testing.assert_allclose(kept(temperature=2.0), warm, atol=1e-6)
  nucleus = [1, 3, 4]  # warm sorted: .28 .22 .17 .14 ...; mass before the 4th = .67 >= .6
  np.testing.assert_allclose(kept(temperature=2.0, top_p=0.6),
                             warm * np.isin(np.arange(6), nucleus) / warm[nucleus].sum(), atol=1e-6)


def test_temperature_sampling_frequencies_match_softmax():
  s = setup('encdec_v1_1')
  draws, temperature = 4000, 1.5
  row = s['batch']['encoder_input_tokens'][:1]
  logits = np.asarray(
      forward(s['unrolled'])(s['params'],
                             dict(encoder_input_tokens=row, decoder_input_tokens=np.zeros(
                                 (1, 1), np.int32))))[0, 0]
  expected = np.asarray(jax.nn.softmax(logits / temperature))
  cfg = DecodeConfig(method='sample', temperature=temperature, max_decode_length=1, eos_id=-1)
  out = decoding.decode(s['unrolled'], s['params'],
                        {'encoder_input_tokens': np.repeat(row, draws, 0)}, cfg,
                        rng=jax.random.PRNGKey(0))
  freq = np.bincount(np.asarray(out.tokens)[:, 0], minlength=VOCAB) / draws
  sigma = np.sqrt(expected * (1 - expected) / draws)
  assert np.all(np.abs(freq - expected) < 5 * sigma + 2e-3), (freq, expected)
  assert 0.5 * np.abs(freq - expected).sum() < 0.06  # total variation
  # The returned score is the model's (untempered) log-probability of the token.
  np.testing.assert_allclose(np.asarray(out.scores),
                             np.asarray(jax.nn.log_softmax(logits))[np.asarray(out.tokens)[:, 0]],
                             atol=1e-5)


def test_sharded_greedy_matches_one_device():
  # Default rules: batch over data x fsdp, embed over fsdp, heads / mlp / vocab over tensor.
  # (Beam search runs sharded in the exhaustive-search test below.)
  s = setup('encdec_v1_1')
  tokens, scores = run(s, s['cfg'], scan=True, mesh=partitioning.make_mesh((4, 1, 2)))
  np.testing.assert_array_equal(tokens, s['ref_tokens'])  # == the one-device output (above)
  np.testing.assert_allclose(scores, s['ref_scores'], rtol=1e-5, atol=1e-4)


# Seeds picked so that greedy search misses the optimum in some row (checked below). The
# encoder-decoder case runs sharded on 8 devices (the one-device beam search is the prefix LM's).
@pytest.mark.parametrize('architecture,vocab,length,scan,seed,mesh',
                         [('encoder_decoder', 6, 3, True, 5, (2, 2, 2)),
                          ('prefix_lm', 5, 4, False, 3, None)])
def test_beam_search_finds_the_exhaustive_optimum(architecture, vocab, length, scan, seed, mesh):
  """Every hypothesis (ends at its first EOS, or at max length) scored by the full model with
  the same length penalty; a beam wide enough to hold every candidate must find the best."""
  prefix_lm = architecture == 'prefix_lm'
  model_arch = 'decoder_only' if prefix_lm else architecture
  cfg_kw = dict(scan_layers=True) if scan else {}
  model = make_model(tiny(model_arch, vocab=vocab, **cfg_kw))
  params = random_params(make_model(tiny(model_arch, vocab=vocab)), seed=seed)
  params = stack_layers(params) if scan else params
  alpha, eos = 0.6, 1
  # Candidates at the last step: (vocab - 1) ** (length - 1) alive prefixes times vocab tokens.
  beams = (vocab - 1)**(length - 1) * vocab
  cfg = DecodeConfig(method='beam', num_beams=beams, length_penalty_alpha=alpha,
                     max_decode_length=length, eos_id=eos)
  seqs = np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)  # [N, length]
  n = len(seqs)
  if prefix_lm:
    prompts = np.array([[3, 2, 4], [2, 0, 0]], np.int32)
    batch = {'decoder_prompt_tokens': prompts}
  else:
    batch = {
        'encoder_input_tokens': np.array([[3, 5, 2, 4], [2, 3, 0, 0], [4, 4, 5, 0], [5, 0, 0, 0]],
                                         np.int32)
    }
  out = decoding.decode(model, params, batch, cfg, prefix_lm=prefix_lm,
                        mesh=partitioning.make_mesh(mesh) if mesh else None)
  shape = (vocab,) * length
  greedy_gaps = []
  for row in range(len(next(iter(batch.values())))):
    if prefix_lm:  # [0, prompt, sequence, padding]; the same width for both rows
      width = 1 + prompts.shape[1] + length
      used = 1 + int((prompts[row] != 0).sum())
      full = np.zeros((n, width), np.int32)
      full[:, 1:used] = prompts[row, :used - 1]
      full[:, used:used + length] = seqs
      causal = np.tile((np.arange(width) < used).astype(np.int32), (n, 1))
      logits = forward(model)(params,
                              dict(decoder_input_tokens=full[:, :-1],
                                   decoder_causal_attention=causal[:, :-1]))
      logits = np.asarray(logits)[:, used - 1:used - 1 + length]
    else:
      dec_in = np.concatenate([np.zeros((n, 1), np.int32), seqs[:, :-1]], 1)
      logits = np.asarray(
          forward(model)(params,
                         dict(
                             encoder_input_tokens=np.tile(batch['encoder_input_tokens'][row],
                                                          (n, 1)), decoder_input_tokens=dec_in)))
    token_lp_all = np.asarray(jax.nn.log_softmax(logits))  # [N, length, vocab]
    token_lp = np.take_along_axis(token_lp_all, seqs[..., None], -1)[..., 0]
    is_eos = seqs == eos
    ends = np.where(is_eos.any(1), is_eos.argmax(1), length - 1)  # index of the last token
    total = np.where(np.arange(length)[None] <= ends[:, None], token_lp, 0).sum(1)
    score = total / ((5.0 + ends + 1) / 6.0)**alpha
    best = score.max()
    got = np.asarray(out.tokens[row])
    index = int(np.ravel_multi_index(tuple(got), shape))  # zeros after EOS: same hypothesis
    np.testing.assert_allclose(float(out.scores[row]), best, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(score[index], best, rtol=1e-5, atol=1e-4)
    assert (got[ends[index] + 1:] == 0).all()
    greedy = []  # the argmax path, read off the same table
    as_index = lambda seq: int(np.ravel_multi_index(tuple(seq + [0] * (length - len(seq))), shape))
    while len(greedy) < length and eos not in greedy:
      greedy.append(int(token_lp_all[as_index(greedy), len(greedy)].argmax()))
    greedy_gaps.append(best - score[as_index(greedy)])
  assert max(greedy_gaps) > 0.01  # the optimum is not simply greedy's hypothesis
