"""The model's compute kernels, behind the `model.kernels` switch.

`matmul` (weight matmuls in a low-precision dtype with float32 accumulation, the gated-GELU pair,
attention's activation einsums), `attention` (the attention core) and `norm` (the RMS norm) each
hold two formulations of the same computation:

- 'auto' (the default): hand-written custom VJPs tuned on XLA:CPU (backward operand orders its
  bf16 kernels take, FlashAttention's rowsum, batch chunking with uint16 bitcasts, a probe for
  CPUs without bf16 x bf16 -> f32 dots). docs/performance.md says what each buys.
- 'xla': the plain jnp formulations, differentiated by JAX's autodiff, with the same operand and
  result dtypes: the reading copy, and the one to start from on other hardware or when changing
  the model. It probes nothing: on a CPU without bf16 x bf16 -> f32 dots, bfloat16 needs 'auto'.

The layers (t5lite/models/layers.py) pass the `kernels` of the ModelConfig they are built from.
"""
from __future__ import annotations

KERNELS = ('auto', 'xla')


def plain(kernels: str) -> bool:
  """Whether `kernels` selects the plain formulations ('xla') rather than the tuned ones."""
  if kernels not in KERNELS:
    raise ValueError(f'unknown model.kernels {kernels!r}; valid: {", ".join(KERNELS)}')
  return kernels == 'xla'
