"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a trainable
low-rank update beside a frozen weight matrix, W x + (alpha / r) B A x.

`model.lora_rank` > 0 switches it on: every weight kernel whose '/'-joined parameter name (e.g.
'encoder/layers_0/attention/query/kernel', or '.../layers/...' with scan_layers) matches one of
`model.lora_targets` gets two parameters beside it, in the same module:

  lora_a  [fan_in dims..., r]   the kernel's input axes (their logical names, so sharded like it)
  lora_b  [r, fan_out dims...]  the kernel's output axes
  (the rank axis is the logical name `lora_rank`, unsharded: t5lite/partitioning.py)

A is kaiming-uniform, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B is zero (peft's init: nn.Linear's
kaiming_uniform_(a=sqrt(5)) for A), so at step 0 the model computes exactly the base model.
The computation is peft's, y = x W + (alpha / r) * ((dropout(x) A) B), on the unmerged factors:
no [fan_in, fan_out] gradient is formed for the frozen W. The gated MLP's wi_0 / wi_1, whose two
matmuls are one fused custom VJP (kernels/matmul.gated), take the merged kernel
W + (alpha / r) A B instead, the same function, in float32 without LoRA dropout; with LoRA dropout
in training (it applies to the LoRA branch's input only) or a compute dtype below float32 (the
merged kernel cast to bf16 would round most of a small update away) the two matmuls are done
apart.

Which params train is decided in t5lite/optim.py (LORA_FACTORS): with LoRA on, the factors plus
whatever train.trainable lists.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from t5lite.fields import ConfigError
from t5lite.models.kernels import matmul

RANK_AXIS = 'lora_rank'  # the logical name of the rank axis (unsharded)
NAMES = ('lora_a', 'lora_b')  # the factors' parameter names (optim.LORA_FACTORS matches them)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The model.lora_* fields (hashable: flax modules carry it)."""
  rank: int
  alpha: float
  dropout: float
  targets: tuple[str, ...]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def targets_kernel(self, module_path: tuple[str, ...]) -> bool:
    """Whether the 'kernel' param of the module at `module_path` gets LoRA factors."""
    name = '/'.join(module_path) + '/kernel'
    return any(re.search(t, name) for t in self.targets)

  def dropout_active(self, deterministic: bool) -> bool:
    return self.dropout > 0 and not deterministic


def config_of(model_cfg) -> LoraConfig | None:
  """The LoraConfig of a ModelConfig, or None when model.lora_rank is 0 (off)."""
  if not model_cfg.lora_rank:
    return None
  return LoraConfig(int(model_cfg.lora_rank), float(model_cfg.lora_alpha),
                    float(model_cfg.lora_dropout), tuple(model_cfg.lora_targets))


def _a_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's kaiming_uniform_(a=sqrt(5)), as peft inits A."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def factors(module: nn.Module, cfg: LoraConfig, shape: tuple[int, ...], axes: tuple[str, ...],
            in_dims: int) -> tuple[jax.Array, jax.Array]:
  """(A [fan_in, r], B [r, fan_out]) of the kernel of `shape` / logical `axes` whose first `in_dims`
  dims are its input, created as params of `module` (A and B keep the kernel's multi-axis shape
  and logical names; returned flattened to 2-D)."""
  ins, outs = shape[:in_dims], shape[in_dims:]
  fan_in = int(np.prod(ins))
  a = module.param('lora_a',
                   nn.with_logical_partitioning(_a_init(fan_in), axes[:in_dims] + (RANK_AXIS,)),
                   ins + (cfg.rank,), jnp.float32)
  b = module.param(
      'lora_b', nn.with_logical_partitioning(nn.initializers.zeros, (RANK_AXIS,) + axes[in_dims:]),
      (cfg.rank,) + outs, jnp.float32)
  return a.reshape(fan_in, cfg.rank), b.reshape(cfg.rank, -1)


def delta(module: nn.Module, cfg: LoraConfig, x: jax.Array, a: jax.Array, b: jax.Array, dtype,
          deterministic: bool, kernels: str, out_dtype=None) -> jax.Array:
  """(alpha / r) * (dropout(x) A) B for x[..., fan_in]: the LoRA branch's output [..., fan_out]."""
  if cfg.dropout_active(deterministic):
    keep = 1.0 - cfg.dropout
    mask = jax.random.bernoulli(module.make_rng('dropout'), keep, x.shape)
    x = jnp.where(mask, x / keep, 0).astype(x.dtype)
  h = matmul.dense(x, a, dtype, kernels=kernels)
  y = matmul.dense(h, b, dtype, out_dtype=out_dtype, kernels=kernels)
  return y * jnp.asarray(cfg.scale, y.dtype)


def merged(kernel: jax.Array, a: jax.Array, b: jax.Array, cfg: LoraConfig) -> jax.Array:
  """W + (alpha / r) A B in W's shape (float32): the same function as W plus the LoRA branch
  without dropout. B = 0 gives W's values exactly."""
  return kernel + (cfg.scale * (a @ b)).reshape(kernel.shape)


def check_targets(param_names, cfg: LoraConfig) -> None:
  """ConfigError for a model.lora_targets regex that gave no kernel LoRA factors (a typo, or a
  kernel LoRA does not adapt, like the embedding or the logits), naming it."""
  adapted = [n[:-len('lora_a')] + 'kernel' for n in param_names if n.endswith('/lora_a')]
  unused = [t for t in cfg.targets if not any(re.search(t, n) for n in adapted)]
  if unused:
    raise ConfigError(
        f'config.model.lora_targets: {", ".join(map(repr, unused))} match(es) no attention or '
        "MLP kernel (names such as 'encoder/layers_0/attention/query/kernel', "
        "'decoder/layers_0/mlp/wo/kernel'; 'layers/' with scan_layers); fix or remove the regex")
