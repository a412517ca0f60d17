"""The workdir lock: one run writes to a workdir at a time, on a local disk or on gs://.

A trainer takes a lease, WORKDIR/lock.json, before its first write and refreshes it while it lives:

  with WorkdirLock(workdir, stale_minutes=10.0):
    ...  # train; check `lock.lost` (or call `lock.check()`) before each save

The lease names its holder (host, pid, the process's start time, the run's start time, the last
refresh, a random token). A second run on the same workdir refuses with WorkdirBusyError naming
the holder. A stale lease is taken over with a warning: its process is dead on this host (the same
host name and pid namespace, so the pid means the same process), or it has not been refreshed for
`stale_minutes` (a host that died, wherever it was; host clocks must agree to within that).

Two runs starting together: on a local disk the lease is created with O_EXCL, so exactly one
creates it. On gs:// (through gcsfs) the first lease is uploaded with GCS's precondition
ifGenerationMatch=0 (create only if absent), which the real service enforces: the second run gets
412 and reads the first one's lease. epath itself offers no exclusive create, and other stores (or
an emulator that ignores preconditions) may not enforce it, so on a URL the lease is also read
back after a pause, as when taking over a stale lease: the last writer wins and the others raise
WorkdirBusyError. The refresh thread also reads the lease back each time, so a run whose lease was
overwritten anyway notices it (`lock.lost`) instead of writing on next to another run.

Only process 0 of a multi-process run takes the lock; nothing here starts JAX.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
import threading
import time

from etils import epath

from t5lite import files

log = logging.getLogger(__name__)

LEASE_NAME = 'lock.json'


class WorkdirError(RuntimeError):
  """The workdir cannot be used at all: it is a file, or it cannot be created or written."""


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir's lease."""


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0]}' if text else type(error).__name__


def _proc_stat(pid: int) -> tuple[str, str] | None:
  """(state, start time) of a process from /proc/PID/stat, None where there is no such file (not
  Linux, or no such process). The start time (field 22, clock ticks since boot) tells a reused pid
  apart from the process that held it."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
  except OSError:
    return None
  # Field 2, the command name, is in parentheses and may itself hold spaces and parentheses.
  fields = stat.rpartition(')')[2].split()
  return fields[0], fields[19]  # fields 3 and 22


def _pid_namespace() -> str | None:
  """The pid namespace of this process: two containers can share a host name (host networking)
  but not their pids, so a pid is only checked where the namespace is the same too."""
  try:
    return os.readlink('/proc/self/ns/pid')
  except OSError:
    return None


def _process_alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # it exists, owned by another user
  stat = _proc_stat(pid)
  if stat is None:
    return True  # no /proc: the pid exists, which is all we can know
  state, now_start = stat
  if state == 'Z':
    return False  # exited, waiting for its parent to collect it
  return start is None or now_start == start


def _create_object(url: str, text: str) -> bool | None:
  """Uploads `text` to `url` only if no object is there (GCS's ifGenerationMatch=0, through
  gcsfs): True if it did, False if there is one. None, writing nothing, where the file system
  offers no such upload (not gcsfs)."""
  try:
    import fsspec  # pylint: disable=import-outside-toplevel  (epath's gs:// backend brings it)
    fs, path = fsspec.core.url_to_fs(url)
  except (ImportError, ValueError):
    return None
  if type(fs).__module__.split('.')[0] != 'gcsfs':
    return None
  try:
    fs.pipe_file(path, text.encode('utf-8'), mode='create')
  except FileExistsError:  # HTTP 412: the precondition failed, another run created it first
    return False
  return True


def _when(t: float) -> str:
  return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))


class WorkdirLock:
  """A lease on a workdir (see the module docstring). `acquire()` / `release()`, or `with`."""

  def __init__(self, workdir, stale_minutes: float = 10.0, refresh_s: float | None = None,
               settle_s: float = 1.0):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LEASE_NAME
    self.stale_s = stale_minutes * 60
    # Every minute by default, but always several times within stale_minutes: a live run's lease
    # must never look stale between two refreshes.
    self.refresh_s = min(60.0, self.stale_s / 5) if refresh_s is None else refresh_s
    if not 0 < self.refresh_s < self.stale_s:
      raise ValueError(f'refresh_s={self.refresh_s} must be above 0 and below stale_minutes '
                       f'({self.stale_s} s)')
    self.settle_s = settle_s
    self.lost = False  # set by the refresh thread when another run has overwritten our lease
    self._local = not files.is_url(self.workdir)
    self._lease: dict | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._lost_message = ''

  # ---- the lease file -----------------------------------------------------------------------

  def _read(self) -> dict | None:
    """The lease on disk: None when there is none, {} when it cannot be understood."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      lease = json.loads(text)
      if (isinstance(lease, dict) and isinstance(lease.get('host'), str)
          and isinstance(lease.get('pid'), int) and isinstance(lease.get('refreshed'), (int, float))
          and isinstance(lease.get('token'), str)):
        return lease
    except ValueError:
      pass
    return {}

  def _write(self, lease: dict) -> None:
    """Replaces the lease whole: readers see the old one or the new one, never a part."""
    text = json.dumps(lease)
    if not self._local:
      self.path.write_text(text)  # one object upload: atomic
      return
    tmp = self.path.with_name(f'{LEASE_NAME}.{lease["token"]}.tmp')
    try:
      tmp.write_text(text)
      os.replace(tmp, self.path)
    finally:
      if tmp.exists():
        tmp.unlink()

  def _create(self, lease: dict) -> bool:
    """Writes the lease only if there is none; False when there is one. Local disks: O_EXCL
    makes this exact: of two runs that both saw no lease, one creates it and the other reads it.
    gs://: GCS's create-if-absent precondition (see the module docstring)."""
    if not self._local:
      created = _create_object(os.fspath(self.path), json.dumps(lease))
      if created is None:  # no create-if-absent on this store: the caller's read-back settles it
        self._write(lease)
        return True
      return created
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(json.dumps(lease))
    return True

  # ---- judging a lease ----------------------------------------------------------------------

  def _describe(self, lease: dict) -> str:
    if not lease:
      return f'an unreadable lease {self.path}'
    started = lease.get('started')
    started = _when(started) if isinstance(started, (int, float)) else '?'
    age = time.time() - lease['refreshed']
    return (f'host {lease["host"]}, pid {lease["pid"]}, started {started}, '
            f'last refresh {age:.0f} s ago')

  def _stale_reason(self, lease: dict) -> str | None:
    """Why the lease no longer protects a live run, or None when it does."""
    if not lease:
      return 'the lease cannot be read'
    if (lease['host'] == socket.gethostname() and lease.get('pid_namespace') == _pid_namespace()
        and not _process_alive(lease['pid'], lease.get('pid_start'))):
      return f'process {lease["pid"]} no longer runs on this host'
    age = time.time() - lease['refreshed']
    if age > self.stale_s:
      return f'no refresh for {age / 60:.1f} minutes (more than {self.stale_s / 60:g})'
    return None

  def _busy(self, lease: dict | None) -> WorkdirBusyError:
    holder = self._describe(lease) if lease is not None else 'a run that has since released it'
    return WorkdirBusyError(
        f'workdir {self.workdir} is in use by another run ({holder}): wait for it to finish, '
        f'stop it, or use another --workdir; if you are sure it is dead, delete {self.path}')

  # ---- acquire and release ------------------------------------------------------------------

  def _prepare_workdir(self) -> None:
    if files.is_url(self.workdir):
      # An object store has no folders to make; and gcsfs's makedirs would create a missing
      # bucket (a typo in --workdir) rather than fail. cli.check_folder checks the bucket.
      return
    try:
      if self.workdir.exists() and not self.workdir.is_dir():
        raise WorkdirError(f'workdir {self.workdir} is a file, not a directory: remove it or use '
                           'another --workdir')
      self.workdir.mkdir(parents=True, exist_ok=True)
    except WorkdirError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (local OSError or a gs:// client error)
      raise WorkdirError(f'workdir {self.workdir} cannot be created ({_one_line(e)}): check the '
                         'path and its parents, or use another --workdir') from e

  def _not_writable(self, error: BaseException) -> WorkdirError:
    return WorkdirError(f'workdir {self.workdir} is not writable ({_one_line(error)}): fix its '
                        'permissions or use another --workdir')

  def acquire(self) -> WorkdirLock:
    """Creates the workdir if needed and takes the lease, or raises WorkdirBusyError (a live run
    holds it) or WorkdirError (the workdir cannot be used). Returns self."""
    if self._lease is not None:
      raise RuntimeError(f'{self.path} is already held by this WorkdirLock')
    self._prepare_workdir()
    now = time.time()
    lease = {
        'host': socket.gethostname(), 'pid': os.getpid(), 'pid_start': None,
        'pid_namespace': _pid_namespace(), 'started': now, 'refreshed': now,
        'token': secrets.token_hex(16), 'command': ' '.join(sys.argv)[:1000]
    }
    stat = _proc_stat(os.getpid())
    lease['pid_start'] = stat[1] if stat else None
    try:
      current = self._read()
      if current is None and self._local:
        if self._create(lease):
          return self._start(lease)
        current = self._read()  # another run created it first
      elif current is None and not self._create(lease):
        current = self._read()  # another run created it first (a gs:// precondition failed)
      if current is not None:
        reason = self._stale_reason(current)
        if reason is None:
          raise self._busy(current)
        log.warning('Taking over the workdir lock %s from %s: %s.', self.path,
                    self._describe(current), reason)
      begin = time.monotonic()
      if current is not None:
        self._write(lease)
      # Another run may have judged the same lease stale and be writing its own: give its write
      # time to land (a few times as long as ours took), then the last writer holds the lease.
      time.sleep(max(self.settle_s, 3 * (time.monotonic() - begin)))
      current = self._read()
    except (WorkdirError, WorkdirBusyError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (local OSError or a gs:// client error)
      raise self._not_writable(e) from e
    if current is None or current.get('token') != lease['token']:
      raise self._busy(current)
    return self._start(lease)

  def _start(self, lease: dict) -> WorkdirLock:
    self._lease, self.lost = lease, False
    self._stop.clear()
    self._thread = threading.Thread(target=self._refresh_loop, name='workdir-lock', daemon=True)
    self._thread.start()
    return self

  def _refresh_loop(self) -> None:
    while not self._stop.wait(self.refresh_s):
      try:
        if not self._refresh():
          return
      except Exception as e:  # pylint: disable=broad-except
        # A passing error (a gs:// hiccup) must not end the run; only a long run of them lets
        # the lease go stale.
        log.warning('Could not refresh the workdir lock %s (%s); trying again in %g s.', self.path,
                    _one_line(e), self.refresh_s)

  def _refresh(self) -> bool:
    """One refresh; False once the lease is lost (then there is nothing more to refresh)."""
    current = self._read()
    lease = dict(self._lease, refreshed=time.time())
    if current is None:
      # Someone deleted it while we run (perhaps sure we were dead): write it again, so that the
      # next run is still refused. If another run has already taken it, the next round sees that.
      if self._local:
        self._create(lease)
      else:
        self._write(lease)
    elif current.get('token') != lease['token']:
      self.lost = True
      self._lost_message = (f'Lost the workdir lock {self.path} to another run '
                            f'({self._describe(current)}): two runs may now be writing to '
                            f'{self.workdir}; stop one of them')
      log.error('%s', self._lost_message)
      return False
    else:
      self._write(lease)
    self._lease = lease
    return True

  def check(self) -> None:
    """Raises WorkdirBusyError once another run has taken the lease (see `lost`)."""
    if self.lost:
      raise WorkdirBusyError(self._lost_message)

  def release(self) -> None:
    """Stops the refreshing and deletes the lease if it is still ours. Safe to call twice."""
    if self._lease is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=30)  # a refresh in flight (a slow gs:// write) finishes first
    try:
      current = self._read()
      if current and current.get('token') == self._lease['token']:
        self.path.unlink()
    except Exception as e:  # pylint: disable=broad-except
      log.warning('Could not remove the workdir lock %s (%s); the next run will find it stale.',
                  self.path, _one_line(e))
    self._lease, self._thread = None, None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()
