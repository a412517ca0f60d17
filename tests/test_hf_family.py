"""More of the T5 family against transformers (t5lite/hf.py, model.relpos_per_layer,
model.mlp_activation): UMT5 (a relative position bias in every self-attention layer) and T5 with
gated-SiLU (UL2) / gated-ReLU MLPs. Float32 logits on padded batches, greedy decoding token by
token (the per-layer bias in cached decoding), bitwise round trips both ways in both param
layouts. Tiny random models built here with a fixed torch seed: nothing is downloaded."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from t5lite import hf
from t5lite.models import decoding
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model

DIMS = dict(d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=3,
            dropout_rate=0.0, relative_attention_num_buckets=16, relative_attention_max_distance=24)
# cls, HF config fields, and the t5lite fields the conversion must give.
KINDS = {
    # UMT5 as released (google/umt5-*: gated-gelu, untied lm_head).
    'umt5': ('UMT5', dict(vocab_size=160, feed_forward_proj='gated-gelu',
                          tie_word_embeddings=False),
             dict(variant='v1_1', mlp_activation='', relpos_per_layer=True)),
    # UMT5 with T5 v1.0's ReLU MLP and tied, rescaled logits: every field of the mapping at once.
    'umt5_v1_0': ('UMT5', dict(vocab_size=128, feed_forward_proj='relu', tie_word_embeddings=True),
                  dict(variant='v1_0', mlp_activation='', relpos_per_layer=True)),
    # UL2's MLP (T5Config feed_forward_proj 'gated-silu', untied).
    'gated_silu': ('T5',
                   dict(vocab_size=128, feed_forward_proj='gated-silu', tie_word_embeddings=False),
                   dict(variant='v1_1', mlp_activation='gated-silu', relpos_per_layer=False)),
    'gated_relu': ('T5',
                   dict(vocab_size=128, feed_forward_proj='gated-relu', tie_word_embeddings=False),
                   dict(variant='v1_1', mlp_activation='gated-relu', relpos_per_layer=False)),
}
HF_ATTRS = ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers', 'num_decoder_layers',
            'num_heads', 'relative_attention_num_buckets', 'relative_attention_max_distance',
            'layer_norm_epsilon', 'dense_act_fn', 'is_gated_act', 'is_encoder_decoder',
            'model_type')


def build_hf(kind, seed=0):
  """A random HF model of `kind`; an untied lm_head of its own where the kind is untied
  (transformers 5.x builds a tied one from tie_word_embeddings=False; see docs/hf.md)."""
  cls, spec, _ = KINDS[kind]
  spec = {**spec, **DIMS}
  torch.manual_seed(seed)
  model = getattr(transformers,
                  f'{cls}ForConditionalGeneration')(getattr(transformers, f'{cls}Config')(**spec))
  with torch.no_grad():
    # Position-bias tables larger than HF's init, each layer's its own values, so that a wrong
    # bucket or a table taken from the wrong layer shows in the logits.
    for name, p in model.named_parameters():
      if name.endswith('relative_attention_bias.weight'):
        p.normal_(0.0, 1.0)
      if name.endswith(('.o.weight', '.wo.weight')):  # the layers, not the residual, decide
        p.mul_(3.0)
    if not spec['tie_word_embeddings']:
      model.lm_head = torch.nn.Linear(spec['d_model'], spec['vocab_size'], bias=False)
      model.lm_head.weight.normal_(0.0, 1.0)
  return model.eval()


@pytest.fixture(scope='module')
def hf_models(tmp_path_factory):
  """kind -> (HF model, its save_pretrained directory), built once for the module."""
  models = {}
  for kind in KINDS:
    path = str(tmp_path_factory.mktemp(kind))
    models[kind] = (build_hf(kind), path)
    models[kind][0].save_pretrained(path)
  return models


def padded_batch(vocab, seed=0, batch=3, inputs=30, targets=20):
  """Right-padded encoder inputs and decoder targets, rows of different lengths; longer than
  max_distance, so the log-spaced and clipped buckets are used."""
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, vocab, (batch, inputs))
  tgt = rng.randint(2, vocab, (batch, targets))
  for row, (n_in, n_tgt) in enumerate([(inputs, targets), (17, 9), (5, 2)][:batch]):
    enc[row, n_in:] = 0
    tgt[row, n_tgt:] = 0
  dec_in = np.concatenate([np.zeros((batch, 1), np.int64), tgt[:, :-1]], axis=1)
  return enc, dec_in, tgt


def t5lite_model(fields, scan_layers=False):
  cfg = ModelConfig(**{k: v for k, v in fields.items() if k != 'attention_dim'}, dtype='float32',
                    scan_layers=scan_layers)
  return make_model(cfg)


def hf_logits(model, enc, dec_in, tgt):
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec_in),
                 decoder_attention_mask=torch.tensor(tgt > 0)).logits.numpy()


@pytest.mark.parametrize('kind,scan_layers', [('umt5', False), ('umt5', True), ('umt5_v1_0', False),
                                              ('gated_silu', False), ('gated_relu', True)])
def test_logits_match_transformers(hf_models, kind, scan_layers):
  model, path = hf_models[kind]
  fields, params = hf.load_hf(path, scan_layers=scan_layers)
  assert {k: fields[k] for k in KINDS[kind][2]} == KINDS[kind][2]
  if scan_layers and fields['relpos_per_layer']:  # one table per layer, stacked as scan wants
    assert params['encoder']['layers']['relpos_bias']['rel_embedding'].shape == (2, 16, 4)
  t5 = t5lite_model(fields, scan_layers)
  enc, dec_in, tgt = padded_batch(fields['vocab_size'])
  ours = np.asarray(
      jax.jit(t5.apply)({'params': params}, encoder_input_tokens=enc, decoder_input_tokens=dec_in,
                        decoder_target_tokens=tgt))
  theirs = hf_logits(model, enc, dec_in, tgt)
  real = tgt > 0  # padded target positions carry no meaning in either model
  error = np.max(np.abs(ours[real] - theirs[real])) / np.max(np.abs(theirs[real]))
  assert error < 1e-5, (kind, error)


@pytest.mark.parametrize('kind', ['umt5', 'gated_silu'])
def test_greedy_decoding_matches_generate(hf_models, kind):
  """Cached decoding reads each layer's own bias row at each example's position."""
  model, path = hf_models[kind]
  fields, params = hf.load_hf(path)
  t5 = t5lite_model(fields)
  enc, _, _ = padded_batch(fields['vocab_size'], seed=2)
  steps = 10
  # use_cache=False: transformers 5.x's generate cache is sized by num_layers and breaks with
  # more decoder layers (as here); without it, generate recomputes: the same tokens.
  with torch.no_grad():
    theirs = model.generate(torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                            do_sample=False, num_beams=1, max_new_tokens=steps, min_length=0,
                            decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                            use_cache=False).numpy()[:, 1:]  # the start token (0) dropped
  # generate stops when every row has ended; t5lite always returns max_decode_length tokens.
  theirs = np.pad(theirs, ((0, 0), (0, steps - theirs.shape[1])))
  ours = decoding.decode(t5, params, {'encoder_input_tokens': jnp.asarray(enc, jnp.int32)},
                         decoding.DecodeConfig(method='greedy', max_decode_length=steps, eos_id=1))
  np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)
  assert len(set(theirs.ravel().tolist())) > 3  # not a degenerate repeat of one token


@pytest.mark.parametrize('kind', list(KINDS))
def test_hf_to_t5lite_to_hf_is_bitwise(hf_models, kind, tmp_path):
  model, path = hf_models[kind]
  original = load_file(os.path.join(path, 'model.safetensors'))
  for scan_layers in (False, True):
    fields, params = hf.load_hf(path, scan_layers=scan_layers)
    out = str(tmp_path / f'scan{scan_layers}')
    hf.save_hf(params, fields, out)
    written = load_file(os.path.join(out, 'model.safetensors'))
    assert sorted(written) == sorted(original)
    for name, x in original.items():
      assert written[name].dtype == x.dtype and np.array_equal(written[name], x), name
    assert hf.model_config_from_hf(hf.read_config(out), written) == fields
    a, b = (transformers.AutoConfig.from_pretrained(p) for p in (path, out))
    for attr in HF_ATTRS:
      assert getattr(a, attr) == getattr(b, attr), attr
  # transformers loads the written directory into the same class and the same function.
  reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  enc, dec_in, tgt = padded_batch(model.config.vocab_size, seed=1)
  assert np.array_equal(hf_logits(reloaded, enc, dec_in, tgt), hf_logits(model, enc, dec_in, tgt))


def random_t5lite_params(cfg, seed=0):
  """Random values in the exact tree that the t5lite model's init makes (names and shapes)."""
  model = make_model(cfg)
  tokens = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), encoder_input_tokens=tokens, decoder_input_tokens=tokens))[
          'params'])
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize('variant,mlp_activation,relpos_per_layer', [('v1_1', '', True),
                                                                     ('v1_0', 'gated-silu', True),
                                                                     ('v1_1', 'gated-relu', False),
                                                                     ('v1_1', 'relu', False)])
def test_t5lite_to_hf_to_t5lite_is_bitwise(variant, mlp_activation, relpos_per_layer, tmp_path):
  for scan_layers in (False, True):
    cfg = ModelConfig(vocab_size=96, d_model=16, d_ff=24, num_heads=2, head_dim=8,
                      num_encoder_layers=3, num_decoder_layers=2, variant=variant,
                      mlp_activation=mlp_activation, relpos_per_layer=relpos_per_layer,
                      relative_attention_num_buckets=12, dtype='float32', scan_layers=scan_layers)
    params = random_t5lite_params(cfg)
    out = str(tmp_path / f'scan{scan_layers}')
    hf.save_hf(params, cfg, out)
    config = json.load(open(os.path.join(out, 'config.json')))
    assert config['model_type'] == ('umt5' if relpos_per_layer else 't5')
    fields, back = hf.load_hf(out, scan_layers=scan_layers)
    assert fields == {k: getattr(cfg, k) for k in hf.MODEL_FIELDS}
    assert set(hf.flatten(back)) == set(hf.flatten(params))
    for name, x in hf.flatten(params).items():
      assert np.array_equal(hf.flatten(back)[name], x), name


def test_relpos_per_layer_params_and_unchanged_defaults():
  """Defaults keep T5's one table per stack (the same param tree as before the field); the
  per-layer tables are per layer unscanned and one stacked param scanned."""

  def tree(**kw):
    cfg = ModelConfig(vocab_size=64, d_model=16, d_ff=24, num_heads=2, head_dim=8,
                      num_encoder_layers=2, num_decoder_layers=3, dtype='float32', **kw)
    return {n: tuple(x.shape) for n, x in hf.flatten(random_t5lite_params(cfg)).items()}

  relpos = lambda names: {n for n in names if 'relpos' in n}
  shared = tree()
  assert relpos(shared) == {
      'encoder/relpos_bias/rel_embedding', 'decoder/relpos_bias/rel_embedding'
  }
  per_layer = tree(relpos_per_layer=True)
  want = [
      f'{stack}/layers_{i}/relpos_bias/rel_embedding'
      for stack, n in (('encoder', 2), ('decoder', 3)) for i in range(n)
  ]
  assert relpos(per_layer) == set(want)
  assert set(shared) - relpos(shared) == set(per_layer) - relpos(per_layer)
  scanned = tree(relpos_per_layer=True, scan_layers=True)
  assert scanned['decoder/layers/relpos_bias/rel_embedding'] == (3, 32, 2)
  assert 'decoder/relpos_bias/rel_embedding' not in scanned
  gated = tree(mlp_activation='gated-silu', variant='v1_0')
  assert gated['encoder/layers_0/mlp/wi_1/kernel'] == (16, 24)
  assert 'logits_dense/kernel' not in gated  # v1_0: tied
  relu = tree(mlp_activation='relu')
  assert 'encoder/layers_0/mlp/wi/kernel' in relu and 'logits_dense/kernel' in relu


@pytest.mark.parametrize('edit,expected', [
    ({'feed_forward_proj': 'gated-gelu', 'dense_act_fn': 'gelu'
     }, "a gated MLP with activation 'gelu'; t5lite's gated MLPs are gated-gelu, gated-silu"),
    ({'feed_forward_proj': 'silu', 'dense_act_fn': 'silu', 'is_gated_act': False
     }, "a non-gated MLP with activation 'silu'"),
])
def test_activations_t5lite_cannot_compute_are_refused(edit, expected):
  config = json.loads(build_hf('gated_silu').config.to_json_string(use_diff=False))
  config.update(edit)
  with pytest.raises(hf.HFConversionError, match=expected):
    hf.model_config_from_hf(config)


def test_an_old_saved_config_without_the_new_fields_converts_as_before():
  """A t5lite checkpoint's config.model saved before mlp_activation / relpos_per_layer existed."""
  cfg = ModelConfig(vocab_size=64, d_model=16, d_ff=24, num_heads=2, head_dim=8,
                    num_encoder_layers=1, num_decoder_layers=1, dtype='float32')
  old = {
      k: v for k, v in dataclasses.asdict(cfg).items()
      if k not in ('mlp_activation', 'relpos_per_layer')
  }
  assert hf.hf_config_from_model_config(old) == hf.hf_config_from_model_config(cfg)
  assert [e[0] for e in hf.weight_map(old)] == [e[0] for e in hf.weight_map(cfg)]


def test_init_from_hf_checks_the_mlp_as_computed(hf_models):
  """checkpoint.init_from=hf:DIR's check: '' and the variant's own activation are one MLP."""
  fields = hf.load_hf(hf_models['umt5'][1])[0]
  assert hf.config_mismatches(hf_models['umt5'][1], dict(fields, mlp_activation='gated-gelu')) == []
  problems = hf.config_mismatches(
      hf_models['gated_silu'][1],
      dict(fields, relpos_per_layer=False, mlp_activation='', vocab_size=128))
  assert problems == [
      f"model.mlp_activation='' but {hf_models['gated_silu'][1]}/config.json "
      "gives 'gated-silu'"
  ]
