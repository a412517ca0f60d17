"""Train-step time of one model under variants, measured side by side in one run.

    python benchmarks/train_step.py [--size tiny] [--batch 16] [--inputs 128] [--targets 32] [--steps 10]

Variants: activation dtype (float32 / bfloat16), scan over layers, remat policy. Prints a table
with the machine, the median step time, the ratio to the first row, and MFU against a matmul
peak measured in the same run. Rows run interleaved in rounds so that machine noise spreads
over all of them.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from t5lite import config as config_lib
from t5lite import optim, partitioning, reporting, trainer
from t5lite.data import catalog  # pylint: disable=unused-import  (validate checks data.task)
from t5lite.models.presets import ModelConfig, model_config
from t5lite.models.t5 import make_model

VARIANTS = [
    dict(dtype='float32'),
    dict(dtype='bfloat16'),
    dict(dtype='bfloat16', scan_layers=True),
    dict(dtype='bfloat16', remat_policy='minimal'),
    dict(dtype='bfloat16', remat_policy='full'),
]


def random_batch(batch, inputs, targets, vocab, seed=0):
  rng = np.random.RandomState(seed)
  tgt = rng.randint(3, vocab, (batch, targets)).astype(np.int32)
  return dict(encoder_input_tokens=rng.randint(3, vocab, (batch, inputs)).astype(np.int32),
              decoder_input_tokens=np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1),
              decoder_target_tokens=tgt, decoder_loss_weights=np.ones((batch, targets), np.float32))


def build(args, variant):
  c = config_lib.base_config()
  c.model = model_config(args.size, vocab_size=args.vocab)
  c.model.update(variant)
  c.train.batch_size = args.batch
  config_lib.validate(c, 1)
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  model_cfg = ModelConfig.from_config(c.model)
  model = make_model(model_cfg)
  tx, schedule = optim.make_optimizer(c)
  batch = random_batch(args.batch, args.inputs, args.targets, args.vocab)
  state, shardings = trainer.init_train_state(model, tx, mesh, c.partitioning.rules, batch, 0)
  step = trainer.jit_train_step(trainer.make_train_step(model, tx, schedule, c.train, False),
                                shardings, mesh, c.partitioning.rules)
  global_batch = partitioning.host_to_global(
      batch, partitioning.batch_sharding(mesh, c.partitioning.rules))
  state, metrics = step(state, global_batch)  # compile
  jax.block_until_ready(metrics)
  flops = reporting.train_flops_per_step(model_cfg, args.batch, args.inputs, args.targets)
  return {'step': step, 'state': state, 'batch': global_batch, 'flops': flops, 'times': []}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--size', default='tiny')
  parser.add_argument('--vocab', type=int, default=2048)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--inputs', type=int, default=128)
  parser.add_argument('--targets', type=int, default=32)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  runs = [build(args, v) for v in VARIANTS]
  for _ in range(args.steps):
    for run in runs:
      start = time.perf_counter()
      run['state'], metrics = run['step'](run['state'], run['batch'])
      jax.block_until_ready(metrics)
      run['times'].append(time.perf_counter() - start)
  peaks = {d: reporting.measure_matmul_peak(d) for d in ('float32', 'bfloat16')}
  device = jax.devices()[0]
  print(f'machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus | '
        f'{device.platform} {device.device_kind} x{len(jax.devices())} | jax {jax.__version__}')
  print(f'model {args.size} vocab {args.vocab} | batch {args.batch} | {args.inputs} -> '
        f'{args.targets} tokens | {args.steps} timed steps per row, interleaved')
  print(f'matmul peak measured: f32 {peaks["float32"] / 1e9:.0f} GFLOP/s, '
        f'bf16 operands/f32 acc {peaks["bfloat16"] / 1e9:.0f} GFLOP/s')
  print('| variant | median step (ms) | vs first | MFU (vs its dtype peak) |')
  print('|---|---|---|---|')
  base = None
  for variant, run in zip(VARIANTS, runs):
    median = float(np.median(run['times']))
    base = base or median
    name = ', '.join(f'{k}={v}' for k, v in variant.items())
    mfu = run['flops'] / median / peaks[variant['dtype']]  # one device: the whole machine
    print(f'| {name} | {1e3 * median:.1f} | {median / base:.2f} | {100 * mfu:.1f}% |')


if __name__ == '__main__':
  main()
