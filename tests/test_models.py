"""Model-level invariants: packing, scan == unrolled, prefix LM visibility, parameter counts."""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from t5lite.models.presets import ModelConfig, model_config
from t5lite.models.t5 import make_model


def tiny(architecture='encoder_decoder', variant='v1_1', **overrides):
  c = model_config('tiny', variant=variant, vocab_size=128, architecture=architecture)
  c.dtype = 'float32'
  c.update(overrides)
  return ModelConfig.from_config(c)


def init(model, batch):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), **batch))['params']


def test_packed_equals_unpacked_encoder_decoder():
  model = make_model(tiny())
  rng = np.random.RandomState(0)
  a_in, a_tg = rng.randint(3, 128, 5), rng.randint(3, 128, 4)
  b_in, b_tg = rng.randint(3, 128, 3), rng.randint(3, 128, 2)
  shift = lambda t: np.concatenate([[0], t[:-1]])
  pad = lambda x, n: np.pad(x, (0, n - len(x)))
  packed = dict(encoder_input_tokens=pad(np.concatenate([a_in, b_in]), 10)[None],
                encoder_segment_ids=pad(np.array([1] * 5 + [2] * 3), 10)[None],
                decoder_input_tokens=pad(np.concatenate([shift(a_tg), shift(b_tg)]), 8)[None],
                decoder_target_tokens=pad(np.concatenate([a_tg, b_tg]), 8)[None],
                decoder_segment_ids=pad(np.array([1] * 4 + [2] * 2), 8)[None])
  params = init(model, packed)
  packed_logits = model.apply({'params': params}, **packed)
  for inp, tgt, enc_span, dec_span in ((a_in, a_tg, slice(0, 5), slice(0, 4)),
                                       (b_in, b_tg, slice(5, 8), slice(4, 6))):
    alone = dict(encoder_input_tokens=pad(inp, 7)[None],
                 decoder_input_tokens=pad(shift(tgt), 6)[None], decoder_target_tokens=pad(tgt,
                                                                                          6)[None])
    alone_logits = model.apply({'params': params}, **alone)
    np.testing.assert_allclose(packed_logits[0, dec_span], alone_logits[0, :len(tgt)], rtol=1e-5,
                               atol=1e-5)


def test_packed_equals_unpacked_prefix_lm():
  model = make_model(tiny('decoder_only'))
  rng = np.random.RandomState(1)
  a, b = rng.randint(3, 128, 6), rng.randint(3, 128, 4)
  shift = lambda t: np.concatenate([[0], t[:-1]])
  packed = dict(decoder_input_tokens=np.concatenate([shift(a), shift(b), [0, 0]])[None],
                decoder_target_tokens=np.concatenate([a, b, [0, 0]])[None],
                decoder_segment_ids=np.array([1] * 6 + [2] * 4 + [0, 0])[None],
                decoder_causal_attention=np.array([1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0])[None])
  params = init(model, packed)
  packed_logits = model.apply({'params': params}, **packed)
  alone = dict(decoder_input_tokens=shift(b)[None], decoder_target_tokens=b[None],
               decoder_causal_attention=np.array([[1, 1, 0, 0]]))
  np.testing.assert_allclose(packed_logits[0, 6:10],
                             model.apply({'params': params}, **alone)[0], rtol=1e-5, atol=1e-5)


def test_prefix_lm_sees_the_whole_prefix_and_causal_lm_does_not():
  model = make_model(tiny('decoder_only'))
  tokens = np.array([[0, 5, 6, 7, 8, 9]])
  changed = tokens.copy()
  changed[0, 2] = 50  # a later position inside the prefix
  prefix = np.array([[1, 1, 1, 0, 0, 0]])
  params = init(model, dict(decoder_input_tokens=tokens))
  run = lambda t, p: np.asarray(
      model.apply({'params': params}, decoder_input_tokens=t, decoder_causal_attention=p))
  # Prefix LM: position 0 attends bidirectionally to position 2.
  assert np.abs(run(tokens, prefix)[0, 0] - run(changed, prefix)[0, 0]).max() > 1e-4
  # Causal LM: position 0 never sees position 2.
  np.testing.assert_allclose(run(tokens, None)[0, :2], run(changed, None)[0, :2], atol=1e-6)


# relpos_per_layer: each layer's own position-bias table, stacked like the other layer params.
@pytest.mark.parametrize('architecture,relpos_per_layer', [('encoder_decoder', False),
                                                           ('decoder_only', False),
                                                           ('encoder_decoder', True),
                                                           ('decoder_only', True)])
def test_scan_equals_unrolled(architecture, relpos_per_layer):
  batch = dict(decoder_input_tokens=np.array([[0, 5, 6, 7]]),
               decoder_target_tokens=np.array([[5, 6, 7, 1]]))
  if architecture == 'encoder_decoder':
    batch['encoder_input_tokens'] = np.array([[3, 4, 5, 1, 0]])
  unrolled = make_model(tiny(architecture, relpos_per_layer=relpos_per_layer))
  scanned = make_model(
      tiny(architecture, scan_layers=True, remat_policy='full', relpos_per_layer=relpos_per_layer))
  params = init(unrolled, batch)

  def stack(stack_params, n):
    layers = [stack_params.pop(f'layers_{i}') for i in range(n)]
    stack_params['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return stack_params

  scanned_params = jax.tree.map(lambda x: x, params)
  for name in ('encoder', 'decoder'):
    if name in scanned_params:
      scanned_params[name] = stack(dict(scanned_params[name]), 2)
  assert jax.tree.structure(scanned_params) == jax.tree.structure(init(scanned, batch))
  np.testing.assert_allclose(unrolled.apply({'params': params}, **batch),
                             scanned.apply({'params': scanned_params}, **batch), rtol=1e-5,
                             atol=1e-5)


def test_v1_0_ties_logits_to_the_embedding():
  model = make_model(tiny(variant='v1_0'))
  batch = dict(encoder_input_tokens=np.array([[3, 4, 1]]), decoder_input_tokens=np.array([[0, 3]]))
  params = init(model, batch)
  assert 'logits_dense' not in params and 'wi' in params['encoder']['layers_0']['mlp']
  assert 'logits_dense' in init(make_model(tiny()), batch)


def closed_form_param_count(d_model, d_ff, heads, head_dim, n_enc, n_dec, vocab, gated, tied,
                            buckets=32):
  """Written from the architecture description, independently of the model code."""
  inner = heads * head_dim
  attention = 4 * d_model * inner
  mlp = (3 if gated else 2) * d_model * d_ff
  encoder_layer = attention + mlp + 2 * d_model
  decoder_layer = 2 * attention + mlp + 3 * d_model
  total = vocab * d_model  # shared embedding
  total += n_enc * encoder_layer + d_model + buckets * heads
  total += n_dec * decoder_layer + d_model + buckets * heads
  if not tied:
    total += d_model * vocab
  return total


PUBLISHED_V1_1 = {'small': 77e6, 'base': 248e6, 'large': 783e6, 'xl': 2.85e9, 'xxl': 11.1e9}
DIMS_V1_1 = {  # d_model, d_ff, heads, head_dim, layers: T5.1.1 release notes
    'small': (512, 1024, 6, 64, 8), 'base': (768, 2048, 12, 64, 12), 'large':
        (1024, 2816, 16, 64, 24), 'xl': (2048, 5120, 32, 64, 24), 'xxl': (4096, 10240, 64, 64, 24)
}


@pytest.mark.parametrize('size', list(PUBLISHED_V1_1))
def test_preset_parameter_counts(size):
  cfg = ModelConfig.from_config(model_config(size, vocab_size=32128))
  model = make_model(cfg)
  batch = dict(encoder_input_tokens=jnp.ones((1, 4), jnp.int32), decoder_input_tokens=jnp.ones(
      (1, 4), jnp.int32))
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **batch))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract)))
  d, ff, h, dh, n = DIMS_V1_1[size]
  assert count == closed_form_param_count(d, ff, h, dh, n, n, 32128, gated=True, tied=False)
  assert abs(count - PUBLISHED_V1_1[size]) / PUBLISHED_V1_1[size] < 0.01
  if size == 'small':
    assert count == 76_961_152  # HuggingFace's T5.1.1-small with an untied head


def test_every_parameter_has_logical_axes():
  model = make_model(tiny(scan_layers=True))
  batch = dict(encoder_input_tokens=np.ones((1, 3), np.int32), decoder_input_tokens=np.ones(
      (1, 2), np.int32))
  boxed = model.init(jax.random.PRNGKey(0), **batch)['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(
      isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)


# The family presets against the papers' parameter counts: mT5 (Xue et al. 2021, Table 1 of the
# mT5 paper), ByT5 (Xue et al. 2022, Table 1) and UL2 20B (Tay et al. 2022).
PUBLISHED_FAMILY = {
    'mt5_small': 300e6, 'mt5_base': 580e6, 'mt5_large': 1.2e9, 'mt5_xl': 3.7e9, 'mt5_xxl': 13e9,
    'byt5_small': 300e6, 'byt5_base': 582e6, 'byt5_large': 1.23e9, 'byt5_xl': 3.74e9,
    'byt5_xxl': 12.9e9, 'ul2_20b': 20e9
}
FAMILY_SHAPES = {  # d_model, d_ff, heads, head_dim, enc / dec layers, vocab: the HF configs
    'mt5_small': (512, 1024, 6, 64, 8, 8, 250112), 'mt5_xxl': (4096, 10240, 64, 64, 24, 24, 250112),
    'byt5_small': (1472, 3584, 6, 64, 12, 4, 384), 'byt5_xl': (2560, 6720, 32, 64, 36, 12, 384),
    'ul2_20b': (4096, 16384, 16, 256, 32, 32, 32128)
}


@pytest.mark.parametrize('size', list(FAMILY_SHAPES))
def test_family_preset_models_have_the_released_shapes(size):
  cfg = ModelConfig.from_config(model_config(size))
  assert cfg.variant == 'v1_1' and cfg.gated and not cfg.tie_logits
  assert cfg.activation == ('gated-silu' if size == 'ul2_20b' else 'gated-gelu')
  assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.head_dim, cfg.num_encoder_layers,
          cfg.num_decoder_layers, cfg.vocab_size) == FAMILY_SHAPES[size]
  model = make_model(cfg)
  batch = dict(encoder_input_tokens=jnp.ones((1, 4), jnp.int32), decoder_input_tokens=jnp.ones(
      (1, 4), jnp.int32))
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **batch))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract)))
  assert count == closed_form_param_count(*FAMILY_SHAPES[size], gated=True, tied=False)


def test_family_preset_parameter_counts_match_the_papers():
  for size in PUBLISHED_FAMILY:
    c = model_config(size)
    count = closed_form_param_count(c.d_model, c.d_ff, c.num_heads, c.head_dim,
                                    c.num_encoder_layers, c.num_decoder_layers, c.vocab_size,
                                    gated=True, tied=False)
    # The papers round to 2-3 digits ("20B" is UL2's name; the model has 19.6B).
    assert abs(count - PUBLISHED_FAMILY[size]) / PUBLISHED_FAMILY[size] < 0.03, (size, count)


def test_family_presets_refuse_v1_0_and_keep_an_explicit_vocabulary():
  with pytest.raises(ValueError, match="'byt5_small' is a T5.1.1-architecture model"):
    model_config('byt5_small', variant='v1_0')
  assert model_config('mt5_base', vocab_size=250240).vocab_size == 250240
  assert model_config('base').vocab_size == 32128
