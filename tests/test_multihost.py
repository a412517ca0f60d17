"""Cross-process helpers (t5lite/multihost.py): single-process pass-through, lockstep's padding
with a stand-in all-gather, the real collectives over two processes (t5lite.launch.local), and
the eval loss a 2-process training run logs against one process's."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from t5lite import multihost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def other_process(has_data: list[bool], calls: list | None = None):
  """An all-gather with one more process whose answers are `has_data`, in order."""
  answers = iter(has_data)

  def gather(x):
    assert x.shape == (1,) and x.dtype == np.int32
    if calls is not None:
      calls.append(int(x[0]))
    return np.stack([x, np.array([next(answers)], np.int32)])

  return gather


def batches(n, rows=2):
  return [{'tokens': np.full((rows, 3), i + 1, np.int32), 'weights': np.ones((rows, 3))}
          for i in range(n)]


def test_single_process_passes_values_through():
  assert multihost.any_process(True) and not multihost.any_process(False)
  assert multihost.all_processes(True) and not multihost.all_processes(False)
  assert multihost.agree([3, 1, 2]) == [3, 1, 2]
  data = batches(3)
  assert list(multihost.lockstep(data)) == data  # the same objects, nothing added
  assert list(multihost.lockstep(iter(data), limit=2)) == data[:2]
  assert list(multihost.lockstep([])) == []


def test_any_and_all_with_another_process():
  assert multihost.any_process(False, other_process([True]))
  assert not multihost.any_process(False, other_process([False]))
  assert not multihost.all_processes(True, other_process([False]))
  assert multihost.all_processes(True, other_process([True]))


def test_lockstep_pads_until_no_process_has_data():
  """This process has 2 batches, the other 4: two real batches, two all-zero ones shaped like
  the last real one, then the pass ends for both on the same all-gather."""
  data, calls = batches(2), []
  got = list(multihost.lockstep(data, gather=other_process([True] * 4 + [False], calls)))
  assert calls == [1, 1, 0, 0, 0]  # this process's "I have a batch" at each agreement
  assert got[:2] == data and len(got) == 4
  for pad in got[2:]:
    assert sorted(pad) == ['tokens', 'weights']
    for k, v in pad.items():
      assert v.shape == data[1][k].shape and v.dtype == data[1][k].dtype and not v.any()


def test_lockstep_keeps_going_while_this_process_has_data():
  got = list(multihost.lockstep(batches(3), gather=other_process([False] * 4)))
  assert len(got) == 3  # the other process's padding is its own business


def test_lockstep_limit_reads_no_further_batch():
  read = []

  def source():
    for i, b in enumerate(batches(5)):
      read.append(i)
      yield b

  calls = []
  got = list(multihost.lockstep(source(), limit=2, gather=other_process([True] * 5, calls)))
  assert len(got) == 2 and read == [0, 1] and len(calls) == 2


def test_lockstep_padding_for_a_process_without_any_batch():
  padding = {'tokens': np.zeros((2, 3), np.int32)}
  got = list(multihost.lockstep([], padding=padding, gather=other_process([True, True, False])))
  assert got == [padding, padding]
  with pytest.raises(ValueError, match='pass `padding`'):
    list(multihost.lockstep([], gather=other_process([True])))


def test_preemption_watcher_sets_its_flag_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  watcher = multihost.PreemptionWatcher()
  try:
    assert not watcher.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.should_stop()
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGTERM) is before


TWO_PROCESSES = '''
import sys
from t5lite import distributed
distributed.setup(sys.argv[1:])
import jax, numpy as np
from t5lite import multihost
p = jax.process_index()
assert jax.process_count() == 2
data = [{'x': np.full((2,), 10 * p + i + 1, np.int32)} for i in range(1 + 2 * p)]
seen = [int(b['x'][0]) for b in multihost.lockstep(data)]
print(f'RESULT p={p} any={multihost.any_process(p == 1)} all={multihost.all_processes(p == 1)} '
      f'agree={multihost.agree([5, 6] if p == 0 else [7])} seen={seen}', flush=True)
'''


def test_two_real_processes(tmp_path):
  script = tmp_path / 'two.py'
  script.write_text(TWO_PROCESSES)
  env = {k: v for k, v in os.environ.items() if not k.startswith('T5LITE_')}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  result = subprocess.run([
      sys.executable, '-m', 't5lite.launch.local', '-n', '2', '--devices_per_process', '1', '--',
      sys.executable,
      str(script)
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  out = result.stdout + result.stderr
  assert result.returncode == 0, out[-3000:]
  # Process 0 has 1 batch, process 1 has 3: both take 3 steps; process 0's last two are zeros.
  assert '[p0] RESULT p=0 any=True all=False agree=[5, 6] seen=[1, 0, 0]' in out, out[-3000:]
  assert '[p1] RESULT p=1 any=True all=False agree=[5, 6] seen=[11, 12, 13]' in out, out[-3000:]


def _eval_run(workdir, launch_args):
  """Two steps of the quickstart (float32) with the held-out evaluation at step 2, on 4 CPU
  devices: one process (launch_args empty) or as `t5lite.launch.local` splits them. Returns the
  metrics.jsonl records by step."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('T5LITE_')}
  env.update(PYTHONPATH=REPO + os.pathsep + env.get('PYTHONPATH', ''), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  command = [
      sys.executable, '-m', 't5lite.train', '--config',
      os.path.join(REPO, 'configs', 'quickstart.py'), '--workdir',
      str(workdir), '--config.train.steps=2', '--config.eval.every_steps=2',
      '--config.checkpoint.every_steps=2', '--config.train.batch_size=8',
      '--config.eval.batch_size=8', '--config.train.log_every=1', '--config.model.dtype=float32',
      '--config.reporting.tensorboard=False', '--config.reporting.peak_flops_per_device=1e11'
  ]
  if launch_args:
    command = [sys.executable, '-m', 't5lite.launch.local', *launch_args, '--', *command]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f)}


def test_two_process_evaluation_equals_one_process(tmp_path):
  """The eval loss a 2-process run logs (each process reading its share of the held-out split,
  the last batches padded by lockstep) equals one process's over the same 4 devices: the same
  target tokens counted once each, the same loss and accuracy to float32 rounding (the
  cross-process reductions add in another order)."""
  one = _eval_run(tmp_path / 'one', [])
  two = _eval_run(tmp_path / 'two', ['-n', '2', '--devices_per_process', '2'])
  assert sorted(one) == sorted(two) == [1, 2]
  assert 'eval/loss' in one[2] and 'eval/loss' in two[2]
  assert two[2]['eval/target_tokens'] == one[2]['eval/target_tokens'] > 500
  np.testing.assert_allclose(two[2]['eval/loss'], one[2]['eval/loss'], rtol=1e-5)
  np.testing.assert_allclose(two[2]['eval/accuracy'], one[2]['eval/accuracy'], rtol=1e-5)
  for step in (1, 2):
    np.testing.assert_allclose(two[step]['loss'], one[step]['loss'], rtol=1e-5)
