"""Start one multi-process run on this machine: N processes over loopback, K CPU devices each.

  python -m t5lite.launch.local -n 2 --devices_per_process 4 -- python -m t5lite.train ...

Each child gets the same command and, in its environment, T5LITE_COORDINATOR_ADDRESS (127.0.0.1 and
a free port), T5LITE_NUM_PROCESSES, T5LITE_PROCESS_ID and T5LITE_LOCAL_DEVICE_COUNT, which
`t5lite.distributed.maybe_initialize` turns into `jax.distributed.initialize(...)`. This is the
same code path as a TPU pod or a SLURM job, small enough for a laptop and for tests.

The launcher prefixes every output line with [p0], [p1], ...; forwards SIGTERM and SIGINT to every
child (a second one escalates to SIGKILL); and when a child fails, stops the others (SIGTERM, then
SIGKILL after --grace_s, since the survivors would otherwise block in a collective forever) and
exits with that child's code. All children exiting 0 gives 0.

Nothing it starts outlives it, however it ends (even SIGKILL), so a relaunch never shares the
workdir with orphans of the last run. Two mechanisms, each enough for the common case:

- Parent-death signal (Linux): each child asks the kernel for SIGTERM when the launcher dies
  (prctl PR_SET_PDEATHSIG), which a trainer takes as a preemption: it saves and exits. This reaches
  the child itself only, not what a shell command starts.
- A watchdog: a small process of its own (its own session, so a Ctrl-C or a killed terminal does
  not reach it) that reads the children's process-group ids from a pipe. When the launcher's end of
  the pipe closes, whatever the cause (a normal exit too: what a command left running in its group
  is stopped), it sends SIGTERM to every group still there, then SIGKILL after --grace_s. Each
  child leads its own group, and a shell's children stay in it unless they make a session or group
  of their own (setsid, or a shell's job control), so this takes down the whole command. It works wherever there are process groups (macOS too).

What still escapes: a process that leaves its group (setsid, `set -m` in a shell, a daemon), and a
SIGKILL of the launcher and the watchdog together (then only the parent-death signal acts).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from t5lite.distributed import ENV


def free_port() -> int:
  """A TCP port free on loopback now. Another program could take it before the coordinator binds
  it; that race is rare and fails loudly, and --port avoids it."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(base: dict, process_id: int, num_processes: int, port: int,
              devices_per_process: int) -> dict:
  env = dict(base)
  env.update({
      ENV['coordinator_address']: f'127.0.0.1:{port}',
      ENV['num_processes']: str(num_processes),
      ENV['process_id']: str(process_id),
      ENV['local_device_count']: str(devices_per_process),
      'PYTHONUNBUFFERED': '1',  # line by line, so the prefixed output interleaves as it happens
  })
  # CPU devices are the point of this launcher; on a GPU machine, N processes would otherwise all
  # claim the same accelerators. An explicit JAX_PLATFORMS in the caller's environment wins.
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env


def exit_code(returncode: int) -> int:
  """A shell-style code: a child killed by signal S reads as 128 + S."""
  return 128 - returncode if returncode < 0 else returncode


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int):
  """A `preexec_fn` for Popen: on Linux, the child gets SIGTERM when the process that started it
  dies (any way, SIGKILL included). Elsewhere it does nothing.

  The kernel sends the signal when the parent *thread* that forked the child ends, so start the
  children from a thread that lives as long as the launcher (its main thread)."""
  prctl = None
  if sys.platform.startswith('linux'):
    try:
      prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    except (OSError, AttributeError):
      pass

  def preexec() -> None:
    if prctl is not None:
      prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # A parent that died before the prctl above is not signalled for: this child has already been
    # handed to another parent, so it must not start the command at all.
    if os.getppid() != parent_pid:
      os._exit(1)  # pylint: disable=protected-access

  return preexec


# The watchdog's program (see the module docstring): a separate interpreter, so that it outlives
# the launcher, with nothing to import but the standard library.
_WATCHDOG = r"""
import os, signal, sys, time
grace_s = float(sys.argv[1])
groups = [int(line) for line in sys.stdin]  # until the launcher's end closes: it exited or died

def alive(group):
  try:
    os.killpg(group, 0)
    return True
  except OSError:
    return False

left = [g for g in groups if alive(g)]
if left:
  sys.stderr.write(f'[launch] the launcher is gone; stopping the process groups it left: {left}\n')
  sys.stderr.flush()
for sig in (signal.SIGTERM, signal.SIGKILL):
  for g in left:
    try:
      os.killpg(g, sig)
    except OSError:
      pass
  deadline = time.monotonic() + grace_s
  while left and sig == signal.SIGTERM and time.monotonic() < deadline:
    time.sleep(0.1)
    left = [g for g in left if alive(g)]
"""


class Watchdog:
  """Stops the registered process groups once this process ends (see the module docstring)."""

  def __init__(self, grace_s: float):
    # Its own session: a terminal's Ctrl-C, or the end of the terminal, must not stop it first.
    # Its stdout goes nowhere, so that it never holds the launcher's output open.
    self.proc = subprocess.Popen(
        [sys.executable, '-c', _WATCHDOG, str(grace_s)], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, start_new_session=True)

  def watch(self, group: int) -> None:
    try:
      self.proc.stdin.write(f'{group}\n'.encode())
      self.proc.stdin.flush()
    except OSError:  # it is gone (killed on its own): the parent-death signal still acts
      pass


class _Group:
  """The children, the threads copying their output, and the signals sent to them."""

  def __init__(self):
    self.lock = threading.Lock()
    self.procs, self.threads = [], []

  def start(self, command: Sequence[str], n: int, port: int, devices: int,
            watchdog: Watchdog | None) -> None:
    for i in range(n):
      # Own session per child: a Ctrl-C in the terminal reaches only the launcher, which forwards
      # it once; and killpg also reaches anything the command itself starts (a shell's children).
      env = child_env(os.environ, i, n, port, devices)
      proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True, preexec_fn=die_with_parent(os.getpid()))
      self.procs.append(proc)
      if watchdog is not None:
        watchdog.watch(proc.pid)  # the child leads its own group: pgid == pid
    # The output threads only now: a fork while other threads run could copy a lock one of them
    # holds into the child, where preexec_fn might wait on it forever.
    for i, proc in enumerate(self.procs):
      thread = threading.Thread(target=self._copy, args=(proc, f'[p{i}] '.encode()), daemon=True)
      thread.start()
      self.threads.append(thread)

  def _copy(self, proc: subprocess.Popen, prefix: bytes) -> None:
    out = sys.stdout.buffer
    for line in iter(proc.stdout.readline, b''):
      with self.lock:
        out.write(prefix + (line if line.endswith(b'\n') else line + b'\n'))
        out.flush()

  def signal(self, sig: int, only_running: bool = True) -> None:
    for proc in self.procs:
      if only_running and proc.poll() is not None:
        continue
      try:
        os.killpg(proc.pid, sig)
      except (ProcessLookupError, PermissionError):
        pass

  def say(self, message: str) -> None:
    with self.lock:
      sys.stdout.buffer.write(f'[launch] {message}\n'.encode())
      sys.stdout.buffer.flush()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m t5lite.launch.local',
      description='Run COMMAND as N processes of one JAX multi-process run on this machine.',
      usage='%(prog)s -n N [--devices_per_process K] [--port P] -- COMMAND [ARGS...]')
  parser.add_argument('-n', '--num_processes', type=int, required=True)
  parser.add_argument('--devices_per_process', type=int, default=1,
                      help='CPU devices in each process (default 1)')
  parser.add_argument('--port', type=int, default=0, help='coordinator port (default: a free one)')
  parser.add_argument(
      '--grace_s', type=float, default=10.0,
      help='after a child fails, or the launcher dies, seconds the processes '
      'get to exit before SIGKILL')
  argv = list(argv)
  if '--' not in argv:
    parser.error('put the command after --, e.g. -n 2 -- python -m t5lite.train ...')
  split = argv.index('--')
  args = parser.parse_args(argv[:split])
  args.command = argv[split + 1:]
  if not args.command:
    parser.error('no command after --')
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('-n and --devices_per_process must be >= 1')
  return args


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  port = args.port or free_port()
  group, signals_seen = _Group(), []

  def forward(sig, _frame):
    # The first SIGTERM/SIGINT is passed on as is (a trainer saves and exits 0); a second one means
    # "now": SIGKILL.
    signals_seen.append(sig)
    group.signal(signal.SIGKILL if len(signals_seen) > 1 else sig)

  # Handlers first, so that a signal arriving while the children start is not lost.
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  first_failure, kill_at = None, None
  try:
    try:
      watchdog = Watchdog(args.grace_s)
    except OSError as e:  # the parent-death signal still covers the children themselves
      group.say(f'could not start the watchdog ({e}); a killed launcher may leave processes of '
                'a shell command running')
      watchdog = None
    group.start(args.command, args.num_processes, port, args.devices_per_process, watchdog)
    while True:
      codes = [p.poll() for p in group.procs]
      if first_failure is None:
        for i, code in enumerate(codes):
          if code not in (None, 0):
            first_failure = exit_code(code)
            if None in codes:
              group.say(f'process {i} exited with {first_failure}; stopping the others')
              group.signal(signal.SIGTERM)
              kill_at = time.monotonic() + args.grace_s
            break
      if None not in codes:
        break
      if kill_at is not None and time.monotonic() > kill_at:
        group.signal(signal.SIGKILL)
        kill_at = None
      time.sleep(0.05)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for thread in group.threads:
    thread.join(timeout=5)  # a grandchild may still hold the pipe open; don't wait for it forever
  return first_failure or 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
