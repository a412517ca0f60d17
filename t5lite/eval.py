"""Evaluation job: `python -m t5lite.eval --config C[:arg] --workdir W --checkpoint SPEC [--watch]`.

Evaluates checkpoints of a run on config.eval.tasks with the metric evaluator
(t5lite/evaluation/evaluator.py): decoding (config.decode) or scoring over the whole eval.split,
each task's postprocess and metric fns. Results go to W/eval/<task>/step_<N>.json and
TensorBoard in W/eval, and a table is printed. --checkpoint:

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

import os
import sys
import time
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from t5lite import checkpoints, cli, distributed, host_memory, partitioning, trainer
from t5lite import config as config_lib
from t5lite.evaluation import evaluator as evaluator_lib
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model


class MissingCheckpointError(RuntimeError):
  """The checkpoint asked for does not exist (exit code 2)."""


def split_flags(argv: Sequence[str], flags: dict[str, type]) -> tuple[dict, list[str]]:
  """Takes `--name value` / `--name=value` (bool flags: `--name`) for `flags` out of argv."""
  found, rest, args, i = {}, [], list(argv), 0
  while i < len(args):
    name, has_value, value = (args[i][2:].partition('=') if args[i].startswith('--')
                              else ('', '', ''))
    if name in flags:
      kind = flags[name]
      if kind is bool:
        found[name] = value.lower() not in ('0', 'false', 'no') if has_value else True
      else:
        if not has_value:
          if i + 1 >= len(args):
            raise config_lib.ConfigError(f'--{name} needs a value')
          i += 1
          value = args[i]
        try:
          found[name] = kind(value)
        except ValueError:
          raise config_lib.ConfigError(f'--{name}={value!r}: expected {kind.__name__}') from None
    else:
      rest.append(args[i])
    i += 1
  return found, rest


def build(config, devices=None):
  """(model, mesh, rules) for a validated config."""
  # Before JAX starts its CPU client, if it has not yet (host_memory's arena limit).
  host_memory.keep_freed_memory(config.keep_host_memory,
                                devices[0].platform if devices else None)
  devices = list(devices if devices is not None else jax.devices())
  shape = config_lib.validate(config, len(devices))
  mesh = partitioning.make_mesh(shape, devices)
  return make_model(ModelConfig.from_config(config.model)), mesh, config.partitioning.rules


def abstract_params(model, mesh, rules):
  """ShapeDtypeStructs of the params carrying this mesh's shardings (nothing allocated)."""
  rows = mesh.devices.size
  example = {'decoder_input_tokens': jax.ShapeDtypeStruct((rows, 8), np.int32)}
  if model.cfg.architecture == 'encoder_decoder':
    example['encoder_input_tokens'] = jax.ShapeDtypeStruct((rows, 8), np.int32)
  with trainer.activate(mesh, rules):
    boxed = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), **x), example)['params']
    shardings = partitioning.logical_shardings(boxed, mesh, rules)
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      nn.meta.unbox(boxed), shardings)


def load_params(path: str, abstract):
  """The params of the checkpoint at `path` (a step directory or hf:DIR) on `abstract`'s
  shardings; the names and shapes must match the model exactly."""
  return checkpoints.load_params_for_init(path, abstract)


def complete_steps(workdir: str) -> list[int]:
  """Steps of WORKDIR/checkpoints that orbax finished writing (commit marker), oldest first."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.exists(os.path.join(directory, n,
                                                               checkpoints.COMMIT_MARKER)))


def resolve_checkpoints(spec: str, workdir: str | None) -> list[tuple[int, str]]:
  """(step, path) pairs that --checkpoint names; MissingCheckpointError when there is none."""
  spec = str(spec)
  if spec in ('latest', 'all') or spec.isdigit():
    if not workdir:
      raise MissingCheckpointError(f'--checkpoint {spec} needs --workdir (the run whose '
                                   'checkpoints to read)')
    steps = complete_steps(workdir)
    where = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if spec.isdigit():
      if int(spec) not in steps:
        have = ', '.join(map(str, steps[-10:])) or 'none'
        raise MissingCheckpointError(f'no complete checkpoint of step {spec} in {where} '
                                     f'(complete steps: {have})')
      steps = [int(spec)]
    elif not steps:
      raise MissingCheckpointError(f'no complete checkpoint in {where}')
    elif spec == 'latest':
      steps = steps[-1:]
    return [(s, os.path.join(where, str(s))) for s in steps]
  try:
    path = checkpoints.resolve_init_path(spec)
  except checkpoints.CheckpointError as e:
    raise MissingCheckpointError(str(e).replace('checkpoint.init_from=', '--checkpoint ')) from None
  name = os.path.basename(path)
  return [(int(name) if name.isdigit() else 0, path)]


def _agree(steps: list[int]) -> list[int]:
  """Process 0's list on every process (file listings can differ in time between hosts)."""
  if jax.process_count() == 1:
    return steps
  tail = steps[-4096:]
  buffer = np.full((4096,), -1, np.int32)
  buffer[:len(tail)] = tail
  buffer = multihost_utils.broadcast_one_to_all(buffer)
  return [int(s) for s in buffer if s >= 0]


def _everyone(ok: bool) -> bool:
  """True when `ok` holds on every process (one tiny all-gather when there are several)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.int32))))


def is_evaluated(workdir: str, tasks: Sequence[str], step: int) -> bool:
  return all(os.path.exists(evaluator_lib.result_path(workdir, t, step)) for t in tasks)


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def run(config, workdir: str, checkpoint: str = 'latest', watch: bool = False,
        poll_seconds: float = 30.0, timeout: float = 3600.0, devices=None) -> dict:
  """Evaluates what `checkpoint` names (see the module docstring); returns {step: results}."""
  if not config.eval.tasks:
    raise config_lib.ConfigError("config.eval.tasks is empty: name the tasks to evaluate, e.g. "
                                 "--config.eval.tasks=\"('fill_word',)\"")
  from t5lite.data import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  for name in config.eval.tasks:
    if config.eval.split not in tasks_lib.get_task(name).splits:
      raise config_lib.ConfigError(f'config.eval.split={config.eval.split!r}: task {name!r} has '
                                   f'only the splits {list(tasks_lib.get_task(name).splits)}')
  model, mesh, rules = build(config, devices)
  targets = None if watch else resolve_checkpoints(checkpoint, workdir)  # fail before compiling
  abstract = abstract_params(model, mesh, rules)
  evaluator = evaluator_lib.Evaluator(config, model, mesh, rules, workdir=workdir)
  tasks = list(config.eval.tasks)
  done: dict[int, dict] = {}

  def evaluate(step: int, path: str, skip_unreadable: bool = False) -> None:
    start = time.perf_counter()
    try:
      params, error = load_params(path, abstract), None
    except checkpoints.CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (e.g. deleted by retention meanwhile)
      if not skip_unreadable:
        raise
      params, error = None, f'{type(e).__name__}: {str(e)[:200]}'
    if not _everyone(error is None):  # all processes skip it, or none does
      _say(f'step {step}: cannot be read ({error or "on another process"}); skipping')
      return
    _say(f'evaluating step {step} ({path}; params read in {time.perf_counter() - start:.1f}s)')
    done[step] = evaluator.evaluate(params, step)

  try:
    if not watch:
      todo = [step for step, _ in targets
              if not (checkpoint == 'all' and is_evaluated(workdir, tasks, step))]
      for step in sorted({s for s, _ in targets} - set(todo)):
        where = evaluator_lib.result_path(workdir, tasks[0], step)
        _say(f'step {step}: already evaluated ({where} exists); skipping')
      paths = dict(targets)
      for step in _agree(todo):  # process 0's view of the file system decides
        evaluate(step, paths.get(step, os.path.join(workdir, 'checkpoints', str(step))))
      return done
    final, seen, last_new = config.train.steps, set(), time.monotonic()
    _say(f'watching {os.path.join(os.path.abspath(workdir), "checkpoints")} (every '
         f'{poll_seconds:g}s; stops after step {final} or {timeout:g}s without a new checkpoint)')
    while True:
      new = [s for s in complete_steps(workdir) if s not in seen]
      todo = _agree([s for s in new if not is_evaluated(workdir, tasks, s)])
      new = _agree(new)
      if new:
        seen.update(new)
        last_new = time.monotonic()
      for step in todo:
        evaluate(step, os.path.join(workdir, 'checkpoints', str(step)), skip_unreadable=True)
      if final in seen:
        _say(f'evaluated the final checkpoint (step {final}); done')
        return done
      if _agree([int(time.monotonic() - last_new > timeout)]) == [1]:
        _say(f'no new checkpoint for {timeout:g}s; stopping')
        return done
      time.sleep(poll_seconds)
  finally:
    evaluator.close()


FLAGS = {'checkpoint': str, 'watch': bool, 'poll_seconds': float, 'timeout': float}


def main(argv: Sequence[str]) -> int:
  def job():
    options, rest = split_flags(distributed.setup(argv), FLAGS)
    config, workdir = config_lib.parse_command_line(rest)
    if not workdir:
      raise config_lib.ConfigError('--workdir is required: the run whose checkpoints to '
                                   'evaluate; results go to WORKDIR/eval')
    run(config, workdir, **options)
  return cli.run_main(job, [(MissingCheckpointError, 'eval', 2)])

if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
