"""launch/tpu_pod.sh against a fake `gcloud`, launch/slurm_gpu.sbatch against a fake `srun` and
`scontrol`, all on PATH.

The fake gcloud records every call and plays a slice's states (READY, PREEMPTED, NOT_FOUND, ...)
from a state file that its own create and delete calls update. Its `scp` copies into a fake worker
home and its `ssh` runs the remote command there with bash, so what the script sends a worker is
executed, not just read: a fake `curl` installs a fake `uv`, whose `venv` makes a fake trainer
`python` that records its arguments and answers SIGTERM like t5lite.train (saves, exits 0).
"""
import importlib.metadata
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, 'launch', 'tpu_pod.sh')
SBATCH = os.path.join(REPO, 'launch', 'slurm_gpu.sbatch')

FAKE_GCLOUD = '''\
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(json.dumps(args) + '\\n')
with open(os.environ['FAKE_STATE']) as f:
  state = json.load(f)
words = [a for a in args if not a.startswith('--')]
kind, verb = words[2], words[3]  # compute tpus tpu-vm|queued-resources VERB ...
key = 'node' if kind == 'tpu-vm' else 'queued'
home = os.environ['FAKE_HOME']
if verb == 'describe':
  if state[key] == 'NOT_FOUND':
    sys.exit(f"ERROR: (gcloud.compute.tpus.{kind}.describe) NOT_FOUND: Resource '{words[4]}' "
             'was not found')
  if state[key] == 'NO_AUTH':
    sys.exit('ERROR: (gcloud.compute.tpus) You do not currently have an active account selected.')
  print(state[key])
elif verb == 'create':
  state[key] = 'READY' if key == 'node' else 'ACTIVE'
  if key == 'queued':
    state['node'] = 'READY'
elif verb == 'delete':
  state[key] = 'NOT_FOUND'
  if key == 'queued':
    state['node'] = 'NOT_FOUND'
elif verb == 'scp':
  shutil.copy(words[4], os.path.join(home, words[5].split(':', 1)[1]))
elif verb == 'ssh':
  command = next(a[len('--command='):] for a in args if a.startswith('--command='))
  env = dict(os.environ, HOME=home, PATH=os.environ['FAKE_REMOTE_PATH'])
  sys.exit(subprocess.run(['bash', '-c', command], env=env).returncode)
with open(os.environ['FAKE_STATE'], 'w') as f:
  json.dump(state, f)
'''

# What the fake uv's `venv DIR` puts at DIR/bin/python: a trainer that records its argv, environment
# and session, prints a step and, while ~/hold exists, keeps training until SIGTERM.
FAKE_TRAINER = '''\
#!/bin/bash
printf '%s\\n' "$@" > "$HOME/trainer.args"
echo "T5LITE_DISTRIBUTED=$T5LITE_DISTRIBUTED cwd=$PWD sid=$(ps -o sid= -p $$ | tr -d ' ')" \\
  > "$HOME/trainer.env"
echo $$ > "$HOME/trainer.pid"
trap 'echo "trainer: SIGTERM, saved"; exit 0' TERM
echo 'trainer: step 1'
while [ -e "$HOME/hold" ]; do sleep 0.05; done
echo 'trainer: done'
'''

FAKE_UV = '''\
#!/bin/bash
echo "uv $*" >> "$FAKE_TOOLS_LOG"
if [ "$1" = venv ]; then
  dir=${@: -1}
  mkdir -p "$dir/bin" && cp "$FAKE_TRAINER" "$dir/bin/python" && chmod +x "$dir/bin/python"
fi
'''

# The fake curl prints what `curl -LsSf https://astral.sh/uv/install.sh` would: an installer,
# here one that puts the fake uv into ~/.local/bin.
FAKE_CURL = '''\
#!/bin/bash
echo "curl $*" >> "$FAKE_TOOLS_LOG"
echo 'mkdir -p "$HOME/.local/bin" && cp "$FAKE_UV" "$HOME/.local/bin/uv"'
'''

TRAIN_ARGS = [
    '--config', 'configs/quickstart.py', '--workdir', 'gs://bucket/runs/a b',
    '--config.train.steps=10'
]
JAX_VERSION = importlib.metadata.version('jax')


class Cloud:
  """A fake gcloud with a state file, a fake worker home and the log of every call."""

  def __init__(self, tmp_path, node='NOT_FOUND', queued='NOT_FOUND'):
    self.tmp = tmp_path
    # A small checkout to ship, with the script in it (the script ships the tree it lives in).
    self.src = tmp_path / 'src'
    for name, text in (('launch/tpu_pod.sh', pathlib.Path(TPU_POD).read_text()),
                       ('configs/quickstart.py', 'CONFIG = 1\n'), ('setup.py', '# setup\n'),
                       ('.venv/bin/python', 'not shipped\n')):
      (self.src / name).parent.mkdir(parents=True, exist_ok=True)
      (self.src / name).write_text(text)
    self.script = self.src / 'launch' / 'tpu_pod.sh'
    self.home = tmp_path / 'worker'
    self.home.mkdir()
    local_bin, remote_bin = tmp_path / 'bin', tmp_path / 'remote_bin'
    local_bin.mkdir()
    remote_bin.mkdir()
    self.log, self.state = tmp_path / 'gcloud.jsonl', tmp_path / 'state.json'
    self.tools_log = tmp_path / 'tools.log'
    self.state.write_text(json.dumps({'node': node, 'queued': queued}))
    files = {
        local_bin / 'gcloud': f'#!{sys.executable}\n{FAKE_GCLOUD}', remote_bin / 'curl': FAKE_CURL,
        tmp_path / 'uv': FAKE_UV, tmp_path / 'trainer': FAKE_TRAINER
    }
    for path, text in files.items():
      path.write_text(text)
      path.chmod(0o755)
    self.env = {
        **os.environ, 'PATH': f'{local_bin}{os.pathsep}{os.environ["PATH"]}',
        'TMPDIR': str(tmp_path), 'FAKE_LOG': str(self.log), 'FAKE_STATE': str(self.state),
        'FAKE_HOME': str(self.home
                        ), 'FAKE_REMOTE_PATH': f'{remote_bin}{os.pathsep}/usr/bin{os.pathsep}/bin',
        'FAKE_TOOLS_LOG': str(self.tools_log), 'FAKE_UV': str(tmp_path / 'uv'),
        'FAKE_TRAINER': str(tmp_path / 'trainer'), 'T5LITE_TPU_POLL_S': '0'
    }
    self.env.pop('PROJECT', None)

  def run(self, *args, check=True, timeout=30):
    result = subprocess.run(['bash', self.script, *args], cwd=self.tmp, env=self.env, text=True,
                            capture_output=True, timeout=timeout)
    if check:
      assert result.returncode == 0, result
    return result

  def calls(self):
    """Every gcloud call as its argv, oldest first."""
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]

  def verbs(self):
    """Each call as 'tpu-vm create', 'queued-resources describe', ..."""
    return [' '.join(c[2:4]) for c in self.calls()]

  def tools(self):
    return self.tools_log.read_text().splitlines() if self.tools_log.exists() else []

  def wait_finished(self, runs=1):
    """Until `runs` detached trainers have exited (the wrapper logs each exit)."""
    log, deadline = self.home / 't5lite' / 'train.log', time.monotonic() + 10
    while time.monotonic() < deadline:
      if log.exists() and log.read_text().count('trainer exited with status') >= runs:
        return
      time.sleep(0.05)
    raise AssertionError('the trainer did not finish')

  def trainer_pid(self):
    pid_file = self.home / 'trainer.pid'
    return int(pid_file.read_text()) if pid_file.exists() else None


SHIP_AND_START = ['tpu-vm scp', 'tpu-vm ssh', 'tpu-vm ssh', 'tpu-vm ssh']


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rpartition(')')[2].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def _start_command(call):
  """The trainer's argv inside the `start` ssh call: --command -> setsid nohup bash -c INNER."""
  remote = shlex.split(next(a for a in call if a.startswith('--command='))[len('--command='):])
  inner = shlex.split(remote[remote.index('-c') + 1])
  return inner[inner.index('t5lite.train') + 1:inner.index('&')]


# ---- tpu_pod.sh: the slice's state decides create / reuse / recreate ---------------------------


def test_a_missing_slice_is_created_then_the_code_installed_and_trained_on_every_worker(tmp_path):
  cloud = Cloud(tmp_path, node='NOT_FOUND')
  result = cloud.run('pod1', 'us-central2-b', 'v4-32', 'tpu-ubuntu2204-base', *TRAIN_ARGS)
  assert cloud.verbs() == ['tpu-vm describe', 'tpu-vm create', *SHIP_AND_START]
  calls = cloud.calls()
  create = calls[1]
  assert create[4] == 'pod1' and '--zone=us-central2-b' in create
  assert '--accelerator-type=v4-32' in create and '--version=tpu-ubuntu2204-base' in create
  assert all('--worker=all' in c for c in calls[2:5]) and '--worker=0' in calls[5]
  assert 'does not exist: creating it' in result.stderr

  # On the worker: uv came through the installer (absent before), a Python 3.11 environment of its
  # own, jax[tpu] at the version this suite runs, this checkout with [gcp] from a versioned folder.
  (code,) = (cloud.home / 't5lite' / 'code').iterdir()
  assert (code / 'configs' / 'quickstart.py').read_text() == 'CONFIG = 1\n'
  assert (code / 'launch' / 'tpu_pod.sh').exists() and not (code / '.venv').exists()
  venv = cloud.home / 't5lite' / 'venv'
  assert cloud.tools() == [
      'curl -LsSf https://astral.sh/uv/install.sh',
      f'uv venv --python 3.11 --python-preference only-managed {venv}',
      f'uv pip install -q --python {venv}/bin/python jax[tpu]=={JAX_VERSION} -e {code}[gcp]'
  ]
  assert not list(cloud.home.glob('*.tar.gz'))  # the shipped tarball was unpacked and removed

  # The trainer got the arguments back exactly (the space too), ran in the code folder with
  # T5LITE_DISTRIBUTED=auto, and `run` followed worker 0's log to its end.
  assert (cloud.home
          / 'trainer.args').read_text().splitlines() == ['-m', 't5lite.train', *TRAIN_ARGS]
  assert f'T5LITE_DISTRIBUTED=auto cwd={code} ' in (cloud.home / 'trainer.env').read_text()
  assert _start_command(calls[4]) == TRAIN_ARGS
  assert 'trainer: done' in result.stdout
  assert re.search(r'trainer exited with status 0', result.stdout)


def test_a_ready_slice_is_reused_and_nothing_a_run_needs_is_deleted(tmp_path):
  cloud = Cloud(tmp_path, node='NOT_FOUND')
  cloud.run('--detach', 'pod1', 'z', 'v4-8', 'rt', *TRAIN_ARGS)
  cloud.wait_finished()
  # What a run leaves on a worker: a local workdir with checkpoints, the log.
  checkpoint = cloud.home / 't5lite' / 'runs' / 'checkpoints' / '3' / 'state'
  checkpoint.parent.mkdir(parents=True)
  checkpoint.write_text('saved')
  first = cloud.calls()

  result = cloud.run('--detach', 'pod1', 'z', 'v4-8', 'rt', *TRAIN_ARGS)
  cloud.wait_finished(2)
  assert cloud.verbs()[len(first):] == ['tpu-vm describe', *SHIP_AND_START[:3]]  # no create
  assert 'reusing pod1 (READY)' in result.stderr
  assert checkpoint.read_text() == 'saved'
  assert len(list((cloud.home / 't5lite' / 'code').iterdir())) == 2  # one folder per launch
  assert [t.split()[1] for t in cloud.tools()].count('venv') == 1  # the environment is kept
  log = (cloud.home / 't5lite' / 'train.log').read_text()
  assert log.count('trainer: step 1') == 2  # appended, never truncated
  for call in cloud.calls():
    assert not any(re.search(r'\brm\s+-\w*r', arg) for arg in call), call


def test_a_git_checkout_ships_what_git_tracks_or_would_add(tmp_path):
  cloud = Cloud(tmp_path, node='READY')
  git = lambda *args: subprocess.run(['git', '-C', cloud.src, *args], check=True, timeout=30,
                                     capture_output=True)
  git('init', '-q')
  (cloud.src / '.gitignore').write_text('.venv/\nruns/\n')
  (cloud.src / 'gone.py').write_text('')
  git('add', '.gitignore', 'launch', 'configs', 'setup.py', 'gone.py')
  (cloud.src / 'gone.py').unlink()  # tracked, deleted in the working tree
  (cloud.src / 'new.py').write_text('new\n')  # untracked, not ignored: an edit not yet added
  (cloud.src / 'runs').mkdir()
  (cloud.src / 'runs' / 'big.ckpt').write_text('ignored')
  cloud.run('--detach', 'pod1', 'z', 'v4-8', 'rt', *TRAIN_ARGS)
  cloud.wait_finished()
  (code,) = (cloud.home / 't5lite' / 'code').iterdir()
  shipped = sorted(str(p.relative_to(code)) for p in code.rglob('*') if p.is_file())
  assert shipped == [
      '.gitignore', 'configs/quickstart.py', 'launch/tpu_pod.sh', 'new.py', 'setup.py'
  ]


def test_a_preempted_slice_is_deleted_and_recreated(tmp_path):
  cloud = Cloud(tmp_path, node='PREEMPTED')
  result = cloud.run('--detach', 'pod1', 'z', 'v4-32', 'rt', *TRAIN_ARGS)
  assert cloud.verbs() == ['tpu-vm describe', 'tpu-vm delete', 'tpu-vm create', *SHIP_AND_START[:3]]
  assert '--quiet' in cloud.calls()[1]
  assert 'pod1 is PREEMPTED: deleting and recreating it' in result.stderr
  # The same command once more: the recreated slice is READY and reused.
  cloud.wait_finished()
  cloud.run('--detach', 'pod1', 'z', 'v4-32', 'rt', *TRAIN_ARGS)
  cloud.wait_finished(2)
  assert cloud.verbs().count('tpu-vm create') == 1


def test_a_describe_that_fails_otherwise_stops_before_creating_anything(tmp_path):
  cloud = Cloud(tmp_path, node='NO_AUTH')
  result = cloud.run('pod1', 'z', 'v4-32', 'rt', *TRAIN_ARGS, check=False)
  assert result.returncode == 1 and 'active account' in result.stderr
  assert cloud.verbs() == ['tpu-vm describe']


@pytest.mark.parametrize('queued,node,expected', [
    ('NOT_FOUND', 'NOT_FOUND', ['queued-resources create', 'queued-resources describe']),
    ('ACTIVE', 'READY', ['tpu-vm describe']),
    ('ACTIVE', 'PREEMPTED', [
        'tpu-vm describe', 'queued-resources delete', 'queued-resources create',
        'queued-resources describe'
    ]),
    ('SUSPENDED', 'NOT_FOUND',
     ['queued-resources delete', 'queued-resources create', 'queued-resources describe']),
])
def test_spot_capacity_through_a_queued_resource(tmp_path, queued, node, expected):
  cloud = Cloud(tmp_path, node=node, queued=queued)
  cloud.run('--spot', '--detach', 'pod1', 'z', 'v5litepod-16', 'v2-alpha-tpuv5-lite', *TRAIN_ARGS)
  assert cloud.verbs() == ['queued-resources describe', *expected, *SHIP_AND_START[:3]]
  for call in cloud.calls():
    if call[2:4] == ['queued-resources', 'create']:
      assert call[4] == 'pod1' and '--node-id=pod1' in call and '--spot' in call
      assert '--accelerator-type=v5litepod-16' in call
      assert '--runtime-version=v2-alpha-tpuv5-lite' in call
    if call[2:4] == ['queued-resources', 'delete']:
      assert '--force' in call and '--quiet' in call


def test_a_local_workdir_on_a_multi_host_slice_is_refused_before_any_gcloud_call(tmp_path):
  cloud = Cloud(tmp_path, node='READY')
  for accelerator in ('v4-32', 'v5litepod-16', 'v6e-64'):
    result = cloud.run('pod1', 'z', accelerator, 'rt', '--config', 'c.py', '--workdir=/tmp/run',
                       check=False)
    assert result.returncode == 1, result
    assert f'{accelerator} is a multi-host slice' in result.stderr
    assert 'gs://' in result.stderr and 't5lite[gcp]' in result.stderr
  missing = cloud.run('pod1', 'z', 'v4-32', 'rt', '--config', 'c.py', check=False)
  assert missing.returncode == 1 and 'run needs --workdir' in missing.stderr
  assert cloud.calls() == []
  # One host (v4-8: 4 chips, 8 cores) takes a local workdir, with a warning that it is lost with
  # the slice.
  single = cloud.run('--dry-run', 'pod1', 'z', 'v4-8', 'rt', '--workdir', '/tmp/run')
  assert 'warning: --workdir /tmp/run is on the VM' in single.stderr


@pytest.mark.parametrize('node,changes', [('NOT_FOUND', ['create']),
                                          ('PREEMPTED', ['delete', 'create'])])
def test_dry_run_prints_the_commands_and_runs_only_describe(tmp_path, node, changes):
  cloud = Cloud(tmp_path, node=node)
  out = cloud.run('--dry-run', 'pod1', 'us-central2-b', 'v4-32', 'tpu-ubuntu2204-base',
                  *TRAIN_ARGS).stdout
  assert cloud.verbs() == ['tpu-vm describe']
  assert json.loads(cloud.state.read_text())['node'] == node
  assert not list(tmp_path.glob('*.tar.gz')) and not list(cloud.home.iterdir())
  commands = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith('+ ')]
  assert [c[0] for c in commands] == ['gcloud'] * len(changes) + ['tar'] + ['gcloud'] * 4
  assert [c[4] for c in commands if c[0] == 'gcloud'] == [*changes, 'scp', 'ssh', 'ssh', 'ssh']
  install, start = commands[-3], commands[-2]
  assert f"'jax[tpu]=={JAX_VERSION}'" in install[-1] and 'uv venv --python 3.11' in install[-1]
  assert _start_command(start) == TRAIN_ARGS
  assert '--worker=0' in commands[-1]


# ---- tpu_pod.sh: detached training, logs, status, stop, down ----------------------------------


def test_training_runs_detached_and_stop_makes_it_save(tmp_path):
  cloud = Cloud(tmp_path, node='READY')
  (cloud.home / 'hold').touch()
  try:
    cloud.run('--detach', 'pod1', 'z', 'v4-32', 'rt', *TRAIN_ARGS)
    deadline = time.monotonic() + 10
    while cloud.trainer_pid() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    pid = cloud.trainer_pid()
    # The ssh call returned, the trainer goes on, in a session of its own (setsid): an ssh hang-up
    # does not reach it.
    assert pid and _alive(pid)
    sid = re.search(r'sid=(\d+)', (cloud.home / 'trainer.env').read_text()).group(1)
    assert int(sid) != os.getsid(0)
    assert 'training (pid' in cloud.run('status', 'pod1', 'z').stdout

    again = cloud.run('--detach', 'pod1', 'z', 'v4-32', 'rt', *TRAIN_ARGS, check=False)
    assert again.returncode != 0 and 'a t5lite run is still going' in again.stderr
    assert cloud.verbs()[-1] == 'tpu-vm ssh'  # stopped at the install step, nothing started

    cloud.run('stop', 'pod1', 'z')
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not _alive(pid)
    time.sleep(0.2)  # the wrapper writes its last line after the trainer is gone
    log = (cloud.home / 't5lite' / 'train.log').read_text()
    assert 'trainer: SIGTERM, saved' in log and 'trainer exited with status 0' in log
  finally:
    pid = cloud.trainer_pid()
    if pid and _alive(pid):
      os.kill(pid, signal.SIGKILL)


def test_logs_follows_worker_0_and_refuses_a_missing_slice(tmp_path):
  cloud = Cloud(tmp_path, node='NOT_FOUND')
  cloud.run('--detach', 'pod1', 'z', 'v4-32', 'rt', *TRAIN_ARGS)
  cloud.wait_finished()
  before = len(cloud.calls())
  result = cloud.run('logs', 'pod1', 'z')
  logs = cloud.calls()[before:]
  assert [' '.join(c[2:4]) for c in logs] == ['tpu-vm describe', 'tpu-vm ssh']
  assert '--worker=0' in logs[1] and 'tail' in logs[1][-1]
  assert 'trainer: done' in result.stdout and 'no run is going' in result.stdout

  cloud.state.write_text(json.dumps({'node': 'PREEMPTED', 'queued': 'NOT_FOUND'}))
  gone = cloud.run('logs', 'pod1', 'z', check=False)
  assert gone.returncode == 1 and 'pod1 is PREEMPTED' in gone.stderr
  assert 'rerun the same launch/tpu_pod.sh run command' in gone.stderr


@pytest.mark.parametrize('node,queued,expected', [
    ('READY', 'NOT_FOUND', 'tpu-vm delete'),
    ('READY', 'ACTIVE', 'queued-resources delete'),
    ('NOT_FOUND', 'NOT_FOUND', None),
])
def test_down_deletes_the_slice_or_its_queued_resource(tmp_path, node, queued, expected):
  cloud = Cloud(tmp_path, node=node, queued=queued)
  cloud.run('down', 'pod1', 'z')
  changes = [v for v in cloud.verbs() if not v.endswith('describe')]
  assert changes == ([expected] if expected else [])


def test_usage():
  result = subprocess.run(['bash', TPU_POD, 'only-a-name'], text=True, capture_output=True,
                          timeout=30)
  assert result.returncode == 2 and 'Usage: launch/tpu_pod.sh' in result.stderr


# ---- slurm_gpu.sbatch: the signal / requeue contract ------------------------------------------

# srun records its argv and pid; on SIGTERM it records that and exits $FAKE_SRUN_TERM_STATUS (the
# trainer saves and exits 0); without a signal it exits $FAKE_SRUN_STATUS, after ~/hold is gone.
FAKE_SRUN = '''\
#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
trap 'echo TERM >> "$FAKE_DIR/srun.signals"; exit "${FAKE_SRUN_TERM_STATUS:-0}"' TERM
echo $$ > "$FAKE_DIR/srun.pid"
while [ -e "$FAKE_DIR/hold" ]; do sleep 0.05; done
exit "${FAKE_SRUN_STATUS:-0}"
'''
FAKE_SCONTROL = '''\
#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol.calls"
'''
# scancel --signal=TERM JOBID: SLURM delivers the signal to the job's steps, here the fake srun.
FAKE_SCANCEL = '''\
#!/bin/bash
echo "$*" >> "$FAKE_DIR/scancel.calls"
kill -TERM "$(cat "$FAKE_DIR/srun.pid")"
'''


def _directive(name):
  with open(SBATCH) as f:
    return next(l.split('=', 1)[1].strip() for l in f if l.startswith(f'#SBATCH --{name}='))


def _sbatch(tmp_path, signal_name=None, hold=True, keep_scancel=False, **env):
  """Runs the batch script with bash (as slurmstepd would) and, once the step runs, sends it
  `signal_name`. Returns (exit status, stderr, srun argv, signals srun got, scontrol calls); the
  scancel calls are in tmp_path / 'scancel.calls'."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(parents=True, exist_ok=True)
  for name, text in (('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL), ('scancel', FAKE_SCANCEL)):
    if keep_scancel and name == 'scancel':
      continue
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  if hold:
    (tmp_path / 'hold').touch()
  environ = {
      **os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', 'FAKE_DIR': str(tmp_path),
      'SLURM_JOB_ID': '4242', 'SLURM_NTASKS': '16', 'SLURM_JOB_NUM_NODES': '2', **env
  }
  proc = subprocess.Popen(['bash', SBATCH, '--config', 'configs/x.py', '--workdir', '/shared/r x'],
                          env=environ, text=True, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 10
    while not (tmp_path / 'srun.pid').exists() and time.monotonic() < deadline:
      time.sleep(0.02)
    time.sleep(0.1)  # the script reaches its `wait`
    if signal_name:
      proc.send_signal(getattr(signal, f'SIG{signal_name}'))
    else:
      (tmp_path / 'hold').unlink(missing_ok=True)
    _, stderr = proc.communicate(timeout=20)
  finally:
    if proc.poll() is None:
      proc.kill()
  read = lambda name: (tmp_path / name).read_text().splitlines() if (tmp_path / name).exists(
  ) else []
  return proc.returncode, stderr, read('srun.args'), read('srun.signals'), read('scontrol.calls')


def test_the_time_limit_signal_saves_and_requeues(tmp_path):
  # The directive asks for USR1 to the batch shell (B:) ahead of the limit: send what it names.
  spec = _directive('signal')
  assert re.fullmatch(r'B:USR1@\d+', spec), spec
  signal_name = re.fullmatch(r'B:(\w+)@\d+', spec).group(1)
  status, stderr, srun_args, srun_signals, scontrol = _sbatch(tmp_path, signal_name)
  assert srun_args == [
      '--kill-on-bad-exit=1', 'python', '-m', 't5lite.train', '--config', 'configs/x.py',
      '--workdir', '/shared/r x'
  ]
  assert srun_signals == ['TERM']
  assert (tmp_path / 'scancel.calls').read_text().splitlines() == ['--signal=TERM 4242']
  assert scontrol == ['requeue 4242']
  assert status == 0, stderr
  assert 'requeueing job 4242' in stderr


def test_a_run_that_finishes_is_not_requeued(tmp_path):
  status, _, srun_args, srun_signals, scontrol = _sbatch(tmp_path, None)
  assert status == 0 and srun_args and srun_signals == [] and scontrol == []


def test_a_failing_step_keeps_its_status_and_is_not_requeued(tmp_path):
  status, _, _, _, scontrol = _sbatch(tmp_path, None, FAKE_SRUN_STATUS='3')
  assert status == 3 and scontrol == []
  # Nor when the step fails while saving after the signal: a requeue would fail again.
  status, stderr, _, signals, scontrol = _sbatch(tmp_path / 'b', 'USR1', FAKE_SRUN_TERM_STATUS='1')
  assert status == 1 and signals == ['TERM'] and scontrol == []
  assert 'not requeued' in stderr


def test_sigterm_saves_and_requeues_only_when_asked(tmp_path):
  status, stderr, _, signals, scontrol = _sbatch(tmp_path, 'TERM')
  assert status == 0 and signals == ['TERM'] and scontrol == []
  assert 'without a requeue' in stderr
  status, _, _, signals, scontrol = _sbatch(tmp_path / 'b', 'TERM', T5LITE_REQUEUE_ON_TERM='1')
  assert status == 0 and signals == ['TERM'] and scontrol == ['requeue 4242']


def test_without_scancel_the_signal_goes_to_srun(tmp_path):
  # A failing scancel (here: none that works) falls back to SIGTERM to srun itself.
  (tmp_path / 'bin').mkdir()
  (tmp_path / 'bin' / 'scancel').write_text('#!/bin/bash\nexit 1\n')
  (tmp_path / 'bin' / 'scancel').chmod(0o755)
  status, _, _, signals, scontrol = _sbatch(tmp_path, 'USR1', keep_scancel=True)
  assert status == 0 and signals == ['TERM'] and scontrol == ['requeue 4242']


def test_the_batch_script_asks_for_a_requeueable_job_with_its_log_appended():
  # sbatch reads these; without --requeue a requeue is refused, without append the log of the
  # first start is lost on the second.
  with open(SBATCH) as f:
    directives = [l.split()[1] for l in f if l.startswith('#SBATCH ')]
  assert '--requeue' in directives and '--open-mode=append' in directives
