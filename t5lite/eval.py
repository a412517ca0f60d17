"""Evaluation job: `python -m t5lite.eval --config C[:arg] --workdir W --checkpoint SPEC [--watch]`.

Evaluates checkpoints of a run on config.eval.tasks with the metric evaluator
(t5lite/evaluation/evaluator.py): decoding (config.decode) or scoring over the whole eval.split,
each task's postprocess and metric fns. Results go to W/eval/<task>/step_<N>.json and
TensorBoard in W/eval, and a table is printed; while a task runs, progress lines say the examples
done, the rate and the ETA. W (and any PATH below) may be a gs:// URL (pip install
't5lite[gcp]'). --checkpoint:

  latest   the newest complete checkpoint in W/checkpoints (the default)
  all      every complete checkpoint, oldest first, skipping steps already evaluated (every task
           has its step_<N>.json)
  N        step N of W/checkpoints
  PATH     a step directory, a checkpoints directory or a workdir (its newest step), or hf:DIR (a
           HuggingFace T5, scored as step 0)

--watch evaluates every complete checkpoint not yet evaluated, then polls every --poll_seconds
(default 30) for new ones while training runs; it exits 0 once the checkpoint of train.steps is
evaluated, or after --timeout seconds (default 3600) without a new checkpoint. A checkpoint deleted
by retention before it could be read is reported and skipped. A missing checkpoint is one line on
stderr and exit code 2 (config errors too); an unreadable one exits 1.

Only the params are read (orbax partial restore onto this config's mesh; the optimizer state is
never loaded), so a run trained on one mesh is evaluated on any other. With several processes
every process runs this with the same flags; process 0 decides which steps to evaluate.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Sequence

from t5lite import checkpoints, cli, files, init_from, multihost, partitioning
from t5lite import config as config_lib
from t5lite.data import catalog  # pylint: disable=unused-import  (registers the built-in tasks)
from t5lite.data import tasks as tasks_lib
from t5lite.evaluation import evaluator as evaluator_lib

log = logging.getLogger('t5lite.eval')  # not __name__: '__main__' under python -m


def is_evaluated(workdir: str, tasks: Sequence[str], step: int) -> bool:
  return all(files.to_path(evaluator_lib.result_path(workdir, t, step)).exists() for t in tasks)


def run(config, workdir: str, checkpoint: str = 'latest', watch: bool = False,
        poll_seconds: float = 30.0, timeout: float = 3600.0, devices=None) -> dict:
  """Evaluates what `checkpoint` names (see the module docstring); returns {step: results}."""
  if not config.eval.tasks:
    raise config_lib.ConfigError('config.eval.tasks is empty: name the tasks to evaluate, e.g. '
                                 "--config.eval.tasks=\"('fill_word',)\"")
  config_lib.task_names(config.eval.tasks, 'eval.tasks')  # known names, before get_task below
  for name in config.eval.tasks:
    try:
      splits = tasks_lib.get_task(name).splits
    except ValueError as e:  # a mixture: metrics are per task
      raise config_lib.ConfigError(f'config.eval.tasks: {str(e).rstrip(".")}; list its tasks '
                                   'instead') from None
    if config.eval.split not in splits:
      raise config_lib.ConfigError(f'config.eval.split={config.eval.split!r}: task {name!r} has '
                                   f'only the splits {list(splits)}')
  built = cli.build(config, devices)
  cfg, model, mesh, rules = built.cfg, built.model, built.mesh, built.rules
  targets = None if watch else checkpoints.resolve_steps(checkpoint, workdir)  # before compiling
  abstract, _ = partitioning.abstract_params(model, mesh, rules)
  evaluator = evaluator_lib.Evaluator(cfg, model, mesh, rules, workdir=workdir)
  tasks = list(config.eval.tasks)
  done: dict[int, dict] = {}

  def evaluate(step: int, path: str, skip_unreadable: bool = False) -> None:
    start = time.perf_counter()
    try:
      params, error = init_from.load_params(path, abstract), None
    except checkpoints.CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (e.g. deleted by retention meanwhile)
      if not skip_unreadable:
        raise
      params, error = None, f'{type(e).__name__}: {str(e)[:200]}'
    if not multihost.all_processes(error is None):  # all processes skip it, or none does
      log.info(f'step {step}: cannot be read ({error or "on another process"}); skipping')
      return
    log.info(f'evaluating step {step} ({path}; params read in {time.perf_counter() - start:.1f}s)')
    done[step] = evaluator.evaluate(params, step)

  try:
    if not watch:
      todo = [
          step for step, _ in targets
          if not (checkpoint == 'all' and is_evaluated(workdir, tasks, step))
      ]
      for step in sorted({s for s, _ in targets} - set(todo)):
        where = evaluator_lib.result_path(workdir, tasks[0], step)
        log.info(f'step {step}: already evaluated ({where} exists); skipping')
      paths = dict(targets)
      for step in multihost.agree(todo):  # process 0's view of the file system decides
        evaluate(step, paths.get(step, files.join(workdir, 'checkpoints', str(step))))
      return done
    final, seen, last_new = cfg.train.steps, set(), time.monotonic()
    where = files.join(workdir, 'checkpoints')  # a local path made absolute, a URL kept
    log.info(
        f'watching {where} (every '
        f'{poll_seconds:g}s; stops after step {final} or {timeout:g}s without a new checkpoint)')
    while True:
      new = [s for s in checkpoints.complete_steps(where) if s not in seen]
      todo = multihost.agree([s for s in new if not is_evaluated(workdir, tasks, s)])
      new = multihost.agree(new)
      if new:
        seen.update(new)
        last_new = time.monotonic()
      for step in todo:
        evaluate(step, files.join(where, str(step)), skip_unreadable=True)
      if final in seen:
        log.info(f'evaluated the final checkpoint (step {final}); done')
        return done
      if multihost.agree([int(time.monotonic() - last_new > timeout)]) == [1]:
        log.info(f'no new checkpoint for {timeout:g}s; stopping')
        return done
      time.sleep(poll_seconds)
  finally:
    evaluator.close()


FLAGS = (
    cli.Flag('checkpoint', 'latest', 'latest | all | N | a path | hf:DIR (see above)'),
    cli.Flag('watch', False, 'evaluate new checkpoints as training writes them'),
    cli.Flag('poll_seconds', 30.0, '--watch: seconds between looks for a new checkpoint'),
    cli.Flag('timeout', 3600.0, '--watch: stop after this many seconds without a new checkpoint'),
)


def main(argv: Sequence[str]) -> int:

  def job(invocation: cli.Invocation):
    workdir = cli.require_workdir(
        invocation, 'the run whose checkpoints to evaluate; results go to WORKDIR/eval',
        must_exist=True)
    run(invocation.config, workdir, **invocation.options)

  return cli.main(
      argv, job, usage=__doc__, job_flags=FLAGS, errors=[
          (checkpoints.MissingCheckpointError, 'eval', 2)
      ], stopped=('eval: stopped by SIGTERM; the steps evaluated so far have their '
                  'results in WORKDIR/eval: run the same command to continue'),
      workdir_help='the run whose checkpoints to evaluate; results go to WORKDIR/eval')


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
