"""Log-likelihood scoring and rank classification against independent recomputations.

The reference is always numpy: log-softmax of the logits that `model.apply` returns, gathered at
the targets and summed, on batches laid out by hand (not through the converters that `scoring`
uses). Tiny float32 models, vocab 128.
"""
import functools

import jax
import numpy as np
import flax.linen as nn
import optax
import pytest

from t5lite import losses, partitioning
from t5lite.partitioning import DEFAULT_RULES
from t5lite.data import converters
from t5lite.evaluation import scoring
from t5lite.models.presets import ModelConfig, model_config
from t5lite.models.t5 import make_model

EOS = 1


def tiny(architecture):
  c = model_config('tiny', vocab_size=128, architecture=architecture)
  c.dtype = 'float32'
  return ModelConfig.from_config(c)


def model_inputs(batch):
  return {k: v for k, v in batch.items() if k != 'decoder_loss_weights'}


def init(model, batch, seed=0):
  # jit: op-by-op init of even a tiny model compiles dozens of small kernels.
  init_fn = jax.jit(lambda key, x: model.init(key, **x))
  return nn.meta.unbox(init_fn(jax.random.PRNGKey(seed), model_inputs(batch)))['params']


@functools.lru_cache(maxsize=None)
def jitted_apply(model):
  return jax.jit(lambda params, x: model.apply({'params': params}, **x))


def numpy_scores(model, params, batch):
  """sum_t w_t log softmax(logits)_t[target_t], in float64 numpy from model.apply's logits."""
  logits = np.asarray(jitted_apply(model)(params, model_inputs(batch)), np.float64)
  top = logits.max(-1, keepdims=True)
  log_p = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
  target = np.take_along_axis(log_p, np.asarray(batch['decoder_target_tokens'])[..., None], -1)
  return (target[..., 0] * np.asarray(batch['decoder_loss_weights'])).sum(-1)


def text_batch(vocabulary, record) -> dict:
  """One encoder-decoder example {'inputs': text, 'targets': text} as a batch of one row, each
  feature EOS-terminated, unpadded (what infer scores)."""
  tgt = np.asarray([vocabulary.encode(record['targets']) + [EOS]])
  return {
      'encoder_input_tokens': np.asarray([vocabulary.encode(record['inputs']) + [EOS]]),
      'decoder_input_tokens': np.concatenate([np.zeros((1, 1), tgt.dtype), tgt[:, :-1]], 1),
      'decoder_target_tokens': tgt, 'decoder_loss_weights': np.ones(tgt.shape, np.float32)
  }


def random_examples(rng, n, max_in=7, max_tg=5):
  return [{
      'inputs': np.append(rng.randint(3, 128, rng.randint(1, max_in)), EOS),
      'targets': np.append(rng.randint(3, 128, rng.randint(1, max_tg)), EOS)
  } for _ in range(n)]


def features(architecture, examples, inputs_length, targets_length):
  if architecture == 'encoder_decoder':
    return converters.encdec_features(examples, inputs_length, targets_length, pack=False)
  return converters.prefix_lm_features(examples, inputs_length, targets_length, pack=False)


@functools.lru_cache(maxsize=None)
def built(architecture):
  """(model, params, four examples); shared by the tests so each shape compiles once."""
  model = make_model(tiny(architecture))
  examples = random_examples(np.random.RandomState(0), 4)
  return model, init(model, features(architecture, examples, 8, 6)), examples


@pytest.fixture(scope='module', params=['encoder_decoder', 'decoder_only'])
def case(request):
  return (request.param,) + built(request.param)


def test_score_batch_matches_numpy_log_softmax(case):
  architecture, model, params, examples = case
  batch = features(architecture, examples, 8, 6)
  got = scoring.score_batch(model, params, batch)
  assert got.shape == (4,) and np.all(got < 0)
  np.testing.assert_allclose(got, numpy_scores(model, params, batch), rtol=1e-5, atol=1e-4)
  # Prefix LM: only the targets are weighted, so the score is not the whole sequence's.
  if architecture == 'decoder_only':
    assert not np.array_equal(batch['decoder_loss_weights'], batch['decoder_target_tokens'] > 0)


def test_padding_and_batch_company_do_not_change_scores(case):
  architecture, model, params, examples = case
  reference = scoring.score_batch(model, params, features(architecture, examples, 8, 6))
  # More padding on every axis (longer rows, two all-zero extra rows).
  padded = converters.pad_rows(features(architecture, examples, 13, 11), 6)
  got = scoring.score_batch(model, params, padded)
  np.testing.assert_allclose(got[:4], reference, rtol=1e-5, atol=1e-4)
  assert np.all(got[4:] == 0)  # padding rows have no weighted tokens
  # The shortest example alone, at its own exact length (no padding at all), scores as it did
  # inside the padded batch. (One example: each new shape is a compile.)
  i = int(np.argmin([len(ex['inputs']) + len(ex['targets']) for ex in examples]))
  ex = examples[i]
  alone = features(architecture, [ex], len(ex['inputs']), len(ex['targets']))
  np.testing.assert_allclose(
      scoring.score_batch(model, params, alone)[0], reference[i], rtol=1e-5, atol=1e-4)


def test_score_batch_under_a_mesh_matches_single_device():
  model, params, examples = built('encoder_decoder')
  batch = features('encoder_decoder', examples, 8, 6)
  mesh = partitioning.make_mesh((2, 2, 2), jax.devices()[:8])
  with partitioning.activate(mesh, DEFAULT_RULES):  # shapes and logical names only
    boxed = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), **x), model_inputs(batch))
  shardings = partitioning.logical_shardings(boxed['params'], mesh, DEFAULT_RULES)
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))  # really split
  sharded = jax.device_put(params, shardings)
  got = scoring.score_batch(model, sharded, batch, mesh=mesh, rules=DEFAULT_RULES)
  np.testing.assert_allclose(got, scoring.score_batch(model, params, batch), rtol=1e-5, atol=1e-4)


# --- rank classification ------------------------------------------------------------------------


def brute_force_score(architecture, model, params, inputs, option, prefix_lm=True):
  """One (input, option) pair as a batch of one, laid out by hand: EOS appended to both,
  decoder inputs = targets shifted right behind a 0; for the prefix LM the input + its EOS and
  the BOS slot attend bidirectionally and only the option's tokens are weighted. Zero-padded to
  fixed lengths (8 encoder, 6 decoder; 14 for the prefix LM) so it compiles once; padding
  invariance itself is tested above against exact-length batches."""
  x, y = list(inputs) + [EOS], list(option) + [EOS]
  pad = lambda v, n: np.array([list(v) + [0] * (n - len(v))])
  if architecture == 'encoder_decoder':
    batch = dict(encoder_input_tokens=pad(x, 8), decoder_target_tokens=pad(y, 6),
                 decoder_input_tokens=pad([0] + y[:-1], 6), decoder_loss_weights=pad([1] * len(y),
                                                                                     6))
  else:
    seq = x + y
    batch = dict(decoder_target_tokens=pad(seq, 14), decoder_input_tokens=pad([0] + seq[:-1], 14),
                 decoder_loss_weights=pad([0] * len(x) + [1] * len(y),
                                          14), decoder_causal_attention=pad([1] * (len(x) + 1), 14))
    if not prefix_lm:  # plain causal LM: the input is read left to right too
      del batch['decoder_causal_attention']
  return numpy_scores(model, params, batch)[0]


def test_rank_classification_matches_brute_force(case):
  architecture, model, params, _ = case
  rng = np.random.RandomState(2)
  inputs = [list(rng.randint(3, 128, n)) for n in (4, 2, 6, 3)]
  # 1, 3, 2 and 4 options of lengths 1..4 tokens.
  options = [[list(rng.randint(3, 128, rng.randint(1, 5))) for _ in range(k)] for k in (1, 3, 2, 4)]
  result = scoring.rank_classification(model, params, inputs, options, batch_size=4)
  for i, (x, opts) in enumerate(zip(inputs, options)):
    expected = np.array([brute_force_score(architecture, model, params, x, o) for o in opts])
    np.testing.assert_allclose(result.log_likelihoods[i], expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(result.num_tokens[i], [len(o) + 1 for o in opts])
    order = np.sort(expected)
    if len(opts) == 1 or order[-1] - order[-2] > 1e-3:  # skip near-ties, decided by rounding
      assert result.predictions[i] == int(np.argmax(expected))
  assert result.predictions[0] == 0  # a single option is always the answer
  # Length-normalised: the ranking score is the per-token mean.
  normalised = scoring.rank_classification(model, params, inputs, options, batch_size=4,
                                           length_normalize=True)
  for i in range(len(inputs)):
    np.testing.assert_allclose(normalised.scores[i],
                               result.log_likelihoods[i] / result.num_tokens[i], rtol=1e-6)
    assert normalised.predictions[i] == int(np.argmax(normalised.scores[i]))
  if architecture == 'decoder_only':  # the causal-LM layout (prefix_lm=False)
    causal = scoring.rank_classification(model, params, inputs, options, batch_size=4,
                                         prefix_lm=False)
    for i, (x, opts) in enumerate(zip(inputs, options)):
      expected = [
          brute_force_score(architecture, model, params, x, o, prefix_lm=False) for o in opts
      ]
      np.testing.assert_allclose(causal.log_likelihoods[i], expected, rtol=1e-5, atol=1e-4)
    assert not np.allclose(causal.log_likelihoods[3], result.log_likelihoods[3])


class _Vocab:
  """Characters -> ids 3.. (enough for the text-input path)."""

  def encode(self, text):
    return [3 + ord(c) % 120 for c in text]


def test_rank_classification_text_and_errors(case):
  architecture, model, params, _ = case
  vocab = _Vocab()
  # batch_size 4 and lengths <= 8 as in the test above: the same compiled function.
  by_text = scoring.rank_classification(model, params, ['ab', 'c'], [['x', 'yz'], ['q']], vocab,
                                        batch_size=4)
  by_ids = scoring.rank_classification(
      model, params, [vocab.encode('ab'), vocab.encode('c')],
      [[vocab.encode('x'), vocab.encode('yz')], [vocab.encode('q')]], batch_size=4)
  np.testing.assert_allclose(np.concatenate(by_text.log_likelihoods),
                             np.concatenate(by_ids.log_likelihoods), rtol=1e-6)
  with pytest.raises(ValueError, match='no options'):
    scoring.rank_classification(model, params, [[5]], [[]])
  with pytest.raises(ValueError, match='pass a `vocab`'):
    scoring.rank_classification(model, params, ['text'], [['a']])
  with pytest.raises(ValueError, match='more than'):
    scoring.rank_classification(model, params, [[5, 6, 7]], [[[8]]], inputs_length=2)


def test_rank_classification_picks_the_trained_answer():
  """A model trained a few dozen steps to answer input A with X and input B with the longer Y
  ranks X first for A and Y first for B among the same three options: the choice depends on the
  input, and the longer answer wins for B although its sum has more terms to pay for."""
  model, params, _ = built('encoder_decoder')  # start from the shared random init
  inputs = [[5, 6, 7], [8, 9]]
  answers = [[10, 11], [20, 21, 22]]
  options = [[[10, 11], [20, 21, 22], [30]]] * 2
  train = converters.encdec_features(
      [{'inputs': np.array(x + [EOS]), 'targets': np.array(y + [EOS])}
       for x, y in zip(inputs, answers)], 8, 8, pack=False)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):

    def loss(p):
      logits = model.apply({'params': p}, **model_inputs(train))
      sums = losses.cross_entropy_sums(logits, train['decoder_target_tokens'],
                                       train['decoder_loss_weights'])
      return sums['loss_sum'] / sums['weight_sum']

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  for _ in range(40):
    params, opt_state, value = step(params, opt_state)
  assert float(value) < 0.5  # the two answers are learnt
  result = scoring.rank_classification(model, params, inputs, options, batch_size=4)
  np.testing.assert_array_equal(result.predictions, [0, 1])
  assert result.log_likelihoods[1][1] > result.log_likelihoods[1][2]  # 4 tokens beat 2
