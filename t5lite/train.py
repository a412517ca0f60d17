"""Training entry point: `python -m t5lite.train --config configs/x.py[:arg] --workdir DIR`.

Top to bottom: parse and validate the config (before any compute) -> mesh -> data -> model and
sharded train state -> jitted train step -> loop with logging to stdout, TensorBoard and
WORKDIR/metrics.jsonl.
"""
from __future__ import annotations

import sys
import time
from typing import Sequence

import jax
import numpy as np

from t5lite import config as config_lib
from t5lite import optim, partitioning, reporting, trainer
from t5lite.data import pipeline, vocab
from t5lite.data.preprocessors import random_spans_helper
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model


def build_data(config, process_index: int | None = None, process_count: int | None = None):
  """The training iterator and the vocabulary; the vocabulary size is checked against the model."""
  d = config.data
  vocabulary = vocab.embedded_vocabulary(d.sp_vocab_size)
  if vocabulary.vocab_size > config.model.vocab_size:
    raise config_lib.ConfigError(
        f'config.model.vocab_size={config.model.vocab_size} is smaller than the vocabulary '
        f'({vocabulary.vocab_size} ids including 100 sentinels); set model.vocab_size >= '
        f'{vocabulary.vocab_size} or lower data.sp_vocab_size')
  iterator = pipeline.make_span_corruption_iterator(
      inputs_length=d.inputs_length, global_batch_size=config.train.batch_size,
      seed=config.train.seed, pack=d.pack, noise_density=d.noise_density,
      mean_noise_span_length=d.mean_noise_span_length, vocabulary=vocabulary,
      process_index=process_index, process_count=process_count)
  return iterator, vocabulary


def run(config, workdir: str, devices: Sequence[jax.Device] | None = None) -> list[dict]:
  """Trains for config.train.steps; returns the logged metrics (also written to the workdir)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = config_lib.validate(config, len(devices))  # before anything is built
  config_lib.save_config(config, workdir)
  mesh = partitioning.make_mesh(shape, devices)
  rules = config.partitioning.rules
  model_cfg = ModelConfig.from_config(config.model)
  model = make_model(model_cfg)
  tx, schedule = optim.make_optimizer(config)

  iterator, _ = build_data(config)
  first = next(iterator)
  state, shardings = trainer.init_train_state(model, tx, mesh, rules, first, config.train.seed)
  step_fn = trainer.jit_train_step(
      trainer.make_train_step(model, tx, schedule, config.train,
                              dropout=config.model.dropout_rate > 0),
      shardings, mesh, rules)
  batch_sharding = partitioning.batch_sharding(mesh, rules)

  inputs_length = first['encoder_input_tokens'].shape[1] if 'encoder_input_tokens' in first else 0
  targets_length = first['decoder_target_tokens'].shape[1]
  flops_per_step = reporting.train_flops_per_step(model_cfg, config.train.batch_size,
                                                  inputs_length, targets_length)
  peak, peak_source = reporting.peak_flops_per_device(config.reporting.peak_flops_per_device,
                                                      config.model.dtype)
  total_peak = peak * len(devices)
  writer = reporting.MetricWriter(workdir, config.reporting.tensorboard)
  if writer.active:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    print(f'model {config.model.size}/{config.model.variant} {n_params:,} params | mesh '
          f'{dict(zip(config_lib.MESH_AXES, shape))} | {flops_per_step / 1e9:.2f} GFLOP/step | '
          f'peak {peak / 1e9:.1f} GFLOP/s/device ({peak_source})', flush=True)

  history, batch = [], first
  total_steps, log_every = config.train.steps, config.train.log_every
  interval_start, interval_steps, interval_tokens = None, 0, 0
  run_start = time.perf_counter()
  for step in range(1, total_steps + 1):
    tokens = int(np.sum(batch.get('encoder_input_tokens', 0) > 0)
                 + np.sum(batch['decoder_loss_weights'] > 0))
    state, metrics = step_fn(state, partitioning.host_to_global(batch, batch_sharding))
    if step == 1:
      # The first step includes compilation: time the run from its end.
      jax.block_until_ready(metrics)
      interval_start = time.perf_counter()
      if writer.active:
        print(f'compiled and ran step 1 in {interval_start - run_start:.1f}s', flush=True)
    else:
      interval_steps += 1
      interval_tokens += tokens
    if step < total_steps:
      batch = next(iterator)
    if step % log_every == 0 or step == total_steps:
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(values['loss']):
        writer.close()
        raise FloatingPointError(
            f'loss is {values["loss"]} at step {step} (metrics up to step {step - log_every} are '
            f'in {workdir}/metrics.jsonl); lower optimizer.learning_rate, raise '
            'schedule.warmup_steps, or use model.dtype=float32 to find the source')
      now = time.perf_counter()
      if interval_steps > 0:
        elapsed = now - interval_start
        step_time = elapsed / interval_steps
        values['steps_per_sec'] = 1.0 / step_time
        values['tokens_per_sec'] = interval_tokens / elapsed
        if total_peak > 0:
          values['mfu'] = flops_per_step / step_time / total_peak
        values['eta_seconds'] = step_time * (total_steps - step)
      interval_start, interval_steps, interval_tokens = now, 0, 0
      writer.write(step, values)
      history.append({'step': step, **values})
  writer.close()
  return history


def main(argv: Sequence[str]) -> int:
  try:
    config, workdir = config_lib.parse_command_line(argv)
    if not workdir:
      raise config_lib.ConfigError('--workdir is required: the folder for checkpoints, metrics '
                                   'and the resolved config')
    run(config, workdir)
  except config_lib.ConfigError as e:
    print(f'config error: {e}', file=sys.stderr)
    return 2
  except FloatingPointError as e:
    print(f'training stopped: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
