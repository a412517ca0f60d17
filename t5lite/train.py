"""Training entry point: `python -m t5lite.train --config configs/x.py[:arg] --workdir DIR`.

Top to bottom: the config is validated and resolved (before any compute) -> mesh and model ->
the workdir lock (one trainer per workdir) -> data -> the train state (resumed from
WORKDIR/checkpoints, else initialised, from checkpoint.init_from when set) -> the jitted train
step, which also keeps a device-side watch of non-finite and dead steps -> the loop: log to
stdout, TensorBoard and WORKDIR/metrics.jsonl, validate, evaluate tasks, save asynchronously (a
failed save stops the run at the next step); a SIGTERM saves and exits 0 at the step boundary
(docs/checkpoints.md, docs/reliability.md).

--workdir may be a URL (gs://bucket/run, with `pip install 't5lite[gcp]'`): every file of the
run goes through t5lite.files (etils.epath) and orbax, none through a local path.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Sequence

import jax
import numpy as np

from t5lite import (checkpoints, cli, distill, files, logs, multihost, optim, partitioning,
                    reporting, trainer)
from t5lite import vocab_expansion
from t5lite import workdir as workdir_lib
from t5lite import config as config_lib
from t5lite import config_files
from t5lite.data import catalog  # pylint: disable=unused-import  (registers the built-in tasks)
from t5lite.data import converters, pipeline, sources, stages, vocab
from t5lite.evaluation import evaluator as evaluator_lib
from t5lite.evaluation import validation

log = logging.getLogger('t5lite.train')  # not __name__: '__main__' under python -m


def build_data(config, process_index: int | None = None, process_count: int | None = None):
  """(the training iterator, the vocabulary); the vocabulary size is checked against the model."""
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
  settings = dict(feature_lengths=feature_lengths(config),
                  global_batch_size=config.train.batch_size, seed=config.train.seed, pack=d.pack,
                  converter=d.converter, vocabulary=vocabulary, process_index=process_index,
                  process_count=process_count, num_workers=d.num_workers)
  if d.stages:  # one pipeline per stage, switched at the stage's training step
    return stages.make_staged_iterator(stages.resolve(d.stages, d.task), **settings), vocabulary
  return pipeline.make_task_iterator(d.task, **settings), vocabulary


def feature_lengths(config) -> dict[str, int]:
  d = config.data
  return converters.feature_lengths(d.converter, d.inputs_length, d.targets_length)


def every(step: int, period: int, last: int) -> bool:
  """Periodic work is due at multiples of `period` (0: never) and at the last step."""
  return step == last or (period > 0 and step % period == 0)


def trim_metrics(workdir: str, step: int) -> None:
  """Keeps metrics.jsonl to the steps up to `step`, the step a run resumes from, once each and in
  order: the resumed run logs the later steps again, so the file ends up as an uninterrupted
  run's would. A step logged twice (a file from before the workdir lock, when two trainers could
  share a workdir) keeps its last line."""
  path = files.to_path(workdir) / 'metrics.jsonl'
  if jax.process_index() != 0 or not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  by_step = {}
  for line in lines:
    try:
      logged = json.loads(line)['step']
    except (ValueError, KeyError, TypeError):
      continue  # a line cut short by a crash
    if isinstance(logged, int) and logged <= step:
      by_step[logged] = line if line.endswith('\n') else line + '\n'
  kept = [by_step[s] for s in sorted(by_step)]
  if kept != lines:
    files.write_text(path, ''.join(kept))


def save_config(config, workdir: str) -> None:
  """WORKDIR/config.json and config.txt: by every process on a local disk (each host may have its
  own), by process 0 only on a URL (one shared copy)."""
  if not files.is_url(workdir) or jax.process_index() == 0:
    config_files.save_config(config, workdir)


def check_health(watch, values: dict[str, float], step: int, cfg, ckpt) -> None:
  """Stops the run when a step since the last check had a non-finite loss or gradient, or when
  the gradient has been exactly zero for train.max_dead_steps steps (a dead model).

  The device-side watch covers every step, not only the logged ones. A checkpoint is good only
  if its params gave a finite, live step after it: when step s is the first bad one, the
  checkpoints of steps >= s - 1 are moved aside (checkpoints_rejected/) and the message names
  the newest one left, so the same command resumes from a state that really trains."""
  report = trainer.read_watch(watch)
  max_dead = cfg.train.max_dead_steps
  if report.first_bad_step is not None:
    bad = report.first_bad_step
    good = ckpt.reject_from(bad - 1, f'its params gave a non-finite loss or gradient at step {bad}')
    now = {k: values[k] for k in ('loss', 'grad_norm') if k in values and not np.isfinite(values[k])}
    seen = f' ({", ".join(f"{k} {v}" for k, v in now.items())} at step {step})' if now else ''
    raise FloatingPointError(
        f'the loss or gradients became non-finite at step {bad}{seen}; '
        f'{_good_checkpoint(good, ckpt)}; lower optimizer.learning_rate, raise '
        'schedule.warmup_steps, or use model.dtype=float32 to find the source')
  if max_dead and report.dead_steps >= max_dead:
    first_dead = step - report.dead_steps + 1
    good = ckpt.reject_from(first_dead - 1,
                            f'its params gave a zero gradient from step {first_dead}')
    raise FloatingPointError(
        f'dead run: the gradient norm has been exactly 0 for {report.dead_steps} steps (since step '
        f'{first_dead}) while the loss stays at {values.get("loss", float("nan")):.4f} (ln V = '
        f'{np.log(cfg.model.vocab_size):.4f} is a model that predicts nothing); '
        f'{_good_checkpoint(good, ckpt)}; lower optimizer.learning_rate (train.max_dead_steps=0 '
        'turns this check off)')


def _good_checkpoint(step: int | None, ckpt) -> str:
  if step is None:
    return f'no good checkpoint is left in {ckpt.directory}'
  return f'the last good checkpoint is step {step} in {ckpt.directory}'


def save(ckpt, step: int, state, data_state, config_dict, values: dict[str, float]) -> None:
  """Saves asynchronously, after checking that the update left the state finite: the loss was
  computed before this step's update (one cheap reduction per save)."""
  if not bool(trainer.all_finite(state)):
    ckpt.wait()
    raise FloatingPointError(
        f'the update of step {step} made parameters or optimizer state non-finite (loss '
        f'{values["loss"]}); not saved, {_good_checkpoint(ckpt.latest_step(), ckpt)}; lower '
        'optimizer.learning_rate or raise schedule.warmup_steps')
  ckpt.save(step, state, data_state, config_dict,
            metrics={k: v for k, v in values.items() if k.startswith('eval/')} or None)


def lock_workdir(workdir: str, stale_minutes: float) -> workdir_lib.WorkdirLock | None:
  """Process 0 takes WORKDIR's lock (a second trainer on the same workdir refuses to start);
  every process learns whether it did, so none runs on alone. None on the other processes."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = workdir_lib.WorkdirLock(workdir, stale_minutes=stale_minutes)
    try:
      lock.acquire()
    except (workdir_lib.WorkdirBusyError, workdir_lib.WorkdirError) as e:
      error = e
  if multihost.agree([0 if error else 1]) != [1]:
    raise error or workdir_lib.WorkdirBusyError(
        f'process 0 could not lock {workdir} (its log says why)')
  return lock


def resume_data(iterator, data_state, cfg, step: int):
  """The data iterator at the checkpoint's position; or, when the data pipeline changed since
  and data.reset_position is set, a fresh one (the same data from the start). Returns it."""
  try:
    if isinstance(iterator, stages.StagedIterator):
      iterator.set_state(data_state, step)  # (the step: a state written without stages)
    else:
      iterator.set_state(data_state)
    return iterator
  except pipeline.DataStateMismatchError as e:
    if not cfg.data.reset_position:
      raise
    log.info(f'data.reset_position=True: the data pipeline changed since step {step} '
             f'({str(e).splitlines()[0]}); reading the data afresh from its start')
  iterator.close()
  fresh = build_data(cfg)[0]
  if isinstance(fresh, stages.StagedIterator):
    fresh.start_at(step)  # the stage clock is the training step, whatever the data reads
  return fresh


def build_evaluation(cfg, built, vocabulary, param_shardings, workdir: str):
  """(validate(params) -> eval/loss and eval/accuracy, evaluate_tasks(params, step) ->
  eval/<task>/<metric> or None); both None when eval.every_steps is 0."""
  e, t = cfg.eval, cfg.train
  if not e.every_steps:
    return None, None
  validate = validation.build_validation(cfg.data, e, e.batch_size or t.batch_size, t.seed,
                                         feature_lengths(cfg), vocabulary, built.model,
                                         param_shardings, built.mesh, built.rules)
  # Downstream metrics (decode / score eval.tasks) at the same steps: None without eval.tasks.
  evaluate_tasks = evaluator_lib.build_metric_evaluation(cfg, built.model, built.mesh, built.rules,
                                                         workdir)
  return validate, evaluate_tasks


def start_reporting(cfg, built, batch, state, workdir: str, start_step: int):
  """(throughput tracker, metric writer), after printing the run's headline."""
  inputs = batch.get('encoder_input_tokens')  # none for decoder-only models
  flops = reporting.train_flops_per_step(cfg.model, cfg.train.batch_size,
                                         0 if inputs is None else inputs.shape[1],
                                         batch['decoder_target_tokens'].shape[1])
  peak, peak_source = reporting.peak_flops_per_device(cfg.reporting.peak_flops_per_device,
                                                      cfg.model.dtype)
  throughput = reporting.Throughput(flops, peak * len(built.devices), cfg.train.steps)
  writer = reporting.MetricWriter(workdir, cfg.reporting.tensorboard,
                                  purge_step=start_step + 1 if start_step else None)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  log.info(f'model {cfg.model.size}/{cfg.model.variant} {n_params:,} params | mesh '
           f'{dict(built.mesh.shape)} | {flops / 1e9:.2f} GFLOP/step | peak {peak / 1e9:.1f} '
           f'GFLOP/s/device ({peak_source})')
  return throughput, writer


def run(config, workdir: str, devices: Sequence[jax.Device] | None = None) -> list[dict]:
  """Trains to config.train.steps, resuming from WORKDIR/checkpoints if there is one; returns
  the metrics logged by this invocation (also appended to WORKDIR/metrics.jsonl)."""
  # --- config, mesh, model (the config is checked before anything is built), the workdir lock
  built = cli.build(config, devices)
  cfg, mesh, rules, model = built.cfg, built.mesh, built.rules, built.model
  k, t, e = cfg.checkpoint, cfg.train, cfg.eval
  teacher_cfg = distill.teacher_config(t, cfg.model)  # None without train.distill_teacher
  lock = lock_workdir(workdir, k.lock_stale_minutes)
  iterator = ckpt = watcher = writer = evaluate_tasks = None  # closed in `finally`
  try:
    save_config(config, workdir)
    config_dict = json.loads(json.dumps(config.to_dict(), default=str))
    tx, schedule = optim.make_optimizer(cfg)
    iterator, vocabulary = build_data(cfg)
    batch = next(iterator)  # shapes for the state; the batch of step 1 on a fresh start
    ckpt = checkpoints.Checkpointer(workdir, keep=k.keep, async_save=k.async_save,
                                    best_metric=k.keep_best_metric, best_mode=k.keep_best_mode,
                                    best_n=k.keep_best_n)
    watcher = multihost.PreemptionWatcher()
    # --- train state: resume | init_from | fresh
    init = trainer.initial_state(model, tx, mesh, rules, batch, t.seed, ckpt, config_dict,
                                 k.init_from, k.init_rename, k.init_ignore,
                                 vocab_expansion.of_config(cfg, vocabulary),
                                 init_from_state=k.init_from_state)
    state, start_step = init.state, init.step
    if init.data_state is not None:
      iterator = resume_data(iterator, init.data_state, cfg, start_step)
      batch = next(iterator)
    trim_metrics(workdir, start_step)
    # Distillation: the teacher's params are read again on every start (not in the train state),
    # from the step directory the run began with.
    if teacher_cfg:
      teacher_cfg = distill.pin(teacher_cfg, workdir, resumed=start_step > 0,
                                write=not files.is_url(workdir) or jax.process_index() == 0)
    teacher = teacher_cfg and distill.load_teacher(teacher_cfg, mesh, rules, batch,
                                                   built.devices[0].platform)
    train_step = trainer.make_train_step(model, tx, schedule, t, dropout=cfg.model.dropout_rate > 0,
                                         teacher_model=teacher and teacher.model)
    step_fn = distill.bind(
        trainer.jit_train_step(train_step, init.shardings, mesh, rules, watch=True,
                               teacher_shardings=teacher and teacher.shardings), teacher)
    watch = trainer.initial_watch(mesh)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    validate, evaluate_tasks = build_evaluation(cfg, built, vocabulary, init.shardings.params,
                                                workdir)
    throughput, writer = start_reporting(cfg, built, batch, state, workdir, start_step)
    log.info(init.source)
    if teacher:
      log.info(teacher.source)
    if start_step >= t.steps:
      log.info(f'nothing to do: the checkpoint is at step {start_step} and train.steps is '
               f'{t.steps}')
      return []

    # --- the loop
    history = []
    for step in range(start_step + 1, t.steps + 1):
      tokens = int(
          np.sum(batch.get('encoder_input_tokens', 0) > 0)
          + np.sum(batch['decoder_loss_weights'] > 0))
      if step == start_step + 1:
        # The first call compiles (minutes for a large model): say so before and after.
        with logs.compiling('the train step', log):
          state, metrics, watch = step_fn(state, partitioning.host_to_global(batch, batch_sharding),
                                          watch)
          jax.block_until_ready(metrics)
      else:
        state, metrics, watch = step_fn(state, partitioning.host_to_global(batch, batch_sharding),
                                        watch)
      # Where the data stands after this step's batch: a checkpoint of `step` resumes with the
      # batch of step + 1. Read before the next() below, which already fetches that batch.
      data_state = iterator.get_state()
      if step == start_step + 1:  # the first step includes compilation: time from its end
        throughput.start()
      else:
        throughput.count(tokens)
      if step < t.steps:
        batch = next(iterator)  # prepared on the host while the device runs the step
      ckpt.check_save()  # a failed background save stops the run here, at the latest
      stop = watcher.should_stop()
      do_save = stop or every(step, k.every_steps, t.steps)
      do_eval = e.every_steps > 0 and every(step, e.every_steps, t.steps)
      do_log = do_eval or every(step, t.log_every, t.steps)
      if not (do_log or do_save):
        continue
      # 'finite' is the watch's input, not a curve to log: the watch reports on every step.
      values = {key: float(v) for key, v in jax.device_get(metrics).items() if key != 'finite'}
      check_health(watch, values, step, cfg, ckpt)
      if lock is not None:
        lock.check()  # another process took the workdir over: stop before writing anything
      if do_eval:
        eval_start = time.perf_counter()
        values.update(validate(state.params))
        if evaluate_tasks is not None:
          values.update(evaluate_tasks(state.params, step))
        throughput.pause(time.perf_counter() - eval_start)  # not training time
      if do_log:
        values.update(throughput.values(step, jax.process_count()))
        writer.write(step, values)
        history.append({'step': step, **values})
      if do_save:
        # On a URL, metrics.jsonl is uploaded whole now and then (reporting.MetricWriter): at
        # every checkpoint at the latest, so a run resumed from it finds every line up to it.
        writer.flush()
        save(ckpt, step, state, data_state, config_dict, values)
      if stop:
        ckpt.wait()
        ckpt.check_save()
        log.info(f'preempted (SIGTERM): saved the checkpoint of step {step} in '
                 f'{ckpt.directory}; run the same command to continue from step {step}')
        return history
    ckpt.wait()
    ckpt.check_save()  # the last save too: exit 0 only when it is on disk
    return history
  finally:
    # The checkpointer first, while the preemption watcher still holds SIGTERM: a signal during
    # the last save's wait must not interrupt it. On any exit the last checkpoint is complete.
    for closable in (writer, evaluate_tasks, ckpt, watcher, iterator):
      if closable is not None:
        closable.close()
    if lock is not None:
      lock.release()


def main(argv: Sequence[str]) -> int:

  def job(invocation: cli.Invocation):
    run(
        invocation.config,
        cli.require_workdir(invocation,
                            'the folder for checkpoints, metrics and the resolved config'))

  errors = [
      (FloatingPointError, 'training stopped', 1),
      (pipeline.DataStateMismatchError, 'data error', 2),
      (sources.DataSourceError, 'data error', 2),
      (workdir_lib.WorkdirBusyError, 'workdir busy', 1),
      (workdir_lib.WorkdirError, 'workdir error', 2),
  ]
  return cli.main(argv, job, usage=__doc__, errors=errors,
                  workdir_help='the run folder: checkpoints, metrics, the resolved config')


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
