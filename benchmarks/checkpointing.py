"""Checkpoint save / restore wall time for a T5.1.1-small train state, and the async-save stall.

    python benchmarks/checkpointing.py [--size small] [--optimizer adafactor] [--repeats 3]

The state is what t5lite.train saves: params + optimizer state + step (T5.1.1-small: ~77M
parameters; Adafactor keeps factored statistics, so its state adds little). Per repeat it measures:

  sync save     Checkpointer(async_save=False).save: until the files are on disk
  async call    Checkpointer(async_save=True).save: until it returns, i.e. what the training
                loop waits for (the device-to-host copy and the directory set-up)
  async total   from the same call until wait() returns: the whole save, written in background
  stall         async call / async total: the share of a save the loop actually waits for
  restore       restore_latest into ShapeDtypeStruct targets (the same path as a resumed run)

Prints a table with the machine. On this 2-core CPU the "device" is host memory, so the copy is
a memcpy; on an accelerator it is a device-to-host transfer.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from t5lite import checkpoints, config as config_lib, optim, partitioning, trainer
from t5lite.models.presets import ModelConfig, model_config
from t5lite.models.t5 import make_model


def example_batch(batch=8, inputs=512, targets=114):
  return dict(encoder_input_tokens=np.ones((batch, inputs), np.int32), decoder_input_tokens=np.ones(
      (batch, targets), np.int32), decoder_target_tokens=np.ones((batch, targets), np.int32),
              decoder_loss_weights=np.ones((batch, targets), np.float32))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--size', default='small')
  parser.add_argument('--optimizer', default='adafactor')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dir', default=None, help='where to write (default: a temp folder)')
  args = parser.parse_args()

  config = config_lib.base_config()
  config.model = model_config(args.size, variant='v1_1')
  config.optimizer.name = args.optimizer
  config_dict = config.to_dict()
  config_dict = {'model': dict(config_dict['model'])}
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  model = make_model(ModelConfig.from_config(config.model))
  tx, _ = optim.make_optimizer(config)
  batch = example_batch()
  state, _ = trainer.init_train_state(model, tx, mesh, config.partitioning.rules, batch, 0)
  jax.block_until_ready(state)
  abstract, _ = trainer.abstract_train_state(model, tx, mesh, config.partitioning.rules, batch, 0)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))

  root = args.dir or tempfile.mkdtemp(prefix='t5lite_ckpt_bench_')
  rows = {'sync save': [], 'async call': [], 'async total': [], 'restore': []}
  for r in range(args.repeats):
    for mode in ('sync', 'async'):
      workdir = os.path.join(root, f'{mode}{r}')
      shutil.rmtree(workdir, ignore_errors=True)
      ckpt = checkpoints.Checkpointer(workdir, async_save=(mode == 'async'))
      start = time.perf_counter()
      ckpt.save(1, state, {'next_index': 1}, config_dict)
      returned = time.perf_counter()
      ckpt.wait()
      done = time.perf_counter()
      ckpt.close()
      if mode == 'sync':
        rows['sync save'].append(done - start)
      else:
        rows['async call'].append(returned - start)
        rows['async total'].append(done - start)
    ckpt = checkpoints.Checkpointer(os.path.join(root, f'sync{r}'))
    start = time.perf_counter()
    restored = ckpt.restore_latest(abstract)
    jax.block_until_ready(restored.state)
    rows['restore'].append(time.perf_counter() - start)
    ckpt.close()
    del restored
  size_on_disk = sum(
      os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(root, 'sync0'))
      for f in files)
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)

  print(f'machine: {platform.node()} | {platform.processor() or platform.machine()} | '
        f'{os.cpu_count()} cores | jax {jax.__version__} {jax.devices()[0].platform} | '
        f'orbax {__import__("orbax.checkpoint").checkpoint.__version__}')
  print(f'state: T5.1.1-{args.size} + {args.optimizer}: {n_params / 1e6:.1f}M params, '
        f'{n_bytes / 2**20:.0f} MiB in memory, {size_on_disk / 2**20:.0f} MiB on disk; '
        f'median of {args.repeats}')
  print()
  print('| measure | median s | min s | max s |')
  print('|---|---|---|---|')
  for name, values in rows.items():
    print(f'| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |')
  stall = statistics.median(a / t for a, t in zip(rows['async call'], rows['async total']))
  print(f'| stall = async call / async total | {100 * stall:.1f}% | | |')


if __name__ == '__main__':
  main()
