"""LoRA vs full fine-tuning: train-step time and optimizer-state bytes, side by side in one run.

    python benchmarks/peft.py [--size small] [--batch 8] [--inputs 64] [--targets 16] [--steps 5]
        [--optimizer adamw]

Rows: full fine-tuning; LoRA rank 8 on the attention queries and values (peft's T5 default);
LoRA rank 8 on every attention and MLP kernel (model.lora_*; t5lite/models/lora.py). The same
jitted train step as training (trainer.make_train_step: frozen params behind stop_gradient, no
optimizer state). Prints the machine, trainable params, optimizer-state bytes (the arrays of
opt_state), and the median step time; rows run interleaved in rounds so that machine noise
spreads over all of them.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from t5lite import config as config_lib
from t5lite import optim, partitioning, trainer
from t5lite.data import catalog  # pylint: disable=unused-import  (validate checks data.task)
from t5lite.models.presets import LORA_ALL_TARGETS, LORA_DEFAULT_TARGETS, ModelConfig, model_config
from t5lite.models.t5 import make_model

# The same random batch as the train-step benchmark (this folder is on sys.path when run).
from train_step import random_batch

ROWS = [
    ('full fine-tuning', {}),
    ('LoRA r=8, q,v', dict(lora_rank=8, lora_alpha=16.0, lora_targets=LORA_DEFAULT_TARGETS)),
    ('LoRA r=8, all', dict(lora_rank=8, lora_alpha=16.0, lora_targets=LORA_ALL_TARGETS)),
]


def build(args, overrides):
  c = config_lib.base_config()
  c.model = model_config(args.size)
  c.model.update(dtype=args.dtype, **overrides)
  c.train.batch_size = args.batch
  c.optimizer.name = args.optimizer
  config_lib.validate(c, 1)
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  model_cfg = ModelConfig.from_config(c.model)
  model = make_model(model_cfg)
  tx, schedule = optim.make_optimizer(c)
  batch = random_batch(args.batch, args.inputs, args.targets, model_cfg.vocab_size)
  state, shardings = trainer.init_train_state(model, tx, mesh, c.partitioning.rules, batch, 0)
  patterns = optim.trainable_patterns(c.train, c.model)
  mask = jax.tree.leaves(optim.trainable_mask(state.params, patterns))
  trainable = sum(x.size for x, t in zip(jax.tree.leaves(state.params), mask) if t)
  total = sum(x.size for x in jax.tree.leaves(state.params))
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
  step = trainer.jit_train_step(trainer.make_train_step(model, tx, schedule, c.train, False),
                                shardings, mesh, c.partitioning.rules)
  global_batch = partitioning.host_to_global(
      batch, partitioning.batch_sharding(mesh, c.partitioning.rules))
  state, metrics = step(state, global_batch)  # compile
  jax.block_until_ready(metrics)
  return {
      'step': step, 'state': state, 'batch': global_batch, 'times': [], 'trainable': trainable,
      'total': total, 'opt_bytes': opt_bytes
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--size', default='small')
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--inputs', type=int, default=64)
  parser.add_argument('--targets', type=int, default=16)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--optimizer', default='adamw', choices=('adamw', 'adafactor'))
  args = parser.parse_args()
  runs = [build(args, overrides) for _, overrides in ROWS]
  for _ in range(args.steps):
    for run in runs:
      start = time.perf_counter()
      run['state'], metrics = run['step'](run['state'], run['batch'])
      jax.block_until_ready(metrics)
      run['times'].append(time.perf_counter() - start)
  device = jax.devices()[0]
  print(f'machine: {platform.node()} {platform.machine()} {platform.processor() or ""} '
        f'{os.cpu_count()} cpus | {device.platform} {device.device_kind} | jax {jax.__version__}')
  print(f'model {args.size} ({args.dtype}) | {args.optimizer} | batch {args.batch} | '
        f'{args.inputs} -> {args.targets} tokens | {args.steps} timed steps per row, interleaved')
  print('| run | trainable params | optimizer state | median step (ms) | vs full |')
  print('|---|---|---|---|---|')
  base = None
  for (name, _), run in zip(ROWS, runs):
    median = float(np.median(run['times']))
    base = base or median
    share = 100 * run['trainable'] / run['total']
    print(f'| {name} | {run["trainable"]:,} ({share:.2f}%) | {run["opt_bytes"] / 2**20:.1f} MiB | '
          f'{1e3 * median:.0f} | {median / base:.2f} |')


if __name__ == '__main__':
  main()
