"""Checkpoints: exact resume after kill -9, SIGTERM, restore on other meshes, corrupt fallback, NaN
stop, incompatible configs. docs/checkpoints.md maps each guarantee to its test here."""
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t5lite import checkpoints, optim, partitioning, train, trainer
from t5lite import config as config_lib
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model

from test_training import small_config, synthetic_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, 'configs', 'quickstart.py')
ENV = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')  # one device, as a newcomer's machine
# Small and fast: batch 8, no TensorBoard, a fixed peak so that no matmul is timed at start.
FAST = [
    '--config.train.batch_size=8', '--config.reporting.tensorboard=False',
    '--config.reporting.peak_flops_per_device=1e11', '--config.train.log_every=1'
]


def train_command(workdir, steps, every, *extra):
  return [
      sys.executable, '-m', 't5lite.train', '--config', QUICKSTART, '--workdir',
      str(workdir), f'--config.train.steps={steps}', f'--config.checkpoint.every_steps={every}',
      *FAST, *extra
  ]


def run_train(workdir, steps, every, *extra, timeout=240):
  result = subprocess.run(train_command(workdir, steps, every, *extra), capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=timeout)
  return result


def logged_losses(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r['step'] for r in records], {r['step']: r['loss'] for r in records}


def start_and_wait_for_step(workdir, steps, every, wait_for_step, also_wait_for=None):
  """Starts a training subprocess and returns it once it has logged `wait_for_step` (and, if
  given, once the checkpoint folder `also_wait_for` exists)."""
  stderr = open(os.path.join(str(workdir) + '.stderr'), 'w')
  proc = subprocess.Popen(train_command(workdir, steps, every), stdout=subprocess.PIPE,
                          stderr=stderr, text=True, cwd=REPO, env=ENV)
  deadline = time.time() + 240
  lines = []
  for line in proc.stdout:
    lines.append(line)
    match = re.search(r'(?:^|\s)step (\d+) \|', line)  # after the log line's timestamp
    if match and int(match.group(1)) >= wait_for_step and (also_wait_for is None
                                                           or os.path.isdir(also_wait_for)):
      return proc, lines
    if time.time() > deadline:
      break
  proc.kill()
  raise AssertionError(f'training never reached step {wait_for_step}: {"".join(lines)[-2000:]}')


def assert_trees_equal(a, b):
  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The reference: 12 steps without interruption, a checkpoint every 3 steps."""
  workdir = tmp_path_factory.mktemp('reference') / 'w'
  result = run_train(workdir, 12, 3)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_kill_9_and_resume_is_bitwise_identical(tmp_path, uninterrupted):
  """(a) kill -9 at a random step after the first checkpoint; the same command again finishes
  with the same parameters, bit for bit, and the same logged losses."""
  workdir = tmp_path / 'w'
  kill_at = random.Random().randint(4, 10)
  proc, _ = start_and_wait_for_step(workdir, 12, 3, kill_at,
                                    also_wait_for=workdir / 'checkpoints' / '3')
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  result = run_train(workdir, 12, 3)
  assert result.returncode == 0, result.stderr[-3000:]
  restart = int(re.search(r'resumed from the checkpoint of step (\d+)', result.stdout).group(1))
  assert 3 <= restart <= kill_at, (kill_at, restart)

  step_ref, params_ref = checkpoints.restore_as_numpy(str(uninterrupted))
  step_new, params_new = checkpoints.restore_as_numpy(str(workdir))
  assert step_ref == step_new == 12
  assert_trees_equal(params_new, params_ref)  # params, optimizer state and step
  steps, losses = logged_losses(workdir)
  _, reference = logged_losses(uninterrupted)
  assert steps == list(range(1, 13)), f'killed at {kill_at}, resumed at {restart}: {steps}'
  after = [s for s in range(restart + 1, 13)]
  assert [losses[s] for s in after] == [reference[s] for s in after], (kill_at, restart)


def test_sigterm_saves_at_a_step_boundary_and_exits_0(tmp_path, uninterrupted):
  """(b) SIGTERM: exit 0, a checkpoint at the step the message names; the same command resumes
  from it and ends where the uninterrupted run ends."""
  workdir = tmp_path / 'w'
  proc, lines = start_and_wait_for_step(workdir, 12, 100, 2)  # no periodic save before 12
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, open(str(workdir) + '.stderr').read()[-3000:]
  match = re.search(r'preempted \(SIGTERM\): saved the checkpoint of step (\d+) in (\S+);',
                    ''.join(lines) + out)
  assert match, ''.join(lines) + out
  stopped = int(match.group(1))
  assert match.group(2) == str(workdir / 'checkpoints')
  assert stopped < 12 and os.path.exists(
      workdir / 'checkpoints' / str(stopped) / checkpoints.COMMIT_MARKER)
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(stopped)]

  result = run_train(workdir, 12, 100)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resumed from the checkpoint of step {stopped} ' in result.stdout
  steps, losses = logged_losses(workdir)
  _, reference = logged_losses(uninterrupted)
  assert steps == list(range(1, 13)) and losses == reference
  assert_trees_equal(
      checkpoints.restore_as_numpy(str(workdir))[1],
      checkpoints.restore_as_numpy(str(uninterrupted))[1])


def _setup(config, devices):
  """(model, tx, schedule, mesh, example batch) for `config` on `devices`."""
  shape = config_lib.validate(config, len(devices))
  mesh = partitioning.make_mesh(shape, devices)
  model = make_model(ModelConfig.from_config(config.model))
  tx, schedule = optim.make_optimizer(config)
  return model, tx, schedule, mesh, next(synthetic_batches(1, config.train.batch_size))


def _trained_state(config, devices, steps=2):
  model, tx, schedule, mesh, example = _setup(config, devices)
  rules = config.partitioning.rules
  state, shardings = trainer.init_train_state(model, tx, mesh, rules, example, 0)
  step = trainer.jit_train_step(trainer.make_train_step(model, tx, schedule, config.train, False),
                                shardings, mesh, rules)
  for batch in synthetic_batches(steps, config.train.batch_size):
    state, _ = step(state,
                    partitioning.host_to_global(batch, partitioning.batch_sharding(mesh, rules)))
  return state


def _restore(workdir, config, devices):
  model, tx, _, mesh, example = _setup(config, devices)
  abstract, _ = trainer.abstract_train_state(model, tx, mesh, config.partitioning.rules, example, 0)
  ckpt = checkpoints.Checkpointer(str(workdir))
  try:
    return ckpt.restore_latest(abstract, json.loads(json.dumps(config.to_dict(), default=str)))
  finally:
    ckpt.close()


def _save(workdir, state, step, config):
  ckpt = checkpoints.Checkpointer(str(workdir))
  ckpt.save(step, state, {'next_index': step}, json.loads(json.dumps(config.to_dict(),
                                                                     default=str)))
  ckpt.close()


def test_restore_onto_other_meshes_and_device_counts(tmp_path, monkeypatch):
  """(c) Saved on 8 devices as (2,2,2), restored on 4 devices as (4,1,1) and on 1 device: the
  same values, in the new mesh's layout; no pickle is read."""
  config = small_config()
  config.optimizer.name = 'adafactor'  # factored statistics: leaves shaped unlike their params
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  state = _trained_state(config, jax.devices())
  saved = jax.device_get(state)
  _save(tmp_path, state, 2, config)

  def no_pickle(*args, **kwargs):
    raise AssertionError('a checkpoint read used pickle')

  for name in ('load', 'loads', 'Unpickler'):
    monkeypatch.setattr(pickle, name, no_pickle)
  for devices, mesh in ((jax.devices()[:4], (4, 1, 1)), (jax.devices()[:1], (1, 1, 1))):
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    restored = _restore(tmp_path, config, devices)
    assert restored.step == 2 and restored.data_state == {'next_index': 2}
    assert_trees_equal(jax.device_get(restored.state), saved)
    for leaf in jax.tree.leaves(restored.state):
      assert leaf.sharding.mesh.devices.shape == mesh
      assert set(leaf.sharding.device_set) <= set(devices)


def _corrupt(step_dir):
  """Truncates the largest array file of a checkpoint's state."""
  files = [
      os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
      for f in names
  ]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
  """(d) The newest step without its commit marker and the next one truncated: both reported,
  the run resumes from the one before; when none can be read it refuses to start from scratch."""
  config = small_config()
  state = _trained_state(config, jax.devices()[:1], steps=1)
  for step in (2, 4, 6):
    _save(tmp_path, state, step, config)
  os.remove(tmp_path / 'checkpoints' / '6' / checkpoints.COMMIT_MARKER)
  _corrupt(tmp_path / 'checkpoints' / '4')
  os.makedirs(tmp_path / 'checkpoints' / '8.orbax-checkpoint-tmp-1234')  # an interrupted save
  capsys.readouterr()
  restored = _restore(tmp_path, config, jax.devices()[:1])
  out = capsys.readouterr().out
  assert restored.step == 2, out
  assert_trees_equal(jax.device_get(restored.state), jax.device_get(state))
  assert 'ignoring 8.orbax-checkpoint-tmp-1234' in out
  assert 'skipping step 6' in out and 'commit_success.txt' in out
  assert 'step 4 cannot be read' in out and 'resuming from step 2' in out
  # The unreadable steps are set aside so that the resumed run can write steps 4 and 6 again.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '8.orbax-checkpoint-tmp-1234']
  assert sorted(n.split('-')[0] for n in os.listdir(tmp_path / 'checkpoints_rejected')) == \
      ['4', '6']

  _corrupt(tmp_path / 'checkpoints' / '2')
  with pytest.raises(checkpoints.CheckpointError, match=r'none can be read(.|\n)*step 2'):
    _restore(tmp_path, config, jax.devices()[:1])


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  """(e) A learning rate of 1e30 after a zero-lr first step: the run stops naming the step, exit
  1, and every checkpoint left is from before that step, finite and loadable."""
  workdir = tmp_path / 'w'
  result = run_train(workdir, 8, 1, '--config.optimizer.learning_rate=1e30',
                     '--config.schedule.name=constant', '--config.schedule.warmup_steps=4')
  assert result.returncode == 1, result.stderr[-3000:]
  match = re.search(r'training stopped: .*?(?:is (?:nan|inf)|non-finite).*? step (\d+)',
                    result.stderr)
  assert match, result.stderr[-3000:]
  bad_step = int(match.group(1))
  assert 'Traceback' not in result.stderr
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints'))
  assert steps and max(steps) < bad_step, (steps, bad_step)
  assert f'the last good checkpoint is step {max(steps)}' in result.stderr
  step, state = checkpoints.restore_as_numpy(str(workdir))
  assert step == max(steps)
  assert all(
      np.all(np.isfinite(x)) for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating))


def test_incompatible_model_config_names_the_parameters(tmp_path):
  """(f) A checkpoint of d_model=64 read with d_model=32: an error naming the arrays whose shapes
  differ and the config field, not a fallback or a fresh start."""
  config = small_config()
  _save(tmp_path, _trained_state(config, jax.devices()[:1], steps=1), 1, config)
  config.model.update(d_model=32)
  with pytest.raises(checkpoints.CheckpointError) as info:
    _restore(tmp_path, config, jax.devices()[:1])
  msg = str(info.value)
  assert 'does not fit this model config' in msg
  assert re.search(r'params/\S+/kernel: checkpoint \([\d, ]+\) vs config \([\d, ]+\)', msg), msg
  assert '... and' in msg  # more than five arrays differ; the first five are listed
  assert 'd_model=64 (now 32)' in msg


def test_checkpoint_config_is_validated():
  config = config_lib.base_config()
  config.checkpoint.every_steps = -1
  with pytest.raises(config_lib.ConfigError, match=r'config\.checkpoint\.every_steps=-1'):
    config_lib.validate(config, 1)
  config = config_lib.base_config()
  config.checkpoint.keep = -2
  with pytest.raises(config_lib.ConfigError, match=r'config\.checkpoint\.keep=-2'):
    config_lib.validate(config, 1)


def _fake_checkpoints(directory, complete=(), incomplete=(), interrupted=()):
  """Step folders as orbax leaves them: with the commit marker, without, and tmp folders."""
  for step in (*complete, *incomplete):
    os.makedirs(directory / str(step) / 'state')
  for step in complete:
    (directory / str(step) / checkpoints.COMMIT_MARKER).write_text('')
  for name in interrupted:
    os.makedirs(directory / name)


def test_complete_steps_is_the_one_commit_marker_scan(tmp_path):
  directory = tmp_path / 'checkpoints'
  assert checkpoints.complete_steps(str(directory)) == []  # no folder yet
  _fake_checkpoints(directory, complete=(10, 2, 30), incomplete=(40,),
                    interrupted=('50.orbax-checkpoint-tmp-1',))
  (directory / '60').write_text('')  # a stray file, not a step
  assert checkpoints.complete_steps(str(directory)) == [2, 10, 30]
  # init_from takes the newest complete step of a checkpoints folder or of the workdir above it.
  for path in (directory, tmp_path):
    assert checkpoints.resolve_init_path(str(path)) == str(directory / '30')


def test_resolve_steps_names_what_eval_and_infer_read(tmp_path):
  where = tmp_path / 'checkpoints'
  _fake_checkpoints(where, complete=(2, 4, 6), incomplete=(8,))
  workdir = str(tmp_path)
  assert checkpoints.resolve_steps('latest', workdir) == [(6, str(where / '6'))]
  assert checkpoints.resolve_steps('all', workdir) == [(s, str(where / str(s))) for s in (2, 4, 6)]
  assert checkpoints.resolve_steps('4', workdir) == [(4, str(where / '4'))]
  assert checkpoints.resolve_steps(str(where / '2'), None) == [(2, str(where / '2'))]
  assert checkpoints.resolve_steps(workdir, None) == [(6, str(where / '6'))]
  missing = [('8', workdir, r'no complete checkpoint of step 8 in .* \(complete steps: 2, 4, 6\)'),
             ('latest', None, '--checkpoint latest needs --workdir'),
             ('latest', str(tmp_path / 'empty'), 'no complete checkpoint in '),
             (str(where / '8'), None, '--checkpoint .*8: it has no commit_success.txt'),
             (str(tmp_path / 'nowhere'), None, '--checkpoint .*nowhere: no complete t5lite')]
  for spec, run_dir, message in missing:
    with pytest.raises(checkpoints.MissingCheckpointError, match=message):
      checkpoints.resolve_steps(spec, run_dir)
  # A missing checkpoint (exit code 2) is not an unreadable one (exit code 1).
  assert not issubclass(checkpoints.MissingCheckpointError, checkpoints.CheckpointError)
