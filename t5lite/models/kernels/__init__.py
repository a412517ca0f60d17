"""The model's compute kernels, behind the `model.kernels` switch.

`matmul` (weight matmuls in a low-precision dtype with float32 accumulation, the gated-GELU pair,
attention's activation einsums), `attention` (the attention core) and `norm` (the RMS norm) each
hold two formulations of the same computation:

- 'tuned': hand-written custom VJPs tuned on XLA:CPU (backward operand orders its bf16 kernels
  take, FlashAttention's rowsum, batch chunking with uint16 bitcasts, a probe for CPUs without
  bf16 x bf16 -> f32 dots). docs/performance.md says what each buys.
- 'xla': the plain formulations (`jnp.einsum` with float32 accumulation, attention through
  `jax.nn.dot_product_attention` where it applies, i.e. without attention dropout),
  differentiated by JAX's autodiff, with the same operand and result dtypes: what TPU and GPU
  compilers are built to fuse, and the reading copy. It probes nothing: on a CPU without
  bf16 x bf16 -> f32 dots, bfloat16 needs 'tuned'.

`model.kernels` (the config) is 'auto' or 'xla'; `resolve` turns 'auto' into 'tuned' on CPU and
'xla' on TPU and GPU, for the platform the step is compiled for (which, for an ahead-of-time
compile for a TPU topology, t5lite.aot, is not the platform this process runs on).
`t5lite.models.t5.make_model` resolves it once; the layers (t5lite/models/layers.py) pass the
resolved value down. A layer built with 'auto' directly (tests) resolves it by the default backend.
"""
from __future__ import annotations

KERNELS = ('auto', 'xla')  # the values of config.model.kernels
RESOLVED = ('tuned', 'xla')  # what 'auto' becomes (`resolve`)


def resolve(kernels: str, platform: str) -> str:
  """'tuned' or 'xla': 'auto' is 'tuned' on CPU and 'xla' on any other `platform` ('tpu',
  'gpu', 'cuda', 'rocm'); a resolved value stays as it is."""
  if kernels == 'auto':
    return 'tuned' if platform == 'cpu' else 'xla'
  if kernels not in RESOLVED:
    raise ValueError(f'unknown model.kernels {kernels!r}; valid: {", ".join(KERNELS)}')
  return kernels


def plain(kernels: str) -> bool:
  """Whether `kernels` selects the plain formulations ('xla') rather than the tuned ones."""
  if kernels == 'auto':
    import jax  # pylint: disable=import-outside-toplevel
    kernels = resolve(kernels, jax.default_backend())
  return resolve(kernels, '') == 'xla'
