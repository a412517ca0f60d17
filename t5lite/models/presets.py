"""Model hyper-parameters: the `ModelConfig` the modules read, and the published size presets.

Sizes are those of the T5 paper (v1.0, Raffel et al. 2020, Table 14 / released checkpoints) and
of the T5.1.1 release notes (google-research/text-to-text-transfer-transformer,
released_checkpoints.md). `tiny` is for tests and the quickstart.
"""
from __future__ import annotations

import dataclasses

import ml_collections

VARIANTS = ('v1_0', 'v1_1')
ARCHITECTURES = ('encoder_decoder', 'decoder_only')
REMAT_POLICIES = ('none', 'minimal', 'full')
DTYPES = ('bfloat16', 'float32')

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
    'xl': (1024, 16384, 32, 128, 24, 24),   # "3B"
    'xxl': (1024, 65536, 128, 128, 24, 24),  # "11B"
}
SIZES = tuple(V1_1_SIZES)


def model_config(size: str = 'tiny', variant: str = 'v1_1', vocab_size: int = 32128,
                 architecture: str = 'encoder_decoder') -> ml_collections.ConfigDict:
  """The `config.model` block for a preset; every field is documented here, where it is declared."""
  table = V1_1_SIZES if variant == 'v1_1' else V1_0_SIZES
  if size not in table:
    raise ValueError(f'unknown model size {size!r}; valid sizes: {", ".join(SIZES)}')
  d_model, d_ff, num_heads, head_dim, n_enc, n_dec = table[size]
  c = ml_collections.ConfigDict()
  c.size = size                      # informational: the preset these numbers came from
  c.variant = variant                # v1_0: ReLU MLP, tied logits * d_model**-0.5; v1_1: gated GELU, untied
  c.architecture = architecture      # encoder_decoder | decoder_only (causal; prefix LM when the batch
                                     # carries decoder_causal_attention)
  c.vocab_size = vocab_size          # rows of the embedding; >= the vocabulary's size (pad to x128 for speed)
  c.d_model = d_model
  c.d_ff = d_ff
  c.num_heads = num_heads
  c.head_dim = head_dim
  # Width of the attention projection; must equal num_heads * head_dim (checked). T5 lets it differ
  # from d_model (v1.0 "3B"/"11B").
  c.attention_dim = num_heads * head_dim
  c.num_encoder_layers = n_enc       # ignored by decoder_only
  c.num_decoder_layers = n_dec
  c.relative_attention_num_buckets = 32
  c.relative_attention_max_distance = 128
  c.dropout_rate = 0.0               # T5 used 0.1 for fine-tuning, 0.0 for pre-training
  c.dtype = 'bfloat16'               # activation dtype; parameters are always float32
  c.scan_layers = False              # nn.scan over layers: faster compiles for deep models
  c.remat_policy = 'none'            # none | minimal (keep weight matmuls) | full (keep nothing)
  return c


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hashable, typed copy of `config.model` that the flax modules carry."""
  vocab_size: int
  d_model: int
  d_ff: int
  num_heads: int
  head_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  variant: str = 'v1_1'
  architecture: str = 'encoder_decoder'
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  dtype: str = 'bfloat16'
  scan_layers: bool = False
  remat_policy: str = 'none'

  @classmethod
  def from_config(cls, cfg) -> 'ModelConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in names})

  @property
  def gated_gelu(self) -> bool:
    return self.variant == 'v1_1'

  @property
  def tie_logits(self) -> bool:
    return self.variant == 'v1_0'
