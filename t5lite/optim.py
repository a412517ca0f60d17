"""Optimizers (optax Adafactor with T5's defaults, AdamW), learning-rate schedules, and the mask
of trainable parameters (`train.trainable`: frozen ones get no update and no optimizer state)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from t5lite.fields import ConfigError


def make_schedule(schedule_cfg, base_lr: float, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the run's step.

  rsqrt     T5's inverse square root: base / sqrt(max(step, warmup)) (Raffel et al. 2020, 3.1.2);
            constant at base/sqrt(warmup) during the warm-up, then decaying.
  cosine    linear warm-up to base, cosine decay to base * end_ratio at total_steps.
  wsd       warmup-stable-decay: linear warm-up, constant, then a linear cool-down to
            base * end_ratio at the end: over the last decay_fraction of the steps, or from the
            absolute step decay_start_step on (Hägele et al. 2024, "Scaling Laws and
            Compute-Optimal Training Beyond Fixed Training Durations").
  constant  linear warm-up (if any), then base.

  Continual pretraining (Gupta et al. 2023; Ibrahim et al. 2024): the schedule above is read at
  step + step_offset (its timeline; total_steps + step_offset is its end), so a run started from
  another run's step N with step_offset=N continues that run's schedule; rewarm_steps > 0 then
  multiplies it by a linear ramp from 0 over the run's first rewarm_steps steps.
  """
  offset = int(getattr(schedule_cfg, 'step_offset', 0))
  rewarm = int(getattr(schedule_cfg, 'rewarm_steps', 0))
  base = _base_schedule(schedule_cfg, base_lr, total_steps + offset)
  if not offset and not rewarm:
    return base

  def schedule(step):
    lr = base(step + offset)
    if rewarm:
      lr = lr * jnp.minimum(jnp.asarray(step, jnp.float32) / rewarm, 1.0)
    return lr

  return schedule


def _base_schedule(schedule_cfg, base_lr: float, total_steps: int) -> optax.Schedule:
  name, warmup = schedule_cfg.name, int(schedule_cfg.warmup_steps)
  end_value = base_lr * schedule_cfg.end_ratio
  if name == 'rsqrt':
    floor = max(warmup, 1)
    return lambda step: base_lr * jnp.sqrt(1.0 / jnp.maximum(jnp.asarray(step, jnp.float32), floor))
  warm = optax.linear_schedule(0.0, base_lr, warmup) if warmup > 0 else None

  def with_warmup(rest: optax.Schedule) -> optax.Schedule:
    return optax.join_schedules([warm, rest], [warmup]) if warm is not None else rest

  if name == 'cosine':
    return with_warmup(
        optax.cosine_decay_schedule(base_lr, max(total_steps - warmup, 1),
                                    alpha=schedule_cfg.end_ratio))
  if name == 'wsd':
    start = int(getattr(schedule_cfg, 'decay_start_step', 0))
    if start > 0:  # an absolute cool-down start: the stable phase does not depend on the length
      return _absolute_wsd(base_lr, end_value, warmup, start, total_steps)
    decay_steps = int(round(total_steps * schedule_cfg.decay_fraction))
    stable_steps = max(total_steps - warmup - decay_steps, 0)
    stable_then_decay = optax.join_schedules(
        [optax.constant_schedule(base_lr),
         optax.linear_schedule(base_lr, end_value, decay_steps)], [stable_steps])
    return with_warmup(stable_then_decay)
  if name == 'constant':
    return with_warmup(optax.constant_schedule(base_lr))
  raise ValueError(f'unknown schedule.name {name!r}; valid: rsqrt, cosine, wsd, constant')


def _absolute_wsd(base_lr: float, end_value: float, warmup: int, start: int,
                  end: int) -> optax.Schedule:
  """Linear warm-up over [0, warmup], base_lr until `start`, linear to end_value at `end` (a run
  that ends before `start` is all stable: a cool-down can branch from any of its checkpoints)."""
  length = max(end - start, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    lr = base_lr + (end_value - base_lr) * jnp.clip((t - start) / length, 0.0, 1.0)
    if warmup > 0:
      lr = jnp.where(t < warmup, base_lr * t / warmup, lr)
    return lr

  return schedule


# LoRA's factors (t5lite/models/lora.py names them lora_a / lora_b): with model.lora_rank > 0
# they train, and of the other params only those train.trainable lists.
LORA_FACTORS = '/lora_[ab]$'
# Prompt tuning's param (t5lite/models/prompt.py), trainable whenever there is one.
PROMPT_TRAINABLE = '^prompt/'


def trainable_patterns(train_cfg, model_cfg=None) -> tuple[str, ...]:
  """The regexes of the params that train: train.trainable (() = all); with LoRA on
  (model.lora_rank > 0) LORA_FACTORS and with prompt tuning (model.prompt_length > 0)
  PROMPT_TRAINABLE before them, so that by default only the factors / the prompt train and
  train.trainable adds to them (('.',): the whole model too)."""
  patterns = tuple(getattr(train_cfg, 'trainable', ()))
  added = ()
  if model_cfg is not None and getattr(model_cfg, 'lora_rank', 0):
    added += (LORA_FACTORS,)
  if model_cfg is not None and getattr(model_cfg, 'prompt_length', 0):
    added += (PROMPT_TRAINABLE,)
  if not added:
    return patterns
  return added + tuple(p for p in patterns if p not in added)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation for `config.optimizer`, with global-norm clipping if asked.

  `config` is the ConfigDict or the resolved `t5lite.config.RunConfig`: only its optimizer,
  schedule and train parts and model.lora_rank / prompt_length are read (`optimizer_from_parts`).
  """
  return optimizer_from_parts(config.optimizer, config.schedule, config.train,
                              trainable_patterns(config.train, config.model))


def optimizer_from_parts(opt, schedule_cfg, train_cfg,
                         patterns=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`make_optimizer` from the parts it reads: the optimizer and schedule sections, and of the
  train section only `steps` (the schedule's length), `max_grad_norm` and `trainable` (unless
  `patterns`, from trainable_patterns, are given)."""
  schedule = make_schedule(schedule_cfg, opt.learning_rate, train_cfg.steps)
  if opt.name == 'adafactor':
    # T5 defaults: factored second moments, decay exponent 0.8, update clipping 1.0, updates
    # scaled by the parameter's RMS, no momentum (Shazeer & Stern 2018; Raffel et al. 2020).
    tx = optax.adafactor(learning_rate=schedule, decay_rate=opt.decay_rate,
                         clipping_threshold=opt.clipping_threshold,
                         multiply_by_parameter_scale=True, momentum=None, factored=True,
                         weight_decay_rate=opt.weight_decay or None)
  elif opt.name == 'adamw':
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
  else:
    raise ValueError(f'unknown optimizer.name {opt.name!r}; valid: adafactor, adamw')
  if train_cfg.max_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_cfg.max_grad_norm), tx)
  patterns = trainable_patterns(train_cfg) if patterns is None else tuple(patterns)
  if patterns:
    # Frozen params: set_to_zero under optax's masking, which keeps no state for them (MaskedNode)
    # and hands the trainable ones' clipping and statistics only the trainable gradients.
    tx = optax.multi_transform(
        {'trainable': tx, 'frozen': optax.set_to_zero()},
        lambda params: jax.tree.map(lambda t: 'trainable'
                                    if t else 'frozen', trainable_mask(params, patterns)))
  return tx, schedule


def param_name(path) -> str:
  """'encoder/layers_0/attention/query/kernel' for a jax key path (the names regexes see)."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '/'.join(parts)


def trainable_mask(params, patterns):
  """A tree of bools like `params`: True where a parameter's name matches one of `patterns`
  (regexes, re.search), or everywhere when there are none. A pattern that matches no parameter
  is a ConfigError naming it (a typo would otherwise freeze more than meant)."""
  names = [param_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  if not patterns or not names:  # no leaves: optax.tree_map_params' placeholder
    return jax.tree.map(lambda _: True, params)
  unused = [p for p in patterns if not any(re.search(p, n) for n in names)]
  if LORA_FACTORS in unused:
    raise ConfigError('config.model.lora_rank > 0 but the model has no LoRA factors: '
                      'model.lora_targets match no attention or MLP kernel')
  if unused:
    raise ConfigError(f'config.train.trainable: {", ".join(map(repr, unused))} match(es) no '
                      f'parameter name of this model ({len(names)} names, such as '
                      f'{", ".join(names[:3])}); fix or remove the regex')
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(re.search(x, param_name(p)) for x in patterns), params)


def frozen_stop_gradient(loss_fn, patterns):
  """`loss_fn(params, ...)` with the params that `patterns` freeze behind stop_gradient: their
  gradients are zeros and their weight-gradient products are never computed. Identity for ()."""
  if not patterns:
    return loss_fn

  def wrapped(params, *args):
    mask = trainable_mask(params, patterns)
    params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), mask, params)
    return loss_fn(params, *args)

  return wrapped


def keep_frozen(new_params, old_params, patterns):
  """`new_params` with the frozen ones taken from `old_params`: bitwise unchanged (adding the
  zero update would still turn a -0.0 into +0.0)."""
  if not patterns:
    return new_params
  mask = trainable_mask(old_params, patterns)
  return jax.tree.map(lambda t, new, old: new if t else old, mask, new_params, old_params)
