"""The workdir lock (t5lite/workdir.py): one run per workdir, stale leases taken over, a lost lease
noticed, a workdir that cannot be used named, and exactly one winner when runs start together."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from t5lite.workdir import WorkdirBusyError, WorkdirError, WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()


def _read(workdir):
  with open(os.path.join(workdir, 'lock.json')) as f:
    return json.load(f)


def _write(workdir, **lease):
  """A lease as another run would have left it."""
  lease = {
      'host': 'elsewhere', 'pid': 4242, 'pid_start': None, 'pid_namespace': None,
      'started': time.time() - 3600, 'refreshed': time.time(), 'token': 'theirs', **lease
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'lock.json'), 'w') as f:
    json.dump(lease, f)
  return lease


def _wait_for(predicate, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.02)


def test_second_lock_is_refused_naming_the_holder(tmp_path):
  workdir = tmp_path / 'run'  # does not exist yet: acquire creates it
  with WorkdirLock(workdir):
    lease = _read(workdir)
    # The holder, from sources independent of the lock: this process, this host, its start time.
    with open('/proc/self/stat') as f:
      start = f.read().rpartition(')')[2].split()[19]
    assert (lease['host'], lease['pid'], lease['pid_start']) == (HOST, os.getpid(), start)
    assert abs(lease['started'] - time.time()) < 60 and lease['refreshed'] == lease['started']
    with pytest.raises(WorkdirBusyError) as error:
      WorkdirLock(workdir).acquire()
    message = str(error.value)
    assert '\n' not in message
    for part in (f'host {HOST}', f'pid {os.getpid()}', 'last refresh 0 s ago', '--workdir',
                 f'delete {workdir}/lock.json'):
      assert part in message, message
    assert _read(workdir) == lease  # the refused run left the lease alone
  assert not (workdir / 'lock.json').exists()


def test_release_then_acquire_and_release_twice(tmp_path):
  lock = WorkdirLock(tmp_path)
  lock.acquire()
  first = _read(tmp_path)['token']
  lock.release()
  lock.release()  # a second release does nothing
  assert not (tmp_path / 'lock.json').exists()
  other = WorkdirLock(tmp_path).acquire()
  assert _read(tmp_path)['token'] != first
  other.release()


def test_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
  # A real process that has exited: its pid and kernel start time, as it read them itself.
  out = subprocess.run([
      sys.executable, '-c', "import os; print(os.getpid(), open('/proc/self/stat').read()"
      ".rpartition(')')[2].split()[19])"
  ], capture_output=True, text=True, check=True).stdout.split()
  pid, start = int(out[0]), out[1]
  _write(tmp_path, host=HOST, pid=pid, pid_start=start,
         pid_namespace=os.readlink('/proc/self/ns/pid'))
  with WorkdirLock(tmp_path, settle_s=0.1):
    assert _read(tmp_path)['pid'] == os.getpid()
  log = capsys.readouterr().out
  assert f'Taking over the workdir lock {tmp_path}/lock.json from host {HOST}, pid {pid}' in log
  assert f'process {pid} no longer runs on this host' in log


def test_reused_pid_is_not_the_holder(tmp_path, capsys):
  # The pid is alive (it is ours) but started at another time: the holder is gone.
  _write(tmp_path, host=HOST, pid=os.getpid(), pid_start='1',
         pid_namespace=os.readlink('/proc/self/ns/pid'))
  with WorkdirLock(tmp_path, settle_s=0.1):
    assert _read(tmp_path)['token'] != 'theirs'
  assert f'process {os.getpid()} no longer runs on this host' in capsys.readouterr().out


def test_same_pid_in_another_pid_namespace_is_not_checked(tmp_path):
  # Another container with the same host name: its pid 1 says nothing about a process here, so
  # only the refresh time counts, and that is fresh.
  _write(tmp_path, host=HOST, pid=999999, pid_namespace='pid:[1]')
  with pytest.raises(WorkdirBusyError, match='pid 999999'):
    WorkdirLock(tmp_path).acquire()


def test_old_lease_from_another_host_is_taken_over(tmp_path, capsys):
  _write(tmp_path, refreshed=time.time() - 11 * 60)
  with WorkdirLock(tmp_path, stale_minutes=10, settle_s=0.1):
    assert _read(tmp_path)['host'] == HOST
  log = capsys.readouterr().out
  assert 'from host elsewhere, pid 4242' in log and 'no refresh for 11.0 minutes' in log


def test_fresh_lease_from_another_host_is_refused(tmp_path):
  lease = _write(tmp_path, refreshed=time.time() - 9 * 60)
  with pytest.raises(
      WorkdirBusyError, match=r'in use by another run \(host elsewhere, pid 4242, started .*, '
      r'last refresh 540 s ago\)'):
    WorkdirLock(tmp_path, stale_minutes=10).acquire()
  assert _read(tmp_path) == lease


def test_unreadable_lease_is_taken_over(tmp_path, capsys):
  (tmp_path / 'lock.json').write_text('{"host": ')
  with WorkdirLock(tmp_path, settle_s=0.1):
    assert _read(tmp_path)['pid'] == os.getpid()
  assert 'the lease cannot be read' in capsys.readouterr().out


def test_refresh_period():
  assert WorkdirLock('w').refresh_s == 60  # every minute
  assert WorkdirLock('w', stale_minutes=1).refresh_s == 12  # 5 times within stale_minutes
  with pytest.raises(ValueError, match='refresh_s=60 must be above 0 and below stale_minutes'):
    WorkdirLock('w', stale_minutes=1, refresh_s=60)


def test_refresh_updates_the_time(tmp_path):
  with WorkdirLock(tmp_path, stale_minutes=0.01):  # refreshes every 0.12 s
    first = _read(tmp_path)
    _wait_for(lambda: _read(tmp_path)['refreshed'] > first['refreshed'] + 0.15)
    now = _read(tmp_path)
    assert now['token'] == first['token'] and now['started'] == first['started']
    assert abs(now['refreshed'] - time.time()) < 5


def test_lost_lease_is_noticed_once_and_left_alone(tmp_path, capsys):
  lock = WorkdirLock(tmp_path, refresh_s=0.05).acquire()
  lock.check()  # ours: nothing to say
  theirs = _write(tmp_path)
  _wait_for(lambda: lock.lost)
  time.sleep(0.3)  # several more refresh periods
  with pytest.raises(WorkdirBusyError, match='to another run .*host elsewhere, pid 4242'):
    lock.check()
  lock.release()
  assert _read(tmp_path) == theirs  # not ours: neither refreshed nor deleted
  assert capsys.readouterr().out.count('Lost the workdir lock') == 1


def test_deleted_lease_is_written_again(tmp_path):
  with WorkdirLock(tmp_path, refresh_s=0.05):
    token = _read(tmp_path)['token']
    os.remove(tmp_path / 'lock.json')
    _wait_for(lambda: (tmp_path / 'lock.json').exists())
    assert _read(tmp_path)['token'] == token
    with pytest.raises(WorkdirBusyError):
      WorkdirLock(tmp_path).acquire()


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'run'
  path.write_text('not a directory')
  with pytest.raises(WorkdirError, match=f'workdir {path} is a file, not a directory'):
    WorkdirLock(path).acquire()
  with pytest.raises(WorkdirError, match=f'workdir {path}/sub cannot be created'):
    WorkdirLock(path / 'sub').acquire()


def test_unwritable_workdir(tmp_path):
  # Tests run as root, which ignores permission bits; the immutable attribute stops root too.
  subprocess.run(['chattr', '+i', str(tmp_path)], check=True)
  try:
    with pytest.raises(
        WorkdirError, match=f'workdir {tmp_path} is not writable .*Operation not '
        'permitted.*fix its permissions'):
      WorkdirLock(tmp_path).acquire()
    with pytest.raises(WorkdirError, match=f'workdir {tmp_path}/new cannot be created'):
      WorkdirLock(tmp_path / 'new').acquire()
  finally:
    subprocess.run(['chattr', '-i', str(tmp_path)], check=True)
  assert os.listdir(tmp_path) == []


RACER = textwrap.dedent('''
    import sys, time
    from t5lite.workdir import WorkdirBusyError, WorkdirLock
    workdir, exclusive, read_delay, write_delay = sys.argv[1:]
    lock = WorkdirLock(workdir, settle_s=0.2)
    lock._local = exclusive == '1'  # '0': no O_EXCL, as on gs://
    # Slow reads and writes, as over a network, widen the race: without them one racer would
    # finish before the next one looked.
    read, write = lock._read, lock._write
    def slow_read():
      lease = read()
      time.sleep(float(read_delay))
      return lease
    def slow_write(lease):
      time.sleep(float(write_delay))
      write(lease)
    lock._read, lock._write = slow_read, slow_write
    print('ready', flush=True)
    start = float(sys.stdin.readline())
    time.sleep(max(0, start - time.time() - 0.01))
    while time.time() < start:  # all racers leave at the same instant
      pass
    try:
      lock.acquire()
    except WorkdirBusyError:
      print('busy', flush=True)
      sys.exit(0)
    print('won', flush=True)
    time.sleep(float(sys.stdin.readline() or 0))  # hold it until every racer has tried
    lock.release()
''')


def _outcome(proc):
  for line in proc.stdout:  # past the log lines (a racer taking over a stale lease says so)
    if line.strip() in ('won', 'busy'):
      return line.strip()
  return 'exited'


def test_racing_runs_exactly_one_wins(tmp_path):
  """Three racers per round, started together. Rounds: an empty workdir on a local disk, where a
  racer that looked first but wrote last (it paused longer than the settle time) still loses,
  thanks to O_EXCL; the same without O_EXCL (the gs:// path: write, settle, read back); a stale
  lease of a dead host that every racer takes over at once."""
  rounds = {
      'empty': ('1', [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0)]),
      'no_excl': ('0', [(0.2, 0.1)] * 3),
      'stale': ('1', [(0.2, 0.1)] * 3),
  }
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  procs = {}
  for mode, (exclusive, delays) in rounds.items():
    for i in range(3):
      workdir = tmp_path / f'{mode}{i}'
      if mode == 'stale':
        _write(workdir, refreshed=time.time() - 3600)
      procs[mode, i] = [
          subprocess.Popen([
              sys.executable, '-c', RACER,
              str(workdir), exclusive,
              str(read_delay),
              str(write_delay)
          ], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
          for read_delay, write_delay in delays
      ]
  try:
    for group in procs.values():
      for proc in group:
        assert proc.stdout.readline() == 'ready\n'
    start = time.time() + 0.3
    for group in procs.values():
      for proc in group:
        proc.stdin.write(f'{start}\n')
        proc.stdin.flush()
    results = {key: [_outcome(proc) for proc in group] for key, group in procs.items()}
    for key, group in procs.items():
      for proc, outcome in zip(group, results[key]):
        if outcome == 'won':  # every racer has tried: let the winner release
          proc.stdin.write('0\n')
          proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
  finally:
    for group in procs.values():
      for proc in group:
        if proc.poll() is None:
          proc.kill()
  for key, outcome in results.items():
    assert sorted(outcome) == ['busy', 'busy', 'won'], (key, outcome)
    assert not (tmp_path / f'{key[0]}{key[1]}' / 'lock.json').exists()  # the winner released it
