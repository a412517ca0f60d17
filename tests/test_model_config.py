"""ModelConfig is the one declaration of the `config.model` fields: each documented where it is
declared, the preset ConfigDict built from it (same keys, same order), choices from the module
constants."""
import dataclasses

import pytest

from t5lite import fields
from t5lite.models import presets
from t5lite.models.presets import ModelConfig, model_config


def test_every_field_is_documented_where_it_is_declared():
  for doc in fields.describe(ModelConfig):
    assert doc.doc.strip().endswith('.'), doc.name  # a sentence, not a stub


def test_model_config_holds_exactly_model_configs_fields_in_order():
  for variant in presets.VARIANTS:
    for size in presets.SIZES:
      c = model_config(size, variant, vocab_size=2048, architecture='decoder_only')
      names = list(c._fields)  # pylint: disable=protected-access
      assert names == [f.name for f in dataclasses.fields(ModelConfig)]
      cfg = ModelConfig.from_config(c)
      assert dataclasses.asdict(cfg) == c.to_dict()
      assert cfg == presets.preset(size, variant, 2048, 'decoder_only')
  assert 'kernels' in list(model_config()._fields)  # pylint: disable=protected-access
  assert model_config().kernels == 'auto'
  assert model_config().lora_rank == 0  # LoRA off unless asked


def test_preset_values():
  c = model_config('small', 'v1_1', vocab_size=32128)
  assert (c.size, c.d_model, c.d_ff, c.num_heads, c.head_dim, c.attention_dim, c.num_encoder_layers,
          c.num_decoder_layers) == ('small', 512, 1024, 6, 64, 384, 8, 8)
  c = model_config('xl', 'v1_0')
  assert (c.d_model, c.d_ff, c.num_heads, c.head_dim, c.attention_dim) == (1024, 16384, 32, 128,
                                                                           4096)
  with pytest.raises(ValueError, match='unknown model size'):
    model_config('huge')


def test_choices_are_the_module_constants():
  choices = {doc.name: doc.choices for doc in fields.describe(ModelConfig) if doc.choices}
  assert choices == {
      'variant': presets.VARIANTS, 'architecture': presets.ARCHITECTURES, 'dtype': presets.DTYPES,
      'remat_policy': presets.REMAT_POLICIES, 'kernels': presets.KERNELS,
      'mlp_activation': presets.MLP_ACTIVATION_CHOICES
  }
  assert presets.KERNELS == ('auto', 'xla')


def test_model_config_is_frozen_and_hashable_with_attention_dim_filled_in():
  cfg = ModelConfig(num_heads=2, head_dim=8)
  assert cfg.attention_dim == 16
  assert hash(cfg) == hash(ModelConfig(num_heads=2, head_dim=8, attention_dim=16))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.kernels = 'xla'  # type: ignore[misc]
  assert ModelConfig().size == 'tiny' and ModelConfig().kernels == 'auto'


def test_mlp_activation_check_names_every_valid_value():
  for value in presets.MLP_ACTIVATION_CHOICES:
    presets.check_mlp_activation(value)
  with pytest.raises(
      fields.ConfigError,
      match=r"mlp_activation='gated_silu' is not valid \(did you mean 'gated-silu'"
      r"\?\); valid: '' \(the variant's: v1_0 relu, v1_1 gated-gelu\), relu, "):
    presets.check_mlp_activation('gated_silu')
