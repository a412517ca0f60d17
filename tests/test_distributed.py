"""Multi-process start-up (t5lite/distributed.py) and the local launcher.

The real multi-process checks start `python -m t5lite.launch.local` as a subprocess: 2 processes x
4 CPU devices over loopback, the same path a TPU pod or a SLURM job takes through
`jax.distributed.initialize`.
"""
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from t5lite import distributed
from t5lite.distributed import DistributedError
from t5lite.launch import local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- flags and environment -------------------------------------------------------------------


def test_pop_flags_takes_both_forms_and_leaves_the_rest():
  argv = [
      '--config', 'c.py', '--coordinator_address=10.0.0.1:1234', '--num_processes', '4',
      '--config.train.steps=3', '--process_id=2', '--local_device_count', '2', '--workdir=w'
  ]
  rest, flags = distributed.pop_distributed_flags(argv)
  assert rest == ['--config', 'c.py', '--config.train.steps=3', '--workdir=w']
  assert flags == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': '4', 'process_id': '2',
      'local_device_count': '2'
  }
  settings = distributed.resolve(flags, environ={})
  assert (settings.coordinator_address, settings.num_processes, settings.process_id,
          settings.local_device_count) == ('10.0.0.1:1234', 4, 2, 2)
  assert settings.explicit and settings.cluster is None


def test_pop_flags_missing_value():
  with pytest.raises(DistributedError, match='--process_id needs a value'):
    distributed.pop_distributed_flags(['--process_id', '--workdir=w'])


def test_environment_and_flag_precedence():
  env = {
      'T5LITE_COORDINATOR_ADDRESS': '127.0.0.1:5000', 'T5LITE_NUM_PROCESSES': '2',
      'T5LITE_PROCESS_ID': '1', 'T5LITE_LOCAL_DEVICE_COUNT': '4'
  }
  s = distributed.resolve({}, env)
  assert (s.coordinator_address, s.num_processes, s.process_id,
          s.local_device_count) == ('127.0.0.1:5000', 2, 1, 4)
  s = distributed.resolve({'process_id': '0'}, env)  # a flag overrides its variable
  assert s.process_id == 0


@pytest.mark.parametrize('flags, message', [
    ({'num_processes': '2'}, r'--num_processes \(or T5LITE_NUM_PROCESSES\) given without '
     r'--coordinator_address .*--process_id'),
    ({'coordinator_address': 'h:1', 'process_id': '0'}, 'given without --num_processes'),
    ({'coordinator_address': 'h:1', 'num_processes': '2', 'process_id': '2'
     }, '--process_id .*=2 must be below --num_processes=2'),
    ({'coordinator_address': 'h:1', 'num_processes': 'two', 'process_id': '0'
     }, '--num_processes .*must be an integer'),
    ({'coordinator_address': 'h:1', 'num_processes': '0', 'process_id': '0'
     }, '--num_processes .*must be >= 1'),
    ({'coordinator_address': 'localhost', 'num_processes': '2', 'process_id': '0'
     }, '--coordinator_address .*must be HOST:PORT'),
    ({'local_device_count': '0'}, '--local_device_count .*must be >= 1'),
])
def test_bad_settings_name_the_flag(flags, message):
  with pytest.raises(DistributedError, match=message):
    distributed.resolve(flags, environ={})


def test_half_set_environment_names_the_variable():
  with pytest.raises(DistributedError, match='T5LITE_PROCESS_ID'):
    distributed.resolve({}, {'T5LITE_COORDINATOR_ADDRESS': 'h:1', 'T5LITE_NUM_PROCESSES': '2'})


def test_distributed_error_is_a_config_error():
  from t5lite.config import ConfigError
  assert issubclass(DistributedError, ConfigError)  # so train.main reports it with exit code 2


SLURM = {
    'SLURM_JOB_ID': '77', 'SLURM_STEP_NODELIST': 'node[001-002]', 'SLURM_NTASKS': '16',
    'SLURM_PROCID': '3', 'SLURM_LOCALID': '3'
}


@pytest.mark.parametrize(
    'environ, expected',
    [
        ({}, None),
        (SLURM, 'slurm'),
        ({**SLURM, 'SLURM_NTASKS': '1'}, None),  # a one-task job is single-process
        ({**SLURM, 'SLURM_STEP_NUM_TASKS': '1'}, None),  # srun -n1 inside a bigger allocation
        ({k: v for k, v in SLURM.items() if k != 'SLURM_STEP_NODELIST'}, None),  # not a job step
        ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'tpu'),
        ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),  # a single-host TPU VM
        ({'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.2'}, 'tpu'),
    ])
def test_detect_cluster(environ, expected):
  assert distributed.detect_cluster(environ) == expected
  assert distributed.resolve({}, environ).cluster == expected


def test_mode_variable():
  assert distributed.resolve({}, {'T5LITE_DISTRIBUTED': 'auto'}).cluster == 'auto'
  assert distributed.resolve({}, {**SLURM, 'T5LITE_DISTRIBUTED': 'off'}).cluster is None
  with pytest.raises(DistributedError, match='T5LITE_DISTRIBUTED must be'):
    distributed.resolve({}, {'T5LITE_DISTRIBUTED': 'yes'})


def test_single_process_needs_no_initialize():
  assert distributed.maybe_initialize({}, environ={}) is False
  assert distributed.maybe_initialize(
      {'coordinator_address': 'h:1', 'num_processes': '1', 'process_id': '0'}, environ={}) is False


def test_local_device_count_after_jax_started_is_an_error():
  import jax
  jax.devices()  # starts the backend, as any JAX call before maybe_initialize would
  with pytest.raises(DistributedError, match='--local_device_count .* before any JAX call'):
    distributed.maybe_initialize({'local_device_count': '3'}, environ={})


# ---- the local launcher ----------------------------------------------------------------------


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  for var in list(env):
    if var.startswith('T5LITE_'):
      del env[var]
  return env


def _launch(args, **kwargs):
  return subprocess.Popen([sys.executable, '-m', 't5lite.launch.local', *args], cwd=REPO,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kwargs)


def test_launcher_arguments():
  args = local.parse_args(['-n', '2', '--devices_per_process', '4', '--', 'python', '-c', 'pass'])
  assert (args.num_processes, args.devices_per_process, args.command) == (2, 4,
                                                                          ['python', '-c', 'pass'])
  with pytest.raises(SystemExit):
    local.parse_args(['-n', '2', 'python'])  # no --
  env = local.child_env({'JAX_PLATFORMS': 'cuda'}, 1, 2, 4321, 4)
  assert env['T5LITE_COORDINATOR_ADDRESS'] == '127.0.0.1:4321'
  assert (env['T5LITE_NUM_PROCESSES'], env['T5LITE_PROCESS_ID'],
          env['T5LITE_LOCAL_DEVICE_COUNT']) == ('2', '1', '4')
  assert env['JAX_PLATFORMS'] == 'cuda'  # the caller's choice wins over the cpu default
  assert local.exit_code(-signal.SIGTERM) == 143 and local.exit_code(3) == 3


PSUM_SCRIPT = '''
import sys
from t5lite import distributed
rest = distributed.setup(sys.argv[1:])  # before any other JAX call
assert rest == ['--extra'], rest
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4, (
    jax.process_count(), jax.devices())
mesh = Mesh(np.asarray(jax.devices()), ('data',))
# Global [8, 3] array: row r holds r + 1; process p passes rows 4p .. 4p + 3.
p = jax.process_index()
local = np.repeat(np.arange(4 * p + 1, 4 * p + 5, dtype=np.float32)[:, None], 3, axis=1)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
assert x.shape == (8, 3)
replicated = NamedSharding(mesh, P())
total = jax.jit(jnp.sum, out_shardings=replicated)(x)
# The same through an explicit collective: each device sums its row, psum over all 8 devices.
psum = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b.sum(), 'data'), mesh=mesh,
                             in_specs=P('data'), out_specs=P()))(x)
print(f'RESULT process={p} count={jax.process_count()} devices={jax.device_count()} '
      f'sum={float(total):g} psum={float(psum):g}', flush=True)
'''


def test_two_processes_four_devices_each(tmp_path):
  script = tmp_path / 'psum.py'
  script.write_text(PSUM_SCRIPT)
  start = time.perf_counter()
  proc = _launch(
      ['-n', '2', '--devices_per_process', '4', '--', sys.executable,
       str(script), '--extra'])
  out, _ = proc.communicate(timeout=90)
  assert proc.returncode == 0, out
  # 3 columns x (1 + 2 + ... + 8) = 108, in every process.
  for p in (0, 1):
    assert f'[p{p}] RESULT process={p} count=2 devices=8 sum=108 psum=108' in out.splitlines(), out
  print(f'2 x 4-device run took {time.perf_counter() - start:.1f}s')


def test_failing_process_stops_the_others(tmp_path):
  script = tmp_path / 'fail.py'
  script.write_text(
      textwrap.dedent('''
      import os, sys, time
      if os.environ['T5LITE_PROCESS_ID'] == '1':
        print('failing', flush=True)
        sys.exit(3)
      time.sleep(60)
  '''))
  start = time.perf_counter()
  proc = _launch(['-n', '2', '--grace_s', '5', '--', sys.executable, str(script)])
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 3, out
  assert '[p1] failing' in out and 'process 1 exited with 3' in out
  assert time.perf_counter() - start < 20  # process 0 was stopped, not waited for


def test_sigterm_reaches_every_process(tmp_path):
  script = tmp_path / 'trap.py'
  script.write_text(
      textwrap.dedent('''
      import os, signal, sys, time
      def on_term(sig, frame):
        print('got SIGTERM', flush=True)
        sys.exit(0)
      signal.signal(signal.SIGTERM, on_term)
      print('ready', flush=True)
      time.sleep(60)
      sys.exit(5)  # never reached when the signal arrives
  '''))
  proc = _launch(['-n', '2', '--', sys.executable, str(script)])
  lines = queue.Queue()
  threading.Thread(target=lambda: [lines.put(l.rstrip('\n')) for l in proc.stdout],
                   daemon=True).start()
  seen, deadline = [], time.monotonic() + 30
  try:
    while not {'[p0] ready', '[p1] ready'} <= set(seen):
      seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
  time.sleep(0.2)
  while not lines.empty():
    seen.append(lines.get())
  assert '[p0] got SIGTERM' in seen and '[p1] got SIGTERM' in seen, seen


# ---- the launch scripts' syntax (their behaviour: tests/test_launch_scripts.py) -----------


def test_wrapper_script_and_sbatch_syntax():
  out = subprocess.run([
      sys.executable, 'launch/local.py', '-n', '1', '--', sys.executable, '-c',
      'import os; print("id", os.environ["T5LITE_PROCESS_ID"])'
  ], cwd=REPO, env=_env(), text=True, capture_output=True, timeout=30)
  assert out.returncode == 0 and out.stdout.strip() == '[p0] id 0', out
  subprocess.run(['bash', '-n', 'launch/slurm_gpu.sbatch'], cwd=REPO, check=True, timeout=30)
  subprocess.run(['bash', '-n', 'launch/tpu_pod.sh'], cwd=REPO, check=True, timeout=30)


# ---- training over two processes ------------------------------------------------------------


def _train_args(workdir, steps):
  return [
      '-m', 't5lite.train', '--config',
      os.path.join(REPO, 'configs', 'quickstart.py'), '--workdir',
      str(workdir), f'--config.train.steps={steps}', '--config.checkpoint.every_steps=3',
      '--config.train.batch_size=8', '--config.train.log_every=1',
      '--config.reporting.tensorboard=False', '--config.reporting.peak_flops_per_device=1e11'
  ]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


def test_two_processes_train_checkpoint_resume_and_match_one_process(tmp_path):
  """2 processes x 4 CPU devices train the quickstart 3 steps, checkpoint, and a second launch
  resumes to step 6; the losses match one process with 8 devices. Not bitwise: the cross-process
  (gloo) reductions add in another order than one process does, so equal to float32 rounding."""
  single = tmp_path / 'single'
  env = dict(_env(), XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, *_train_args(single, 6)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]

  multi = tmp_path / 'multi'
  for steps in (3, 6):
    proc = _launch(
        ['-n', '2', '--devices_per_process', '4', '--', sys.executable, *_train_args(multi, steps)])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
  # Process 0's log line ('[p0] ' from the launcher, then the timestamp).
  assert any(
      line.startswith('[p0] ') and 'resumed from the checkpoint of step 3' in line
      for line in out.splitlines()), out[-3000:]
  # Each process saved its own data position (its slice of the data) with the state.
  step_dir = multi / 'checkpoints' / '3' / 'data'
  assert sorted(n for n in os.listdir(step_dir) if n.endswith('.json')) == [
      'process_0-of-2.json', 'process_1-of-2.json'
  ]

  expected, got = _losses(single), _losses(multi)
  assert sorted(got) == sorted(expected) == list(range(1, 7))
  for step in expected:
    assert abs(got[step] - expected[step]) <= 1e-4 * abs(expected[step]), (step, got, expected)
  assert got[6] < got[1]  # it trains
