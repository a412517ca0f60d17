"""Continual pretraining: schedule.step_offset / rewarm_steps / decay_start_step against hand
values; checkpoint.init_from_state: a WSD cool-down branched ('full') from a stable-phase
checkpoint equals, step for step and bit for bit, the same schedule run in one go (and resumes
bitwise); params_and_optimizer carries the optimizer statistics and their counts with the step and
the schedule at 0 (step_offset continues the schedule); a mismatched optimizer is a clear error."""
import importlib.util
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from t5lite import checkpoints, optim, train
from t5lite.checkpoints import CheckpointError
from t5lite.config import ConfigError, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('quickstart',
                                               os.path.join(REPO, 'configs', 'quickstart.py'))
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)


def schedule_cfg(**fields):
  base = dict(name='wsd', warmup_steps=0, decay_fraction=0.1, end_ratio=0.0, decay_start_step=0,
              step_offset=0, rewarm_steps=0)
  return ml_collections.ConfigDict({**base, **fields})


def values(schedule, steps):
  return [float(schedule(s)) for s in steps]


def test_wsd_with_an_absolute_cool_down_start():
  # warm-up 0 -> 1 over 2 steps, stable until 6, linear to 0.1 at the end (10)
  s = optim.make_schedule(schedule_cfg(warmup_steps=2, decay_start_step=6, end_ratio=0.1), 1.0, 10)
  assert values(s, [0, 1, 2, 5, 6, 8, 10, 12]) == pytest.approx([0, 0.5, 1, 1, 1, 0.55, 0.1, 0.1])
  # a longer run (extended) keeps the stable phase; a run ending before the start is all stable
  longer = optim.make_schedule(schedule_cfg(warmup_steps=2, decay_start_step=6), 1.0, 20)
  assert values(longer, range(7)) == values(s, range(7))
  stable = optim.make_schedule(schedule_cfg(warmup_steps=2, decay_start_step=100), 1.0, 10)
  assert values(stable, [2, 9, 10]) == [1, 1, 1]


def test_step_offset_continues_and_rewarm_ramps():
  one_go = optim.make_schedule(schedule_cfg(name='cosine', warmup_steps=3), 2.0, 20)
  continued = optim.make_schedule(schedule_cfg(name='cosine', warmup_steps=3, step_offset=8), 2.0,
                                  12)
  assert values(continued, range(13)) == values(one_go, range(8, 21))
  # re-warm from the branch point: 0 at the run's step 0, the schedule's value from step 4 on
  rewarm = optim.make_schedule(
      schedule_cfg(name='constant', warmup_steps=10, step_offset=100, rewarm_steps=4), 1.0, 50)
  assert values(rewarm, [0, 1, 2, 4, 30]) == pytest.approx([0, 0.25, 0.5, 1, 1])
  c = tiny_config(1, decay_start=0)
  c.schedule.rewarm_steps = -1
  with pytest.raises(ConfigError, match='schedule.rewarm_steps'):
    validate(c, 8)


def tiny_config(steps, decay_start, **checkpoint):
  c = quickstart.get_config()
  c.model.dtype = 'float32'
  c.data.inputs_length = 32
  c.train.update(steps=steps, batch_size=8, log_every=1)
  c.schedule.update(name='wsd', warmup_steps=2, decay_start_step=decay_start, end_ratio=0.1)
  c.reporting.update(tensorboard=False, peak_flops_per_device=1e11)
  c.checkpoint.update(every_steps=2, keep=0, async_save=False, **checkpoint)
  c.eval.every_steps = 0
  return c


def logged(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: (r['loss'], r['learning_rate']) for r in rows}


N, END = 2, 5  # the branch point and the end of the cool-down


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """stable: a WSD run whose cool-down is far away (steps 1-4, saved at 2 and 4); one_go: the
  cool-down from step N to END in one run."""
  stable, one_go = (str(tmp_path_factory.mktemp(n)) for n in ('stable', 'one_go'))
  train.run(tiny_config(4, decay_start=1000), stable)
  train.run(tiny_config(END, decay_start=N), one_go)
  return stable, one_go


def test_cool_down_branched_from_a_stable_checkpoint_equals_one_go(runs, tmp_path):
  stable, one_go = runs
  branch = str(tmp_path / 'branch')
  config = tiny_config(END, decay_start=N, init_from=os.path.join(stable, 'checkpoints', str(N)),
                       init_from_state='full')
  train.run(config, branch)
  a, b, s = logged(one_go), logged(branch), logged(stable)
  assert [s[i] for i in range(1, N + 1)] == [a[i] for i in range(1, N + 1)]  # same stable phase
  assert sorted(b) == list(range(N + 1, END + 1))  # the branch continues at N + 1
  assert [b[i] for i in b] == [a[i] for i in b]  # losses and learning rates, bit for bit
  # it cooled down: step k logs lr(k - 1); from 0.03 at N to 0.003 at END, linearly
  assert b[N + 1][1] == pytest.approx(0.03)
  assert b[END][1] == pytest.approx(0.03 - 0.027 * (END - 1 - N) / (END - N))
  end_a, end_b = (checkpoints.restore_as_numpy(w)[1] for w in (one_go, branch))
  jax.tree.map(np.testing.assert_array_equal, end_a, end_b)
  # the branch, interrupted after its save of step 4, resumes bitwise (init_from is not read)
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(branch, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', str(END)))
  train.run(config, resumed)
  jax.tree.map(np.testing.assert_array_equal, checkpoints.restore_as_numpy(resumed)[1], end_b)


def _named(tree):
  return {optim.param_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_params_and_optimizer_carries_the_statistics_and_restarts_step_and_schedule(runs, tmp_path):
  stable, one_go = runs
  source = os.path.join(stable, 'checkpoints', str(N))
  run = str(tmp_path / 'run')
  # step_offset=N: the cool-down schedule of one_go, continued from the branch point
  config = tiny_config(END - N, decay_start=N, init_from=source,
                       init_from_state='params_and_optimizer')
  config.schedule.step_offset = N
  config.checkpoint.every_steps = 1
  train.run(config, run)
  lrs = {step: lr for step, (_, lr) in logged(run).items()}
  assert lrs == {step - N: lr for step, (_, lr) in logged(one_go).items() if step > N}
  _, saved = checkpoints.restore_as_numpy(stable, N)
  _, first = checkpoints.restore_as_numpy(run, 1)
  assert int(first['step']) == 1
  before, after = _named(saved['opt_state']), _named(first['opt_state'])
  assert sorted(before) == sorted(after)
  counts = {n: (int(before[n]), int(after[n])) for n in before if np.ndim(before[n]) == 0}
  # Adafactor's own count goes on (N + 1); the schedule's restarts with the run's step (1)
  assert sorted(counts.values()) == [(N, 1), (N, N + 1)], counts
  stats = [n for n in before if '/v_row/' in n]
  assert stats and all(not np.array_equal(before[n], 0) for n in stats)  # carried, not fresh


def test_a_mismatched_optimizer_or_source_is_a_clear_error(runs, tmp_path):
  stable, _ = runs
  source = os.path.join(stable, 'checkpoints', str(N))
  config = tiny_config(1, decay_start=N, init_from=source, init_from_state='params_and_optimizer')
  config.optimizer.name = 'adamw'
  with pytest.raises(
      CheckpointError, match=r'train state does not fit this run:[\s\S]*'
      r"opt_state.*[\s\S]*optimizer.name.*init_from_state='params'"):
    train.run(config, str(tmp_path / 'a'))
  config = tiny_config(1, decay_start=N, init_from=source, init_from_state='full',
                       init_ignore=('^decoder/',))
  with pytest.raises(CheckpointError, match='init_rename, init_ignore and init_new_rows'):
    train.run(config, str(tmp_path / 'b'))


@pytest.mark.parametrize('field', ['rewarm_steps', 'step_offset'])
def test_a_full_branch_refuses_a_schedule_that_would_not_do_what_it_says(field):
  # A full branch runs on at the source's step: a re-warm from 0 would be over and an offset
  # would count the steps twice, so both are refused before any compute, naming the way that works.
  config = tiny_config(8, decay_start=4, init_from='/some/run/checkpoints/2',
                       init_from_state='full')
  config.schedule[field] = 3
  with pytest.raises(
      ConfigError, match=rf'schedule.{field}=3 with checkpoint.init_from_state=full'
      r'[\s\S]*init_from_state=params_and_optimizer'):
    validate(config, num_devices=1)
  config.checkpoint.init_from_state = 'params_and_optimizer'
  validate(config, num_devices=1)
