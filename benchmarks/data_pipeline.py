"""Data pipeline throughput next to the train step's consumption, measured in one run.

    python benchmarks/data_pipeline.py [--batches 50] [--train_steps 3] [--skip_small_step]

For each shape, the pipeline's tokens/s (non-padding encoder + decoder tokens of host-local
batches, one process) and the tokens/s that t5lite's jitted train step consumes at the same
batch (AdamW, the model's dtype, one device: what a single-host run needs fed). The issue asks for
the pipeline to be at least 10x the step. Shapes: the quickstart (tiny v1.1, inputs 128, batch
32) and T5.1.1-small (batch 8, inputs 512 / targets 114) for span corruption and UL2.
"""

import argparse
import os
import platform
import time

os.environ.setdefault('XLA_FLAGS', '')  # one device, as a single-host run

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from t5lite import config as config_lib  # pylint: disable=wrong-import-position
from t5lite import optim, partitioning, trainer  # pylint: disable=wrong-import-position
from t5lite.data import catalog  # pylint: disable=wrong-import-position,unused-import  (built-in tasks)
from t5lite.data import pipeline  # pylint: disable=wrong-import-position
from t5lite.models.presets import ModelConfig, model_config  # pylint: disable=wrong-import-position
from t5lite.models.t5 import make_model  # pylint: disable=wrong-import-position


def count_tokens(batch):
  return int((batch['encoder_input_tokens'] != 0).sum()
             + (batch['decoder_target_tokens'] != 0).sum())


def measure_pipeline(task, lengths, batch, batches):
  it = pipeline.make_task_iterator(task, feature_lengths=lengths, global_batch_size=batch, seed=0,
                                   process_index=0, process_count=1)
  first = next(it)  # warm-up: vocabulary, tokenized corpus, threads
  t0 = time.perf_counter()
  tokens = 0
  for _ in range(batches):
    tokens += count_tokens(next(it))
  return tokens / (time.perf_counter() - t0), first


def measure_train_step(size, batch, steps):
  """tokens/s of the jitted train step on `batch` (a pipeline batch), median of `steps`."""
  c = config_lib.base_config()
  c.model = model_config(size, variant='v1_1', vocab_size=2048 if size == 'tiny' else 32128)
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.train.batch_size = batch['encoder_input_tokens'].shape[0]
  config_lib.validate(c, 1)
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  model = make_model(ModelConfig.from_config(c.model))
  tx, schedule = optim.make_optimizer(c)
  state, shardings = trainer.init_train_state(model, tx, mesh, c.partitioning.rules, batch, 0)
  step = trainer.jit_train_step(trainer.make_train_step(model, tx, schedule, c.train, False),
                                shardings, mesh, c.partitioning.rules)
  placed = partitioning.host_to_global(batch,
                                       partitioning.batch_sharding(mesh, c.partitioning.rules))
  state, metrics = step(state, placed)  # compile
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, placed)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return count_tokens(batch) / float(np.median(times))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--batches', type=int, default=50)
  p.add_argument('--train_steps', type=int, default=3)
  p.add_argument('--skip_small_step', action='store_true',
                 help='skip the T5.1.1-small train step (about 10 s a step on 2 cores)')
  args = p.parse_args()
  print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'jax {jax.__version__} on {jax.devices()[0].platform}')
  rows = [('embedded_span_corruption', {'inputs': 128, 'targets': 29}, 32, 'tiny'),
          ('embedded_span_corruption', {'inputs': 512, 'targets': 114}, 8, 'small'),
          ('embedded_ul2', {'inputs': 512, 'targets': 114}, 8, 'small')]
  print(f'| task | lengths | batch | pipeline tokens/s | train step tokens/s (model) | ratio |')
  print('|---|---|---|---|---|---|')
  step_rates = {}
  for task, lengths, batch, size in rows:
    rate, first = measure_pipeline(task, lengths, batch, args.batches)
    key = (size, batch, lengths['inputs'])
    if key not in step_rates and not (size == 'small' and args.skip_small_step):
      step_rates[key] = measure_train_step(size, first, args.train_steps)
    step = step_rates.get(key)
    shown = f'{step:,.0f} ({size})' if step else 'skipped'
    ratio = f'{rate / step:.0f}x' if step else '-'
    print(
        f'| {task} | {lengths["inputs"]}/{lengths["targets"]} | {batch} | {rate:,.0f} | '
        f'{shown} | {ratio} |', flush=True)


if __name__ == '__main__':
  main()
