"""CPU-tuned kernels of the model, behind the `model.kernels` switch.

`matmul` (mixed-precision weight matmuls and the gated-GELU pair), `attention` (the attention
core) and `norm` (RMS norm) each hold a hand-written custom VJP tuned on XLA:CPU and the plain
formulation beside it. `model.kernels = 'auto'` (the default) takes the tuned path; `'xla'` takes
the plain jnp formulations, differentiated by JAX's autodiff (docs/models.md).
"""
