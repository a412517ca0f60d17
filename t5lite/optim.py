"""Optimizers (optax Adafactor with T5's defaults, AdamW) and learning-rate schedules."""
from __future__ import annotations

import jax.numpy as jnp
import optax


def make_schedule(schedule_cfg, base_lr: float, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the step.

  rsqrt     T5's inverse square root: base / sqrt(max(step, warmup)) (Raffel et al. 2020, 3.1.2);
            constant at base/sqrt(warmup) during the warm-up, then decaying.
  cosine    linear warm-up to base, cosine decay to base * end_ratio at total_steps.
  wsd       warmup-stable-decay: linear warm-up, constant, then a linear cool-down over the last
            decay_fraction of the steps to base * end_ratio (Hägele et al. 2024, "Scaling Laws
            and Compute-Optimal Training Beyond Fixed Training Durations").
  constant  linear warm-up (if any), then base.
  """
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
    decay_steps = int(round(total_steps * schedule_cfg.decay_fraction))
    stable_steps = max(total_steps - warmup - decay_steps, 0)
    stable_then_decay = optax.join_schedules(
        [optax.constant_schedule(base_lr),
         optax.linear_schedule(base_lr, end_value, decay_steps)], [stable_steps])
    return with_warmup(stable_then_decay)
  if name == 'constant':
    return with_warmup(optax.constant_schedule(base_lr))
  raise ValueError(f'unknown schedule.name {name!r}; valid: rsqrt, cosine, wsd, constant')


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation for `config.optimizer`, with global-norm clipping if asked.

  `config` is the ConfigDict or the resolved `t5lite.config.RunConfig`: only its optimizer,
  schedule and train parts are read (`optimizer_from_parts`).
  """
  return optimizer_from_parts(config.optimizer, config.schedule, config.train)


def optimizer_from_parts(opt, schedule_cfg,
                         train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`make_optimizer` from the parts it reads: the optimizer and schedule sections, and of the
  train section only `steps` (the schedule's length) and `max_grad_norm`."""
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
  return tx, schedule
