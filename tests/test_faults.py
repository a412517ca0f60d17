"""Faults end to end: each one of docs/reliability.md, on the real training command.

Every test runs `python -m t5lite.train` on the quickstart config shortened to a few steps (as the
fault reports did) and asserts the exit status, the one-line message, what is left on disk, and
that the run continues bitwise where it should. The units behind them have their own tests
(test_checkpoint_faults, test_train_health, test_workdir, test_launch_local, test_data_faults,
test_bad_inputs).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t5lite import checkpoints

from test_checkpoints import (ENV, REPO, assert_trees_equal, logged_losses, run_train,
                              start_and_wait_for_step, train_command, uninterrupted)  # pylint: disable=unused-import
from test_checkpoint_faults import Immutable, rejected

STATE_DATA = os.path.join('state', 'ocdbt.process_0', 'd')


def one_line_error(stderr: str, prefix: str) -> str:
  """The single error line the job printed (no traceback), starting with `prefix`."""
  assert 'Traceback' not in stderr, stderr[-4000:]
  lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
  assert len(lines) == 1, stderr[-4000:]
  return lines[0]


def steps_on_disk(workdir) -> list[int]:
  return checkpoints.complete_steps(os.path.join(workdir, 'checkpoints'))


def trained(uninterrupted, workdir, steps: list[int]):
  """`workdir` as a run of the tests' command that stopped after its checkpoint of max(steps),
  holding the checkpoints `steps`: a copy of the shared 12-step reference run (checkpoints every
  3 steps, the newest 3 kept: 6, 9, 12) with the others removed, instead of training again."""
  shutil.copytree(uninterrupted, workdir)
  for step in steps_on_disk(workdir):
    if step not in steps:
      shutil.rmtree(workdir / 'checkpoints' / str(step))
  assert steps_on_disk(workdir) == steps
  return workdir


# ---------------------------------------------------------------------------------------------
# 1. A failed save: one line naming step, path and cause; exit 1 promptly; older steps intact.


@pytest.mark.parametrize('async_save', [True, False])
def test_a_failed_save_stops_the_run_with_one_line(tmp_path, uninterrupted, async_save):
  workdir = trained(uninterrupted, tmp_path / 'w', [6])  # a complete step 6 to keep intact
  saved = checkpoints.restore_as_numpy(str(workdir))
  with Immutable(workdir / 'checkpoints'):
    start = time.time()
    result = run_train(workdir, 12, 3, f'--config.checkpoint.async_save={async_save}', timeout=300)
    took = time.time() - start
  assert result.returncode == 1, result.stderr[-3000:]
  line = one_line_error(result.stderr, 'checkpoint error:')
  assert 'step 9' in line and str(workdir / 'checkpoints') in line, line
  assert 'Permission' in line or 'Operation not permitted' in line or 'Errno' in line, line
  assert took < 240, took  # no hang joining orbax's threads at exit
  assert steps_on_disk(workdir) == [6]
  step, state = checkpoints.restore_as_numpy(str(workdir))
  assert step == 6
  assert_trees_equal(state, saved[1])


# ---------------------------------------------------------------------------------------------
# 2. Corrupt array data is rejected by its checksum; the run resumes bitwise from an older step.


def _largest_data_file(step_dir) -> str:
  folder = os.path.join(step_dir, STATE_DATA)
  files = [os.path.join(folder, n) for n in os.listdir(folder)]
  return max(files, key=os.path.getsize)


def _flip(path: str, n_bytes: int) -> None:
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    if n_bytes == 0:  # one bit
      data[middle] ^= 0x10
    else:
      for i in range(middle, middle + n_bytes):
        data[i] ^= 0xFF
    f.seek(0)
    f.write(bytes(data))


def test_flipped_bits_are_rejected_and_the_run_resumes_bitwise(tmp_path, uninterrupted):
  workdir = trained(uninterrupted, tmp_path / 'w', [6, 9, 12])
  _flip(_largest_data_file(workdir / 'checkpoints' / '12'), 0)  # one bit
  _flip(_largest_data_file(workdir / 'checkpoints' / '9'), 16)  # 16 bytes (restored NaNs before)
  result = run_train(workdir, 12, 3)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout + result.stderr
  assert 'resumed from the checkpoint of step 6 ' in out, out[-3000:]
  for step in (12, 9):
    assert re.search(rf'step {step}\b.*checksum', out), out[-3000:]
  assert 'Traceback' not in out
  assert sorted(int(name.split('-')[0]) for name in rejected(workdir)) == [9, 12]
  step, state = checkpoints.restore_as_numpy(str(workdir))
  assert step == 12
  assert_trees_equal(state, checkpoints.restore_as_numpy(str(uninterrupted))[1])
  steps, losses = logged_losses(workdir)
  _, reference = logged_losses(uninterrupted)
  assert steps == list(range(1, 13)) and losses == reference


def test_a_truncated_checkpoint_falls_back_quietly(tmp_path, uninterrupted):
  workdir = trained(uninterrupted, tmp_path / 'w', [6, 9])
  path = _largest_data_file(workdir / 'checkpoints' / '9')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  result = run_train(workdir, 10, 3)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout + result.stderr
  assert 'resumed from the checkpoint of step 6 ' in out
  assert 'Traceback' not in out
  # One line per rejected step, not thousands of asyncio tracebacks.
  assert len(out.splitlines()) < 60, len(out.splitlines())


# ---------------------------------------------------------------------------------------------
# 3. Divergence: the named checkpoint is really good; a dead run stops; accuracy is honest.


def test_divergence_names_a_checkpoint_that_really_trains(tmp_path, uninterrupted):
  workdir = trained(uninterrupted, tmp_path / 'w', [6])
  result = run_train(workdir, 14, 1, '--config.optimizer.learning_rate=1e30')
  assert result.returncode == 1, result.stderr[-3000:]
  line = one_line_error(result.stderr, 'training stopped:')
  bad = int(re.search(r'non-finite at step (\d+)', line).group(1))
  good = int(re.search(r'the last good checkpoint is step (\d+)', line).group(1))
  assert good <= bad - 2, line  # the checkpoint of step bad-1 produced the bad loss
  assert max(steps_on_disk(workdir)) == good
  assert all(int(name.split('-')[0]) >= bad - 1 for name in rejected(workdir))
  # The named checkpoint is finite and trains on at the normal rate.
  _, state = checkpoints.restore_as_numpy(str(workdir))
  assert all(
      np.all(np.isfinite(x)) for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating))
  again = run_train(workdir, good + 3, 1)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'resumed from the checkpoint of step {good} ' in again.stdout


def test_a_dead_run_stops_and_scores_no_accuracy(tmp_path):
  workdir = tmp_path / 'w'
  result = run_train(workdir, 60, 10, '--config.optimizer.learning_rate=1e6',
                     '--config.train.max_dead_steps=8')
  assert result.returncode == 1, result.stderr[-3000:]
  line = one_line_error(result.stderr, 'training stopped:')
  assert 'dead run' in line and 'max_dead_steps' in line, line
  records = [json.loads(x) for x in open(workdir / 'metrics.jsonl')]
  dead = [r for r in records if r['grad_norm'] == 0]
  assert len(dead) >= 7  # the step that trips the guard stops the run before it is logged
  assert all(r['accuracy'] < 0.5 for r in dead), dead  # a model whose logits all tie is not right
  assert records[-1]['step'] < 60


# ---------------------------------------------------------------------------------------------
# 5. One workdir, one trainer; a dead trainer's lock is taken over.


def test_a_second_trainer_on_the_same_workdir_refuses(tmp_path):
  workdir = tmp_path / 'w'
  proc, _ = start_and_wait_for_step(workdir, 14, 100, 2)
  try:
    second = run_train(workdir, 14, 100)
  finally:
    out, _ = proc.communicate(timeout=300)
  assert second.returncode == 1, second.stderr[-3000:]
  line = one_line_error(second.stderr, 'workdir busy:')
  assert str(proc.pid) in line, line
  assert proc.returncode == 0
  steps, _ = logged_losses(workdir)
  assert steps == list(range(1, 15))


def test_a_killed_trainers_lock_is_taken_over(tmp_path):
  workdir = tmp_path / 'w'
  proc, _ = start_and_wait_for_step(workdir, 14, 3, 4, also_wait_for=workdir / 'checkpoints' / '3')
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  result = run_train(workdir, 6, 3)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout + result.stderr
  assert str(proc.pid) in out and 'lock' in out, out[-3000:]


# ---------------------------------------------------------------------------------------------
# 6. A changed data pipeline at resume: refused, saying what changed; reset on purpose.


def test_a_changed_mixture_is_refused_then_reset_on_purpose(tmp_path, uninterrupted):
  workdir = trained(uninterrupted, tmp_path / 'w', [6])
  mixture = '--config.data.task=embedded_pretraining_mix'
  refused = run_train(workdir, 8, 3, mixture)
  assert refused.returncode == 2, refused.stderr[-3000:]
  line = one_line_error(refused.stderr, 'data error:')
  assert 'embedded_pretraining_mix' in line and 'data.reset_position' in line, line
  assert steps_on_disk(workdir) == [6]
  reset = run_train(workdir, 8, 3, mixture, '--config.data.reset_position=True')
  assert reset.returncode == 0, reset.stderr[-3000:]
  assert 'reset_position' in reset.stdout and steps_on_disk(workdir)[-1] == 8


# ---------------------------------------------------------------------------------------------
# 7/8. SIGTERM at any time after the start exits 0 with a message.


def test_sigterm_during_start_up_exits_0_with_a_message(tmp_path):
  workdir = tmp_path / 'w'
  proc = subprocess.Popen(train_command(workdir, 6, 3), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
  time.sleep(4)  # importing JAX or building the model: before the training loop
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert 'SIGTERM' in out + err and 'Traceback' not in err, (out + err)[-3000:]
  assert steps_on_disk(workdir) == [] or 'saved' in out + err
