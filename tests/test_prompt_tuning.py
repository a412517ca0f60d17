"""Prompt tuning (model.prompt_length; t5lite/models/prompt.py): the prompt model equals the base
model run on [prompt; embedded tokens] built by hand, cached decoding equals the full-forward
argmax loop, only the prompt trains (gradients, optimizer state, bitwise unchanged params), the
prompt starts as rows of the *loaded* embedding after init_from, a sharded run resumes bitwise,
and on the offline docstring_kind task prompt tuning lowers the held-out loss of a briefly
pretrained quickstart model."""
import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite import checkpoints, optim, train, trainer
from t5lite.config import ConfigError, validate
from t5lite.data import pipeline
from t5lite.models import decoding
from t5lite.models import prompt as prompt_lib
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model

# the quickstart model, float32, short runs (shared with the freezing tests)
from test_freeze import tiny_config
from test_scoring import numpy_scores, text_batch  # a numpy log-softmax reference

SMALL = dict(vocab_size=128, d_model=32, d_ff=64, num_heads=2, head_dim=16, num_encoder_layers=1,
             num_decoder_layers=1, dtype='float32', prompt_init_vocab=100)
P = 3


def small(architecture, prompt_length=P, variant='v1_1', scan=False):
  cfg = ModelConfig(architecture=architecture, prompt_length=prompt_length, variant=variant,
                    scan_layers=scan, **SMALL)
  return make_model(cfg)


def init(model, rows=2, length=6):
  batch = {'decoder_input_tokens': jnp.ones((rows, length), jnp.int32)}
  if model.cfg.architecture == 'encoder_decoder':
    batch['encoder_input_tokens'] = jnp.ones((rows, length), jnp.int32)
  return jax.jit(lambda key: nn.meta.unbox(model.init(key, **batch))['params'])(
      jax.random.PRNGKey(0))


def without_prompt(params):
  return {k: v for k, v in params.items() if k != 'prompt'}


# --- the model: reference equality and decoding ---------------------------------------------


@pytest.mark.parametrize('variant,scan', [('v1_0', False), ('v1_1', True)])
def test_encoder_decoder_equals_the_base_model_on_prompt_then_tokens(variant, scan):
  model = small('encoder_decoder', variant=variant, scan=scan)
  base = small('encoder_decoder', 0, variant, scan)
  params = init(model)
  rows = np.asarray(params['prompt']['embedding'])
  table = np.asarray(params['token_embedder']['embedding'])
  # the init: distinct rows of the token embedding, from ids 3 .. 3 + prompt_init_vocab - 1
  ids = [int(np.flatnonzero((table == r).all(1))[0]) for r in rows]
  assert len(set(ids)) == P and all(3 <= i < 103 for i in ids), ids
  tokens = np.array([[5, 9, 4, 1, 0, 0], [7, 1, 0, 0, 0, 0]])
  dec_in = np.array([[0, 11, 12, 13], [0, 14, 15, 0]])
  targets = np.array([[11, 12, 13, 1], [14, 15, 1, 0]])
  logits = jax.jit(model.apply)({'params': params}, tokens, dec_in, targets)

  # By hand: the base model's own encoder and decoder on [prompt; embedded], the prompt's segment
  # the example's (1), the decoder cross-attending to all of it.
  def reference(m):
    embedded = jnp.concatenate([jnp.broadcast_to(rows, (2,) + rows.shape), table[tokens]], 1)
    segments = jnp.concatenate([jnp.ones((2, P), jnp.int32), (tokens > 0).astype(jnp.int32)], 1)
    encoded = m.encoder(embedded, segments, True)
    x = m.decoder(m.embedder(dec_in), (targets > 0).astype(jnp.int32), True, encoded=encoded,
                  encoder_segments=segments)
    return encoded, (m.embedder.attend(x * SMALL['d_model']**-0.5)
                     if variant == 'v1_0' else m.logits_dense(x))

  encoded, want = jax.jit(lambda p: base.apply({'params': p}, method=reference))(
      without_prompt(params))
  got = jax.jit(lambda p: model.apply({'params': p}, tokens, method='encode'))(params)
  np.testing.assert_allclose(got, encoded, atol=1e-6)
  np.testing.assert_allclose(logits, want, atol=1e-5)
  # and the prompt matters
  plain = jax.jit(base.apply)({'params': without_prompt(params)}, tokens, dec_in, targets)
  assert not np.allclose(plain, logits, atol=1e-3)


def test_decoder_only_equals_the_base_model_on_prompt_then_tokens():
  model, base = small('decoder_only'), small('decoder_only', 0)
  params = init(model)
  rows = np.asarray(params['prompt']['embedding'])
  table = np.asarray(params['token_embedder']['embedding'])
  tokens = np.array([[0, 5, 9, 4, 8], [0, 7, 6, 0, 0]])
  causal = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])  # prefix LM: the prompt joins the prefix

  def reference(m):
    embedded = jnp.concatenate([jnp.broadcast_to(rows, (2,) + rows.shape), table[tokens]], 1)
    segments = jnp.concatenate([jnp.ones((2, P), jnp.int32), (tokens > 0) | (causal > 0)], 1)
    flags = jnp.concatenate([jnp.ones((2, P), jnp.int32), causal], 1)
    x = m.decoder(embedded, segments.astype(jnp.int32), True, causal_attention=flags)
    return m.logits_dense(x)[:, P:]

  segments = ((tokens > 0) | (causal > 0)).astype(np.int32)
  got = jax.jit(lambda p: model.apply({'params': p}, tokens, decoder_segment_ids=segments,
                                      decoder_causal_attention=causal))(params)
  want = jax.jit(lambda p: base.apply({'params': p}, method=reference))(without_prompt(params))
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('architecture', ['encoder_decoder', 'decoder_only'])
def test_cached_decoding_applies_the_prompt(architecture):
  """Cached decoding (the prompt in the cache, cache_index past it) == the uncached loop, which
  re-runs the full forward pass over the whole sequence at every step."""
  model = small(architecture)
  params = init(model)
  if architecture == 'encoder_decoder':
    batch = {'encoder_input_tokens': np.array([[5, 6, 7, 1, 0, 0], [9, 8, 1, 0, 0, 0]])}
    modes = [('greedy', False)]
  else:  # prompts of different lengths: per-row cache_index; prefix LM: the prompt is bidirectional
    batch = {'decoder_prompt_tokens': np.array([[5, 6, 7, 0], [9, 0, 0, 0]])}
    modes = [('greedy', False), ('beam', False), ('greedy', True)]
  for method, prefix_lm in modes:
    # eos_id past the vocabulary: every step runs for every row
    cfg = decoding.DecodeConfig(method=method, max_decode_length=5, num_beams=3, eos_id=128)
    a = decoding.decode(model, params, batch, cfg, prefix_lm=prefix_lm)
    b = decoding.decode(model, params, batch, cfg, prefix_lm=prefix_lm, use_cache=False)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    assert (a.tokens > 0).all()
  # the prompt is applied: without it the same params decode differently
  base = small(architecture, 0)
  c = decoding.decode(base, without_prompt(params), batch, cfg, prefix_lm=prefix_lm)
  assert not np.array_equal(a.tokens, c.tokens)


def test_only_the_prompt_gets_gradients():
  model = small('encoder_decoder')
  params = init(model)
  patterns = optim.trainable_patterns(type('T', (), {'trainable': ()})(), model.cfg)
  assert patterns == (optim.PROMPT_TRAINABLE,)

  def loss(p):
    return model.apply({'params': p}, np.array([[5, 6, 1]]), np.array([[0, 7, 8]])).sum()

  grads = jax.jit(jax.grad(optim.frozen_stop_gradient(loss, patterns)))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = optim.param_name(path)
    assert (np.abs(g).sum() > 0) == (name == 'prompt/embedding'), name
  # train.trainable adds to the prompt
  extra = type('T', (), {'trainable': ('^decoder/',)})()
  assert optim.trainable_patterns(extra, model.cfg) == ('^prompt/', '^decoder/')
  assert optim.trainable_patterns(extra, small('encoder_decoder', 0).cfg) == ('^decoder/',)
  # with LoRA too: the factors, the prompt, then what train.trainable adds
  both = dataclasses.replace(model.cfg, lora_rank=4)
  assert optim.trainable_patterns(extra, both) == (optim.LORA_FACTORS, '^prompt/', '^decoder/')


# --- config ------------------------------------------------------------------------------------


def prompt_config(steps, **overrides):
  """Prompt tuning on docstring_kind ('docstring kind: <24 words>' -> reference | library)."""
  settings = dict(model__prompt_length=8, model__prompt_init_vocab=1900,
                  data__task='docstring_kind', data__pack=False, data__inputs_length=64,
                  data__targets_length=4, optimizer__learning_rate=0.3)
  return tiny_config(steps, **{**settings, **overrides})


def test_config_errors():
  with pytest.raises(ConfigError, match='data.pack=True'):
    validate(prompt_config(1, data__pack=True), 8)
  with pytest.raises(ConfigError, match='prompt_init_vocab=5000.*past model.vocab_size=2048'):
    validate(prompt_config(1, model__prompt_init_vocab=5000), 8)
  with pytest.raises(ConfigError, match='below model.prompt_length'):
    validate(prompt_config(1, model__prompt_init_vocab=4), 8)
  with pytest.raises(ConfigError, match='prompt_length'):
    validate(prompt_config(1, model__prompt_length=-1), 8)


# --- through train.run: init_from a base model, sharded, resume, the downstream task ----------


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A briefly pretrained quickstart model (span corruption)."""
  workdir = str(tmp_path_factory.mktemp('base'))
  # one device: the quickest compile (the tuned run below is the sharded one)
  train.run(
      tiny_config(20, optimizer__learning_rate=0.01, checkpoint__every_steps=0,
                  train__log_every=10), workdir,
      jax.devices()[:1])
  return workdir, checkpoints.restore_as_numpy(workdir)[1]['params']


STEPS = 6


@pytest.fixture(scope='module')
def tuned(base, tmp_path_factory):
  """Prompt tuning of `base` on docstring_kind, on a data x fsdp x tensor = 2 x 2 x 2 mesh; also
  returns the run's initial state (trainer.initial_state, recorded as train.run calls it)."""
  workdir = str(tmp_path_factory.mktemp('tuned'))
  config = prompt_config(STEPS, checkpoint__init_from=base[0], checkpoint__every_steps=3,
                         mesh__fsdp=2, mesh__tensor=2)
  seen = []

  def recorded(*args, **kwargs):
    init = initial_state(*args, **kwargs)
    # copied now: the train step donates the state's buffers
    names = [
        optim.param_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(init.state.opt_state)
    ]
    seen.append((init.source, jax.device_get(init.state.params['prompt']['embedding']), names))
    return init

  initial_state = trainer.initial_state
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, 'initial_state', recorded)
    train.run(config, workdir)
  return config, workdir, seen[0]


def test_the_prompt_starts_from_the_loaded_embedding(base, tuned):
  source, prompt, names = tuned[2]
  assert 'soft prompt drawn from the loaded token embedding' in source, source
  table = base[1]['token_embedder']['embedding']
  ids = [int(np.flatnonzero((table == r).all(1))[0]) for r in prompt]
  assert len(set(ids)) == 8 and all(3 <= i < 1903 for i in ids), ids
  # the only optimizer state is the prompt's (Adafactor's factored statistics, and counts)
  statistics = [n for n in names if not n.endswith('/count')]
  assert statistics and all(n.endswith('/prompt/embedding') for n in statistics), names


def test_only_the_prompt_trains_and_resume_is_bitwise(base, tuned, tmp_path):
  config, workdir, _ = tuned
  step, end = checkpoints.restore_as_numpy(workdir)
  assert step == STEPS
  for path, value in jax.tree_util.tree_leaves_with_path(end['params']):
    name = optim.param_name(path)
    if name == 'prompt/embedding':
      continue
    start = base[1]
    for key in name.split('/'):
      start = start[key]
    assert np.array_equal(start, value), name  # frozen: the base's bits
  _, first = checkpoints.restore_as_numpy(workdir, 3)
  assert not np.array_equal(first['params']['prompt']['embedding'],
                            end['params']['prompt']['embedding'])
  # interrupted after the save of step 3: the resume gives the same final state, bitwise
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', str(STEPS)))  # resumes from step 3
  train.run(config, resumed)
  _, again = checkpoints.restore_as_numpy(resumed)
  jax.tree.map(np.testing.assert_array_equal, again, end)


def held_out_loss(config, params):
  """Cross-entropy per target token on docstring_kind's validation split, by numpy over the
  logits of the model `params` fit (with or without a prompt)."""
  prompt_length = config.model.prompt_length if 'prompt' in params else 0
  model = make_model(ModelConfig.from_config({**config.model, 'prompt_length': prompt_length}))
  _, vocabulary = train.build_data(config)
  it = pipeline.make_task_iterator('docstring_kind', feature_lengths={'inputs': 64, 'targets': 4},
                                   global_batch_size=64, seed=0, split='validation', shuffle=False,
                                   repeat=False, pack=False, vocabulary=vocabulary)
  total = weight = 0.0
  apply = jax.jit(model.apply)
  for batch in it:
    inputs = {k: v for k, v in batch.items() if k != 'decoder_loss_weights'}
    logits = np.asarray(apply({'params': params}, **inputs), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, batch['decoder_target_tokens'][..., None], -1)[..., 0]
    total -= float((picked * batch['decoder_loss_weights']).sum())
    weight += float(batch['decoder_loss_weights'].sum())
  return total / weight


def test_prompt_tuning_beats_the_untuned_model(base, tuned):
  config, workdir, _ = tuned
  _, end = checkpoints.restore_as_numpy(workdir)
  untuned = held_out_loss(config, base[1])
  start = held_out_loss(config,
                        prompt_lib.resample(base[1], 0, ModelConfig.from_config(config.model)))
  after = held_out_loss(config, end['params'])
  print(f'docstring_kind held-out loss: untuned {untuned:.3f}, with the initial prompt '
        f'{start:.3f}, after {STEPS} steps of prompt tuning {after:.3f}')
  assert after < untuned - 1.0 and after < start - 1.0


def test_infer_scores_with_the_prompt(base, tuned, tmp_path):
  """`t5lite.infer --mode score` on the prompt-tuned checkpoint: each target's log-likelihood is
  the prompt model's (a numpy log-softmax over its logits), not the base model's."""
  from t5lite import infer  # pylint: disable=import-outside-toplevel
  config, workdir, _ = tuned
  records = [{
      'inputs': 'docstring kind: Return the absolute value of a number.', 'targets': 'library'
  }, {'inputs': 'docstring kind: The assignment statement binds names.', 'targets': 'reference'}]
  source = tmp_path / 'in.jsonl'
  source.write_text(''.join(json.dumps(r) + '\n' for r in records))
  config = config.copy_and_resolve_references()
  config.infer.mode = 'score'
  infer.run(config, str(tmp_path / 'out.jsonl'), 'latest', workdir, input=str(source))
  got = [json.loads(line)['log_likelihood'] for line in open(tmp_path / 'out.jsonl')]

  _, vocabulary = train.build_data(config)
  _, end = checkpoints.restore_as_numpy(workdir)

  def log_likelihood(params, prompt_length, record):
    model = make_model(ModelConfig.from_config({**config.model, 'prompt_length': prompt_length}))
    return float(numpy_scores(model, params, text_batch(vocabulary, record))[0])

  want = [log_likelihood(end['params'], config.model.prompt_length, r) for r in records]
  untuned = [log_likelihood(base[1], 0, r) for r in records]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(want) - np.asarray(untuned)).min() > 0.1, (want, untuned)
