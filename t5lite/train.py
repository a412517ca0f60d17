"""Training entry point: `python -m t5lite.train --config configs/x.py[:arg] --workdir DIR`.

Top to bottom: parse and validate the config (before any compute) -> mesh -> data -> model and
sharded train state, restored from WORKDIR/checkpoints when there is one -> jitted train step ->
loop with logging to stdout, TensorBoard and WORKDIR/metrics.jsonl, periodic asynchronous
checkpoints, and a checkpoint-and-exit-0 at the step boundary after a SIGTERM
(docs/checkpoints.md).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from t5lite import checkpoints, cli, distributed, host_memory
from t5lite import config as config_lib
from t5lite import optim, partitioning, reporting, trainer
from t5lite.data import pipeline, vocab
from t5lite.data.preprocessors import random_spans_helper
from t5lite.evaluation import evaluator as evaluator_lib
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model


def build_data(config, process_index: int | None = None, process_count: int | None = None):
  """The training iterator and the vocabulary; the vocabulary size is checked against the model."""
  d = config.data
  try:
    vocabulary = vocab.get_vocabulary(d.vocabulary, d.sp_vocab_size)
  except FileNotFoundError as e:
    raise config_lib.ConfigError(str(e)) from None
  if vocabulary is not None and vocabulary.vocab_size > config.model.vocab_size:
    raise config_lib.ConfigError(
        f'config.model.vocab_size={config.model.vocab_size} is smaller than the vocabulary '
        f'({vocabulary.vocab_size} ids including {vocabulary.extra_ids} sentinels); set '
        f'model.vocab_size >= {vocabulary.vocab_size} or use a smaller vocabulary')
  # T5's choice for span corruption: the targets that inputs_length of corrupted text produces.
  targets_length = d.targets_length or random_spans_helper(d.inputs_length, 0.15, 3.0)[1]
  lengths = {'inputs': d.inputs_length, 'targets': targets_length}
  if d.converter == 'decoder':
    lengths = {'targets': d.inputs_length + targets_length}
  iterator = pipeline.make_task_iterator(
      d.task, feature_lengths=lengths, global_batch_size=config.train.batch_size,
      seed=config.train.seed, pack=d.pack, converter=d.converter, vocabulary=vocabulary,
      process_index=process_index, process_count=process_count, num_workers=d.num_workers)
  return iterator, vocabulary


def build_validation(config, model, param_shardings, mesh, rules):
  """A function params -> {'eval/loss', 'eval/accuracy', 'eval/target_tokens'}: one ordered
  pass over eval.split of eval.task (data.task by default), the same lengths as training.

  The last batch is zero-padded by the pipeline and padding carries no loss weight, so every
  example counts once. With several processes each reads its slice; they may run out of batches
  at different times, so each pass agrees (one tiny all-gather per batch) on whether anyone still
  has data, and a process that has none feeds an all-padding batch to the collective step.
  """
  e, d = config.eval, config.data
  task = e.task or d.task
  batch_size = e.batch_size or config.train.batch_size
  targets_length = d.targets_length or random_spans_helper(d.inputs_length, 0.15, 3.0)[1]
  lengths = {'inputs': d.inputs_length, 'targets': targets_length}
  if d.converter == 'decoder':
    lengths = {'targets': d.inputs_length + targets_length}
  vocabulary = vocab.get_vocabulary(d.vocabulary, d.sp_vocab_size)
  eval_step = trainer.make_eval_step(model, param_shardings, mesh, rules)
  batch_sharding = partitioning.batch_sharding(mesh, rules)

  def evaluate(params) -> dict[str, float]:
    iterator = pipeline.make_task_iterator(
        task, feature_lengths=lengths, global_batch_size=batch_size, seed=config.train.seed,
        pack=d.pack, converter=d.converter, vocabulary=vocabulary, split=e.split,
        shuffle=False, repeat=False)
    totals, template, batches = None, None, 0
    while not e.max_batches or batches < e.max_batches:
      batch = next(iterator, None)
      if jax.process_count() > 1:
        anyone = multihost_utils.process_allgather(np.array([batch is not None], np.int32))
        if not np.any(anyone):
          break
      elif batch is None:
        break
      if batch is None:
        batch = {k: np.zeros_like(v) for k, v in template.items()}
      template = batch
      sums = eval_step(params, partitioning.host_to_global(batch, batch_sharding))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      batches += 1
    iterator.close()
    if totals is None:
      raise ValueError(f'eval: task {task!r} split {e.split!r} gave no batches')
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    weight = max(totals['weight_sum'], 1.0)
    return {'eval/loss': totals['loss_sum'] / weight,
            'eval/accuracy': totals['correct_sum'] / weight,
            'eval/target_tokens': totals['weight_sum']}

  return evaluate


class PreemptionWatcher:
  """SIGTERM (what TPU and cluster schedulers send before killing a job) -> stop at a step boundary.

  The handler only sets a flag; the loop reads it between steps, where the state is consistent.
  With several processes one may get the signal before the others, so every step they all-gather
  their flags (a few bytes; the only per-step cross-process sync this adds) and stop together
  at the same step. A single process just reads its flag.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. run() called from a worker thread): no handler
      pass

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf is free of inf and nan."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def trim_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl lines beyond `step`, the step a run resumes from: the resumed run logs
  those steps again, so the file ends up as an uninterrupted run's would (no duplicates)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line cut short by a crash
  if len(kept) != len(lines):
    with open(path, 'w') as f:
      f.writelines(kept)


def run(config, workdir: str, devices: Sequence[jax.Device] | None = None) -> list[dict]:
  """Trains to config.train.steps, resuming from WORKDIR/checkpoints if there is one; returns
  the metrics logged by this invocation (also appended to WORKDIR/metrics.jsonl)."""
  # --- config, mesh, model, data
  # Before JAX starts its CPU client, if it has not yet (host_memory's arena limit).
  host_memory.keep_freed_memory(config.keep_host_memory,
                                devices[0].platform if devices else None)
  devices = list(devices if devices is not None else jax.devices())
  shape = config_lib.validate(config, len(devices))  # before anything is built
  config_lib.save_config(config, workdir)
  config_dict = json.loads(json.dumps(config.to_dict(), default=str))
  mesh = partitioning.make_mesh(shape, devices)
  rules = config.partitioning.rules
  model_cfg = ModelConfig.from_config(config.model)
  model = make_model(model_cfg)
  tx, schedule = optim.make_optimizer(config)
  iterator, _ = build_data(config)
  batch = next(iterator)  # shapes for the state; the batch of step 1 on a fresh start

  k = config.checkpoint
  ckpt = checkpoints.Checkpointer(workdir, keep=k.keep, async_save=k.async_save,
                                  best_metric=k.keep_best_metric, best_mode=k.keep_best_mode,
                                  best_n=k.keep_best_n)
  watcher = PreemptionWatcher()
  writer = evaluate_metrics = None
  try:
    # --- train state: the newest readable checkpoint, else a fresh initialisation
    abstract, shardings = trainer.abstract_train_state(model, tx, mesh, rules, batch,
                                                           config.train.seed)
    restored = ckpt.restore_latest(abstract, config_dict)
    if restored is None:
      state, _ = trainer.init_train_state(model, tx, mesh, rules, batch, config.train.seed,
                                          shardings)
      start_step = 0
      if config.checkpoint.init_from:
        # Fine-tuning: params from another run; optimizer state and step stay fresh. Only here,
        # with nothing to resume: once this run has saved, resuming takes precedence.
        k = config.checkpoint
        source = checkpoints.resolve_init_path(k.init_from)
        loaded = checkpoints.load_params_for_init(source, abstract.params, k.init_rename,
                                                  k.init_ignore)
        state = state.replace(params=checkpoints.merge_init_params(state.params, loaded))
        fresh = sum(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(loaded))
        if jax.process_index() == 0:
          print(f'initialised params from {source} ({fresh} kept fresh by init_ignore); '
                'optimizer state and step start fresh', flush=True)
    else:
      state, start_step = restored.state, restored.step
      iterator.set_state(restored.data_state)
      batch = next(iterator)
    trim_metrics(workdir, start_step)

    step_fn = trainer.jit_train_step(
        trainer.make_train_step(model, tx, schedule, config.train,
                                dropout=config.model.dropout_rate > 0),
        shardings, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    eval_every = config.eval.every_steps
    evaluate = (build_validation(config, model, shardings.params, mesh, rules) if eval_every
                else None)
    # Downstream metrics (decode / score eval.tasks) at the same steps: eval/<task>/<metric>.
    evaluate_metrics = (evaluator_lib.build_metric_evaluation(config, model, mesh, rules, workdir)
                        if eval_every else None)

    # --- reporting
    inputs_length = (batch['encoder_input_tokens'].shape[1] if 'encoder_input_tokens' in batch
                     else 0)
    targets_length = batch['decoder_target_tokens'].shape[1]
    flops_per_step = reporting.train_flops_per_step(model_cfg, config.train.batch_size,
                                                    inputs_length, targets_length)
    peak, peak_source = reporting.peak_flops_per_device(config.reporting.peak_flops_per_device,
                                                        config.model.dtype)
    total_peak = peak * len(devices)
    writer = reporting.MetricWriter(workdir, config.reporting.tensorboard,
                                    purge_step=start_step + 1 if start_step else None)
    total_steps, log_every = config.train.steps, config.train.log_every
    every = config.checkpoint.every_steps
    if writer.active:
      n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
      print(f'model {config.model.size}/{config.model.variant} {n_params:,} params | mesh '
            f'{dict(zip(config_lib.MESH_AXES, shape))} | {flops_per_step / 1e9:.2f} GFLOP/step | '
            f'peak {peak / 1e9:.1f} GFLOP/s/device ({peak_source})', flush=True)
      if start_step:
        print(f'resumed from the checkpoint of step {start_step} in {ckpt.directory}', flush=True)
    if start_step >= total_steps:
      if writer.active:
        print(f'nothing to do: the checkpoint is at step {start_step} and train.steps is '
              f'{total_steps}', flush=True)
      return []

    # --- the loop
    history = []
    interval_start, interval_steps, interval_tokens = None, 0, 0
    run_start = time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
      tokens = int(np.sum(batch.get('encoder_input_tokens', 0) > 0)
                   + np.sum(batch['decoder_loss_weights'] > 0))
      state, metrics = step_fn(state, partitioning.host_to_global(batch, batch_sharding))
      # Where the data stands after this step's batch: a checkpoint of `step` resumes with the
      # batch of step + 1. Read before the next() below, which already fetches that batch.
      data_state = iterator.get_state()
      if step == start_step + 1:
        # The first step includes compilation: time the run from its end.
        jax.block_until_ready(metrics)
        interval_start = time.perf_counter()
        if writer.active:
          print(f'compiled and ran step {step} in {interval_start - run_start:.1f}s', flush=True)
      else:
        interval_steps += 1
        interval_tokens += tokens
      if step < total_steps:
        batch = next(iterator)  # prepared on the host while the device runs the step
      stop = watcher.should_stop()
      save = step == total_steps or stop or (every > 0 and step % every == 0)
      do_eval = eval_every > 0 and (step % eval_every == 0 or step == total_steps)
      log = step % log_every == 0 or step == total_steps or do_eval
      if not (log or save):
        continue
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      bad = {k: values[k] for k in ('loss', 'grad_norm') if not np.isfinite(values[k])}
      if bad:
        # Never checkpoint this state. Let the save in flight (an earlier, good state) finish.
        ckpt.wait()
        last = ckpt.latest_step()
        where = (f'the last good checkpoint is step {last} in {ckpt.directory}'
                 if last is not None else 'no checkpoint was written')
        raise FloatingPointError(
            f'{" and ".join(f"{k} is {v}" for k, v in bad.items())} at step {step} (metrics up '
            f'to step {step - log_every} are in {workdir}/metrics.jsonl; {where}); lower '
            'optimizer.learning_rate, raise schedule.warmup_steps, or use model.dtype=float32 '
            'to find the source')
      if do_eval:
        eval_start = time.perf_counter()
        values.update(evaluate(state.params))
        if evaluate_metrics is not None:
          values.update(evaluate_metrics(state.params, step))
        # Evaluation time is not training time: keep it out of steps/s and the ETA.
        if interval_start is not None:
          interval_start += time.perf_counter() - eval_start
      if log:
        now = time.perf_counter()
        if interval_steps > 0:
          elapsed = now - interval_start
          step_time = elapsed / interval_steps
          values['steps_per_sec'] = 1.0 / step_time
          # Every process counted its own rows: scale to the global batch.
          values['tokens_per_sec'] = interval_tokens * jax.process_count() / elapsed
          if total_peak > 0:
            values['mfu'] = flops_per_step / step_time / total_peak
          values['eta_seconds'] = step_time * (total_steps - step)
        interval_start, interval_steps, interval_tokens = now, 0, 0
        writer.write(step, values)
        history.append({'step': step, **values})
      if save:
        # The loss above was computed before this step's update: check the updated state too,
        # so a checkpoint never holds inf/nan (one cheap reduction per save).
        if not bool(all_finite(state)):
          ckpt.wait()
          raise FloatingPointError(
              f'the update of step {step} made parameters or optimizer state non-finite (loss '
              f'{values["loss"]}); not saved, the last good checkpoint is step '
              f'{ckpt.latest_step()} in {ckpt.directory}; lower optimizer.learning_rate or raise '
              'schedule.warmup_steps')
        ckpt.save(step, state, data_state, config_dict,  # async: returns after the host copy
                  metrics={k: v for k, v in values.items() if k.startswith('eval/')} or None)
      if stop:
        ckpt.wait()
        if writer.active:
          print(f'preempted (SIGTERM): saved the checkpoint of step {step} in {ckpt.directory}; '
                f'run the same command to continue from step {step}', flush=True)
        return history
    return history
  finally:
    watcher.close()
    if writer is not None:
      writer.close()
    if evaluate_metrics is not None:
      evaluate_metrics.close()
    ckpt.close()  # waits for a save in flight: on any exit the last checkpoint is complete
    iterator.close()  # stops data worker processes, if any


def main(argv: Sequence[str]) -> int:
  def job():
    # Takes --coordinator_address/--num_processes/--process_id out of argv and initialises JAX for
    # a multi-process run; must come before any other JAX call.
    config, workdir = config_lib.parse_command_line(distributed.setup(argv))
    if not workdir:
      raise config_lib.ConfigError('--workdir is required: the folder for checkpoints, metrics '
                                   'and the resolved config')
    run(config, workdir)
  return cli.run_main(job, [(FloatingPointError, 'training stopped', 1)])

if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
