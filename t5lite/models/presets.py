"""Model hyper-parameters: `ModelConfig`, the one declaration of the `config.model` fields, and
the published size presets.

Every field is declared once, in `ModelConfig`, with its default and its documentation (and its
choices where it has them; `t5lite.fields.field`). `model_config` builds the `config.model`
ConfigDict from it, so the config holds exactly ModelConfig's fields, and the flax modules carry
the frozen, hashable ModelConfig itself (`ModelConfig.from_config(config.model)`).

Sizes are those of the T5 paper (v1.0, Raffel et al. 2020, Table 14 / released checkpoints) and
of the T5.1.1 release notes (google-research/text-to-text-transfer-transformer,
released_checkpoints.md). `tiny` is for tests and the quickstart. The other members of the family
(FAMILY_PRESETS) carry their own vocabulary and MLP: mT5 (Xue et al. 2021), ByT5 (Xue et al.
2022) and a UL2-20B-shaped model (Tay et al. 2022), as their released configs give them.
"""
from __future__ import annotations

import dataclasses
import difflib

import ml_collections

from t5lite.fields import ConfigError, field
from t5lite.models.kernels import KERNELS

VARIANTS = ('v1_0', 'v1_1')
ARCHITECTURES = ('encoder_decoder', 'decoder_only')
REMAT_POLICIES = ('none', 'minimal', 'full')
DTYPES = ('bfloat16', 'float32')
# The MLP's activation: relu (T5 v1.0), gated-gelu (T5.1.1, mT5, ByT5), gated-silu (UL2),
# gated-relu; the gated ones are act(x W0) * (x W1), HF T5Config's `is_gated_act` forms.
MLP_ACTIVATIONS = ('relu', 'gated-gelu', 'gated-silu', 'gated-relu')
MLP_ACTIVATION_CHOICES = ('',) + MLP_ACTIVATIONS  # '': the variant's
VARIANT_ACTIVATION = {'v1_0': 'relu', 'v1_1': 'gated-gelu'}


def activation_of(model) -> str | None:
  """The MLP activation a saved or given config.model (a dict or ConfigDict) computes; None when
  it names no known variant. Configs saved before mlp_activation existed compute the variant's."""
  variant = model.get('variant')
  if variant not in VARIANT_ACTIVATION:
    return None
  return model.get('mlp_activation') or VARIANT_ACTIVATION[variant]


# KERNELS = ('auto', 'xla'), from t5lite.models.kernels (where the switch is read).

# LoRA targets (model.lora_targets): peft's T5 default (q, v), and every attention/MLP kernel.
LORA_DEFAULT_TARGETS = ('/(query|value)/kernel$',)
LORA_ALL_TARGETS = ('/(query|key|value|out|wi|wi_0|wi_1|wo)/kernel$',)

# name: (d_model, d_ff, num_heads, head_dim, num_encoder_layers, num_decoder_layers)
V1_1_SIZES = {
    'tiny': (128, 256, 4, 32, 2, 2),
    'small': (512, 1024, 6, 64, 8, 8),
    'base': (768, 2048, 12, 64, 12, 12),
    'large': (1024, 2816, 16, 64, 24, 24),
    'xl': (2048, 5120, 32, 64, 24, 24),
    'xxl': (4096, 10240, 64, 64, 24, 24),
}
V1_0_SIZES = {
    'tiny': (128, 512, 4, 32, 2, 2),
    'small': (512, 2048, 8, 64, 6, 6),
    'base': (768, 3072, 12, 64, 12, 12),
    'large': (1024, 4096, 16, 64, 24, 24),
    'xl': (1024, 16384, 32, 128, 24, 24),  # "3B"
    'xxl': (1024, 65536, 128, 128, 24, 24),  # "11B"
}
SIZES = tuple(V1_1_SIZES)


def check_mlp_activation(value, field_name: str = 'model.mlp_activation') -> None:
  """config.model.mlp_activation's check (a t5lite.checks.Check): one of MLP_ACTIVATION_CHOICES,
  with '' spelled out in the message."""
  if value in MLP_ACTIVATION_CHOICES:
    return
  close = difflib.get_close_matches(str(value), MLP_ACTIVATIONS, n=1)
  hint = f" (did you mean '{close[0]}'?)" if close else ''
  raise ConfigError(f"config.{field_name}={value!r} is not valid{hint}; valid: '' (the "
                    f"variant's: v1_0 relu, v1_1 gated-gelu), {', '.join(MLP_ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class FamilyPreset:
  shape: tuple[int, int, int, int, int, int]  # as in V1_1_SIZES
  vocab_size: int
  mlp_activation: str = ''  # '' = v1_1's gated-gelu


# T5.1.1-architecture models with their own vocabulary, shapes and MLP: untied logits (v1_1).
# Numbers from the HF configs of the released checkpoints (google/mt5-*, google/byt5-*,
# google/ul2); their parameter counts match the papers' (tests/test_models.py).
FAMILY_PRESETS = {
    # mT5: T5.1.1's shapes, a 250112-row embedding (250000 SentencePiece pieces + 100 sentinels,
    # padded to a multiple of 128).
    **{
        f'mt5_{size}': FamilyPreset(V1_1_SIZES[size], 250112)
        for size in ('small', 'base', 'large', 'xl', 'xxl')
    },
    # ByT5: bytes (259 ids + 125 sentinels = 384, t5lite's `byte` vocabulary), a wider model and
    # an encoder three times as deep as the decoder.
    'byt5_small': FamilyPreset((1472, 3584, 6, 64, 12, 4), 384),
    'byt5_base': FamilyPreset((1536, 3968, 12, 64, 18, 6), 384),
    'byt5_large': FamilyPreset((1536, 3840, 16, 64, 36, 12), 384),
    'byt5_xl': FamilyPreset((2560, 6720, 32, 64, 36, 12), 384),
    'byt5_xxl': FamilyPreset((4672, 12352, 64, 64, 36, 12), 384),
    # UL2 20B: 32 + 32 layers of 16 heads x 256, gated-SiLU MLP, T5's English vocabulary.
    'ul2_20b': FamilyPreset((4096, 16384, 16, 256, 32, 32), 32128, 'gated-silu'),
}
PRESETS = SIZES + tuple(FAMILY_PRESETS)  # every name `preset` takes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's hyper-parameters: `config.model`, typed, frozen and hashable (the flax modules
  carry it as a module attribute). The defaults are the `tiny` T5.1.1 preset."""
  # Declaration order is the order of the config.model keys.
  size: str = field('tiny', 'Informational: the preset these numbers came from.')
  variant: str = field(
      'v1_1', 'v1_0: ReLU MLP, logits tied to the embedding and scaled by d_model**-0.5; v1_1: '
      'gated-GELU MLP, untied logits.', choices=VARIANTS)
  architecture: str = field(
      'encoder_decoder', 'encoder_decoder, or decoder_only: causal (a prefix LM when the batch '
      'carries decoder_causal_attention).', choices=ARCHITECTURES)
  vocab_size: int = field(
      32128, 'Rows of the embedding: at least the vocabulary\'s size (padded to a multiple of 128 '
      'for speed).')
  d_model: int = field(128, 'Width of the embeddings and of every layer\'s input and output.')
  d_ff: int = field(256, 'Width of the MLP\'s hidden layer.')
  num_heads: int = field(4, 'Attention heads per attention layer.')
  head_dim: int = field(32, 'Width of one head\'s queries, keys and values.')
  attention_dim: int | None = field(
      None, 'Width of the attention projection; must equal num_heads * head_dim (checked; None: '
      'filled in with it). T5 lets it differ from d_model (v1.0 "3B"/"11B").')
  num_encoder_layers: int = field(2, 'Encoder layers; ignored by decoder_only.')
  num_decoder_layers: int = field(2, 'Decoder layers.')
  mlp_activation: str = field(
      '', "The MLP's activation: '' takes the variant's (v1_0: relu, v1_1: gated-gelu); "
      'gated-X is X(x W0) * (x W1) (gated-silu: UL2; gated-gelu uses the tanh approximation).',
      choices=MLP_ACTIVATION_CHOICES)
  relpos_per_layer: bool = field(
      False, 'Every layer\'s self-attention learns its own relative position bias (UMT5); '
      'False: one bias per stack, shared by all its layers (T5).')
  relative_attention_num_buckets: int = field(
      32, 'Relative position buckets per direction pair (half exact distances, half log-spaced).')
  relative_attention_max_distance: int = field(
      128, 'Distance beyond which relative positions share the last bucket.')
  dropout_rate: float = field(
      0.0, 'Dropout on embeddings, attention weights, MLP activations and residual branches: T5 '
      'used 0.1 for fine-tuning, 0.0 for pre-training.')
  dtype: str = field(
      'bfloat16', 'Activation dtype; parameters are always float32 (norms, softmax and logits '
      'are computed in float32).', choices=DTYPES)
  scan_layers: bool = field(
      False, 'nn.scan over layers: faster compiles for deep models, at some step time on CPU '
      '(docs/performance.md).')
  remat_policy: str = field(
      'none', 'Recompute in the backward pass to save memory: none; minimal (keep the weight '
      'matmuls\' results); full (keep nothing, the most compute).', choices=REMAT_POLICIES)
  prompt_length: int = field(
      0, 'Prompt tuning (Lester et al. 2021; docs/adaptation.md): this many learned soft-prompt '
      'vectors (param prompt/embedding) are prepended to the encoder input (decoder_only: to the '
      'sequence); only they train unless train.trainable adds more. 0 = off. Needs '
      'data.pack=False.')
  prompt_init_vocab: int = field(
      5000, 'Prompt tuning: the prompt starts as copies of token-embedding rows drawn without '
      'replacement from ids 3 .. 2 + prompt_init_vocab (after pad, EOS, UNK; must be below '
      'vocab_size, checked): SentencePiece numbers pieces by score, so these are common tokens, as '
      'Lester et al. drew from the 5,000 most frequent. Keep sentinels out (quickstart: 1900).')
  kernels: str = field(
      'auto', 'auto: on CPU the hand-written custom VJPs tuned on XLA:CPU (t5lite/models/kernels/, '
      'the fastest step there), on TPU and GPU the xla path; xla: the plain formulations '
      '(jnp.einsum with float32 accumulation, jax.nn.dot_product_attention, the norm formula) '
      'differentiated by JAX autodiff, on every platform (numerically equal up to rounding).',
      choices=KERNELS)
  # LoRA (Hu et al. 2021; t5lite/models/lora.py, docs/adaptation.md).
  lora_rank: int = field(
      0, 'LoRA: the rank r of the low-rank update (alpha / r) B A beside each kernel that '
      'lora_targets names; 0 = off. With LoRA on only the LoRA factors (lora_a, lora_b) and what '
      'train.trainable lists train; the rest stays bitwise unchanged.')
  lora_alpha: float = field(8.0, "LoRA: alpha; the update is scaled by alpha / r (peft's scaling).")
  lora_dropout: float = field(
      0.0, "LoRA: dropout on the LoRA branch's input in training (peft's lora_dropout).")
  lora_targets: tuple = field(
      LORA_DEFAULT_TARGETS, "LoRA: regexes (re.search) over the '/'-joined names of the kernels "
      "to adapt, e.g. 'encoder/layers_0/attention/query/kernel' ('layers/' with scan_layers). "
      "Default: the attention queries and values (peft's T5 default, q and v); all of them: "
      f'{LORA_ALL_TARGETS!r}. Each must match a kernel.')

  def __post_init__(self):
    if self.attention_dim is None:  # frozen: set through object, as dataclasses do themselves
      object.__setattr__(self, 'attention_dim', self.num_heads * self.head_dim)
    # hashable whatever it came from (a saved config's JSON list)
    object.__setattr__(self, 'lora_targets', tuple(self.lora_targets))

  @classmethod
  def from_config(cls, cfg) -> 'ModelConfig':
    """The ModelConfig of a `config.model` ConfigDict (or a dict); other keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in names})

  @property
  def activation(self) -> str:
    """The MLP's activation, one of MLP_ACTIVATIONS: `mlp_activation`, or the variant's."""
    return self.mlp_activation or VARIANT_ACTIVATION[self.variant]

  @property
  def gated(self) -> bool:
    """Whether the MLP has two input matrices (`wi_0`, `wi_1`) rather than one (`wi`)."""
    return self.activation.startswith('gated-')

  @property
  def lora(self):
    """The models.lora.LoraConfig of the lora_* fields; None when lora_rank is 0."""
    from t5lite.models import lora  # pylint: disable=import-outside-toplevel  (JAX: lazily)
    return lora.config_of(self)

  @property
  def tie_logits(self) -> bool:
    return self.variant == 'v1_0'


def preset(size: str = 'tiny', variant: str = 'v1_1', vocab_size: int | None = None,
           architecture: str = 'encoder_decoder') -> ModelConfig:
  """The ModelConfig of a published size (the other fields at their defaults): a T5 size of
  `variant`, or a FAMILY_PRESETS name (v1_1 only). `vocab_size` None: the preset's own (32128
  for the T5 sizes)."""
  if size in FAMILY_PRESETS:
    if variant != 'v1_1':
      raise ValueError(f'model size {size!r} is a T5.1.1-architecture model: variant must be '
                       f'v1_1, not {variant!r}')
    family = FAMILY_PRESETS[size]
    shape, activation = family.shape, family.mlp_activation
    vocab_size = family.vocab_size if vocab_size is None else vocab_size
  else:
    table = V1_1_SIZES if variant == 'v1_1' else V1_0_SIZES
    if size not in table:
      raise ValueError(f'unknown model size {size!r}; valid sizes: {", ".join(PRESETS)}')
    shape, activation = table[size], ''
    vocab_size = 32128 if vocab_size is None else vocab_size
  d_model, d_ff, num_heads, head_dim, n_enc, n_dec = shape
  return ModelConfig(size=size, variant=variant, architecture=architecture, vocab_size=vocab_size,
                     d_model=d_model, d_ff=d_ff, num_heads=num_heads, head_dim=head_dim,
                     num_encoder_layers=n_enc, num_decoder_layers=n_dec, mlp_activation=activation)


def model_config(size: str = 'tiny', variant: str = 'v1_1', vocab_size: int | None = None,
                 architecture: str = 'encoder_decoder') -> ml_collections.ConfigDict:
  """The `config.model` block for a preset: ModelConfig's fields, in their declared order."""
  cfg = preset(size, variant, vocab_size, architecture)
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(ModelConfig):
    c[f.name] = getattr(cfg, f.name)
  return c
