"""A dead launcher leaves nothing running (t5lite/launch/local.py): its children, what a shell
command starts, and children that ignore SIGTERM are all gone once it is killed, SIGKILL included.
Each of the two mechanisms (the parent-death signal, the watchdog) is also checked alone. The
launcher's normal paths are in tests/test_distributed.py."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_distributed import _env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Records its pid in the directory argv[1] (so the test knows it is up), then sleeps. With argv[2]
# == 'ignore' it ignores SIGTERM first, like a process stuck where it cannot take the signal.
SLEEPER = textwrap.dedent('''
    import os, signal, sys, time
    if sys.argv[2:] == ['ignore']:
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.path.join(sys.argv[1], f'{os.getpid()}.tmp'), 'w') as f:
      f.write('up')
    os.rename(os.path.join(sys.argv[1], f'{os.getpid()}.tmp'), os.path.join(sys.argv[1], str(os.getpid())))
    time.sleep(600)
''')


def _running(pid: int) -> bool:
  """True while the process exists and has not exited (an exited one waiting for its parent to
  collect it, a zombie, counts as gone)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rpartition(')')[2].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def _wait_for_pids(pid_dir, count, timeout=60):
  deadline = time.monotonic() + timeout
  while True:
    pids = [int(name) for name in os.listdir(pid_dir) if name.isdigit()]
    if len(pids) >= count:
      assert len(pids) == count, pids
      return pids
    assert time.monotonic() < deadline, f'only {pids} of {count} processes came up'
    time.sleep(0.05)


def _wait_gone(pids, timeout):
  deadline = time.monotonic() + timeout
  while any(_running(pid) for pid in pids):
    if time.monotonic() > deadline:
      return [pid for pid in pids if _running(pid)]
    time.sleep(0.05)
  return []


@pytest.fixture
def pid_dir(tmp_path):
  """A directory the sleepers register in; whatever is still running at the end is killed, so a
  failing test leaves no orphans behind."""
  path = tmp_path / 'pids'
  path.mkdir()
  yield path
  for name in os.listdir(path):
    if name.isdigit() and _running(int(name)):
      os.kill(int(name), signal.SIGKILL)


def _launch(args, stderr=subprocess.DEVNULL):
  return subprocess.Popen([sys.executable, '-m', 't5lite.launch.local', *args], cwd=REPO,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)


def _kill(proc):
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=10) == -signal.SIGKILL


def test_sigkilled_launcher_takes_its_children_down(pid_dir):
  launcher = _launch(['-n', '2', '--', sys.executable, '-c', SLEEPER, str(pid_dir)])
  try:
    children = _wait_for_pids(pid_dir, 2)
  finally:
    _kill(launcher)
  assert _wait_gone(children, timeout=5) == []


def test_sigkilled_launcher_takes_a_shell_commands_processes_down(pid_dir, tmp_path):
  # The parent-death signal reaches only the shell; its two background pythons go with the group.
  sleeper = tmp_path / 'sleeper.py'
  sleeper.write_text(SLEEPER)
  script = f'{sys.executable} {sleeper} {pid_dir} & {sys.executable} {sleeper} {pid_dir} & wait'
  errors = tmp_path / 'launcher.err'
  with open(errors, 'w') as err:
    launcher = _launch(['-n', '2', '--', 'sh', '-c', script], stderr=err)
  try:
    workers = _wait_for_pids(pid_dir, 4)
  finally:
    _kill(launcher)
  assert _wait_gone(workers, timeout=5) == []
  time.sleep(0.2)  # the watchdog writes its line before it signals; let the file catch up
  assert '[launch] the launcher is gone; stopping the process groups it left' in errors.read_text()


def test_children_that_ignore_sigterm_are_killed_after_grace(pid_dir):
  launcher = _launch(
      ['-n', '2', '--grace_s', '1', '--', sys.executable, '-c', SLEEPER,
       str(pid_dir), 'ignore'])
  try:
    children = _wait_for_pids(pid_dir, 2)
  finally:
    _kill(launcher)
  time.sleep(0.5)
  assert all(_running(pid) for pid in children)  # SIGTERM did nothing: they wait for the grace
  assert _wait_gone(children, timeout=5) == []


def test_leftover_processes_stopped_when_the_launcher_exits_normally(pid_dir):
  # The command exits 0 at once but leaves a background process in its group.
  launcher = _launch([
      '-n', '1', '--', 'sh', '-c', f'{sys.executable} -c "$0" {pid_dir} & sleep 1; exit 0', SLEEPER
  ])
  straggler, = _wait_for_pids(pid_dir, 1)
  assert launcher.wait(timeout=30) == 0
  assert _wait_gone([straggler], timeout=5) == []


# ---- each mechanism alone ---------------------------------------------------------------------

# A stand-in for the launcher: starts one sleeper the way given, prints its pid, and waits to be
# killed.
PARENT = textwrap.dedent('''
    import os, subprocess, sys, time
    from t5lite.launch import local
    mode, sleeper, pid_dir = sys.argv[1:]
    if mode == 'pdeathsig':  # the parent-death signal only: no watchdog, no session of its own
      subprocess.Popen([sys.executable, sleeper, pid_dir], preexec_fn=local.die_with_parent(os.getpid()))
    else:  # the watchdog only; the child starts a grandchild in its group
      watchdog = local.Watchdog(grace_s=1.0)
      script = f'{sys.executable} {sleeper} {pid_dir} & {sys.executable} {sleeper} {pid_dir}; wait'
      child = subprocess.Popen(['sh', '-c', script], start_new_session=True)
      watchdog.watch(child.pid)
    time.sleep(600)
''')


@pytest.mark.parametrize('mode, count', [('pdeathsig', 1), ('watchdog', 2)])
def test_each_mechanism_alone(mode, count, pid_dir, tmp_path):
  sleeper = tmp_path / 'sleeper.py'
  sleeper.write_text(SLEEPER)
  parent = subprocess.Popen(
      [sys.executable, '-c', PARENT, mode,
       str(sleeper), str(pid_dir)], cwd=REPO, env=_env())
  try:
    workers = _wait_for_pids(pid_dir, count)
    time.sleep(0.5)
    assert all(_running(pid) for pid in workers)  # nothing stops them while the parent lives
  finally:
    _kill(parent)
  assert _wait_gone(workers, timeout=5) == []
