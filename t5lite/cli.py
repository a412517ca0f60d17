"""What the jobs (train, eval, infer, convert) share: the command line, the multi-process start,
the build of config -> mesh -> model, and known errors -> one line on stderr and an exit code.

The command line is absl flags with an ml_collections config file flag:

  python -m t5lite.JOB --config configs/x.py[:arg] --config.section.field=value --workdir DIR
                       [job flags] [--coordinator_address=H:P --num_processes=N --process_id=I]
                       [--local_device_count=K] [--module_import=my.tasks ...] [--flagfile=FILE]
                       [--help | -h]

--module_import (repeatable, T5X's flag) adds to config.imports: Python modules imported before the
config is validated, so the tasks and mixtures they register can be named in data.task.

Exit code 0: done (or --help); 2: the command or its input is wrong (fix it and run again); 1: the run
itself failed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import tempfile
from typing import Any, Callable, Sequence

from absl import flags as absl_flags
from ml_collections import config_flags

from t5lite import checkpoints, distributed, files, host_memory, partitioning
from t5lite import config as config_lib
from t5lite import config_files
from t5lite.data import file_tasks
from t5lite.data import tasks as tasks_lib
from t5lite.models.t5 import make_model

ErrorKind = tuple[type, str, int]  # (exception class, message prefix, exit code)
COMMON_ERRORS: tuple[ErrorKind, ...] = (
    (config_lib.ConfigError, 'config error', 2),
    (checkpoints.CheckpointError, 'checkpoint error', 1),
    # A gs:// path without gcsfs: the message says `pip install 't5lite[gcp]'`.
    (files.MissingFileSystemError, 'error', 2),
)
HELP_FLAGS = ('-h', '--help', '-help', '--helpfull', '-?')


@dataclasses.dataclass(frozen=True)
class Flag:
  """A job's own flag: its name, default (whose type is the flag's type) and help line."""
  name: str
  default: Any
  help: str
  kind: type | None = None  # for a None default: str, int, float or bool

  def define(self, flag_values: absl_flags.FlagValues) -> None:
    kind = self.kind or type(self.default)
    define = {
        bool: absl_flags.DEFINE_bool, int: absl_flags.DEFINE_integer,
        float: absl_flags.DEFINE_float, str: absl_flags.DEFINE_string
    }[kind]
    define(self.name, self.default, self.help, flag_values=flag_values)


# Multi-process settings (t5lite/distributed.py); each may also come from its environment variable.
DISTRIBUTED_FLAGS = (
    Flag('coordinator_address', None,
         f'HOST:PORT of process 0 ({distributed.ENV["coordinator_address"]})', str),
    Flag('num_processes', None, f'processes in the run ({distributed.ENV["num_processes"]})', int),
    Flag('process_id', None, f'this process, 0..N-1 ({distributed.ENV["process_id"]})', int),
    Flag('local_device_count', None,
         f'CPU devices for this process ({distributed.ENV["local_device_count"]})', int),
)


@dataclasses.dataclass
class Invocation:
  """A parsed command line: the (unvalidated) config, --workdir, and the job's own flags."""
  config: Any
  workdir: str | None
  options: dict[str, Any]


def _flag_values(job_flags: Sequence[Flag], workdir_help: str, argv: Sequence[str]):
  flag_values = absl_flags.FlagValues()
  # config_flags finds the --config.x=y overrides in the argv it is given (else sys.argv).
  config_flag = config_flags.DEFINE_config_file(
      'config', None,
      'the config file, configs/x.py[:arg] (its get_config(arg)); override any field '
      'with --config.section.field=value', flag_values=flag_values, lock_config=True,
      sys_argv=['t5lite', *argv])
  absl_flags.DEFINE_string('workdir', None, workdir_help, flag_values=flag_values)
  absl_flags.DEFINE_multi_string(
      'module_import', [], 'a Python module to import before the config is validated, so the '
      'tasks it registers can be named (repeatable; adds to config.imports)',
      flag_values=flag_values)
  for flag in (*job_flags, *DISTRIBUTED_FLAGS):
    flag.define(flag_values)
  return flag_values, config_flag


def _check_overrides(argv: Sequence[str]) -> None:
  """Loads --config and applies every --config.x=y to it with config.set_override first, so a
  wrong key or type gets t5lite's message (with "did you mean") rather than absl's."""
  spec, overrides, i = None, [], 0
  while i < len(argv):
    name, has_value, value = argv[i][2:].partition('=') if argv[i].startswith('--') else ('', '',
                                                                                          '')
    if name == 'config' or name.startswith('config.'):
      if not has_value:
        if i + 1 >= len(argv):
          raise config_lib.ConfigError(f'--{name} needs a value')
        i, value = i + 1, argv[i + 1]
      if name == 'config':
        spec = value
      else:
        overrides.append((name[len('config.'):], value))
    i += 1
  if spec is None:
    raise config_lib.ConfigError('--config is required, e.g. --config configs/quickstart.py')
  config = config_files.load_config_file(spec)
  for dotted, value in overrides:
    config_files.set_override(config, dotted, value)


def parse(argv: Sequence[str], job_flags: Sequence[Flag] = (), usage: str = '',
          workdir_help: str = 'the run folder') -> Invocation | None:
  """Parses argv (without the program name) and starts the multi-process run when asked to.

  Returns None after printing the help for -h / --help. Raises ConfigError for a bad command line.
  """
  if any(arg in HELP_FLAGS for arg in argv):
    flag_values, _ = _flag_values(job_flags, workdir_help, [])
    print(f'{usage.strip()}\n\nflags:\n{flag_values.get_help()}')
    return None
  try:
    expanded = absl_flags.FLAGS.read_flags_from_files(['t5lite', *argv], force_gnu=False)[1:]
  except absl_flags.Error as e:  # --flagfile
    raise config_lib.ConfigError(str(e)) from None
  _check_overrides(expanded)
  flag_values, config_flag = _flag_values(job_flags, workdir_help, expanded)
  try:
    rest = flag_values(['t5lite', *expanded], known_only=False)[1:]
  except (absl_flags.Error, AttributeError, KeyError) as e:
    raise config_lib.ConfigError(f'{e}; see --help for the flags') from None
  if rest:
    raise config_lib.ConfigError(f'unexpected argument(s) {" ".join(rest)}; see --help')
  # Before any other JAX call: JAX fixes the process count and devices when a backend starts.
  distributed.maybe_initialize({
      f.name: str(flag_values[f.name].value) for f in DISTRIBUTED_FLAGS
      if flag_values[f.name].value is not None
  })
  options = {f.name: flag_values[f.name].value for f in job_flags}
  config = config_flag.value
  added = [m for m in flag_values['module_import'].value if m not in tuple(config.imports)]
  if added:  # recorded in the config (the workdir's config.json), so a later job imports them too
    config.imports = (*config.imports, *added)
  tasks_lib.import_modules(config.imports)  # now: a job may look tasks up before build
  return Invocation(config, flag_values['workdir'].value, options)


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0]}' if text else type(error).__name__


def _check_url_folder(url: str, flag: str, must_exist: bool) -> None:
  """A URL folder, checked with a few requests and no write: its file system is installed
  (files.MissingFileSystemError otherwise), its bucket exists and can be reached, it is not an
  object (a file), and (`must_exist`) it holds something. Permission to write shows at the
  first write, the workdir lock's, before anything slow."""
  path = files.to_path(url)  # MissingFileSystemError: run_main prints how to install it
  scheme, _, rest = url.partition('://')
  bucket = f'{scheme}://{rest.split("/", 1)[0]}'
  try:
    if not files.to_path(bucket).exists():
      raise config_lib.ConfigError(f'{flag} {url}: the bucket {bucket} does not exist (or these '
                                   'credentials cannot see it)')
    if path.is_file():
      raise config_lib.ConfigError(f'{flag} {url}: is a file, not a folder')
    if must_exist and not path.is_dir():
      raise config_lib.ConfigError(f'{flag} {url}: no such folder')
  except config_lib.ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (credentials, network: one line)
    raise config_lib.ConfigError(f'{flag} {url}: cannot be read ({_one_line(e)})') from None


def _probe_writable(folder: str, what: str) -> None:
  """Raises ConfigError unless a file can be created in `folder` (an existing directory). A real
  write, not os.access: root passes every permission check but not `chattr +i` or a read-only
  mount."""
  try:
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise config_lib.ConfigError(f'{what}: cannot write in {folder} ({e.strerror})') from None


def check_folder(path: str, flag: str, writable: bool = True, must_exist: bool = False) -> None:
  """--workdir and the like: not a file; when it does not exist yet, its nearest existing parent
  takes its place (the job creates it); that folder must be writable when `writable`. A URL
  (gs://...): see _check_url_folder."""
  if files.is_url(path):
    _check_url_folder(path, flag, must_exist)
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise config_lib.ConfigError(f'{flag} {path}: is a file, not a folder')
  if must_exist and not os.path.isdir(path):
    raise config_lib.ConfigError(f'{flag} {path}: no such folder')
  existing = os.path.abspath(path)
  while not os.path.isdir(existing):
    parent = os.path.dirname(existing)
    if os.path.exists(existing) or parent == existing:  # a file on the way: makedirs fails
      raise config_lib.ConfigError(f'{flag} {path}: {existing} is a file, not a folder')
    existing = parent
  if writable:
    _probe_writable(existing, f'{flag} {path}')


def check_output_file(path: str, flag: str) -> None:
  """An output file: its folder exists and takes new files, and the file (if there) is a
  writable file. Checked before anything slow (a model) is loaded. A URL: its bucket exists and
  it is not a folder."""
  if files.is_url(path):
    _check_url_folder(path.rstrip('/').rsplit('/', 1)[0], flag, must_exist=False)
    try:
      if files.to_path(path).is_dir():
        raise config_lib.ConfigError(f'{flag} {path}: is a folder, not a file')
    except config_lib.ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise config_lib.ConfigError(f'{flag} {path}: cannot be read ({_one_line(e)})') from None
    return
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise config_lib.ConfigError(f'{flag} {path}: is a folder, not a file')
  if not os.path.isdir(folder):
    raise config_lib.ConfigError(f'{flag} {path}: the folder {folder} does not exist')
  _probe_writable(folder, f'{flag} {path}')
  if os.path.exists(path):
    try:
      with open(path, 'a', encoding='utf-8'):
        pass
    except OSError as e:
      raise config_lib.ConfigError(f'{flag} {path}: cannot write it ({e.strerror})') from None


def require_workdir(invocation: Invocation, what: str, writable: bool = True,
                    must_exist: bool = False) -> str:
  """--workdir, checked: given, not a file, (when `writable`) a folder this process can write in;
  (when `must_exist`) there already."""
  if not invocation.workdir:
    raise config_lib.ConfigError(f'--workdir is required: {what}')
  check_folder(invocation.workdir, '--workdir', writable, must_exist)
  return invocation.workdir


@dataclasses.dataclass(frozen=True)
class Built:
  """A validated config, resolved into typed parts, and what it describes on these devices."""
  cfg: config_lib.RunConfig
  mesh: Any
  rules: tuple
  model: Any
  devices: tuple


def build(config, devices=None) -> Built:
  """Validates `config` (before anything is computed), resolves it once into typed parts, and
  makes the mesh over `devices` (default: all) and the model."""
  # Before JAX starts its CPU client, if it has not yet (host_memory's arena limit).
  host_memory.keep_freed_memory(config.keep_host_memory, devices[0].platform if devices else None)
  import jax  # pylint: disable=import-outside-toplevel  (after the allocator settings)
  devices = tuple(devices if devices is not None else jax.devices())
  tasks_lib.import_modules(config.imports)  # (parse did for a command line; a program: build)
  config = file_tasks.apply(config)  # data.source: its task registered, data.task names it
  shape = config_lib.validate(config, len(devices), partitioning.num_slices(devices))
  cfg = config_lib.resolve(config)
  mesh = partitioning.make_mesh(shape, devices, config_lib.dcn_shape(cfg.mesh))
  rules = partitioning.rules_tuple(cfg.partitioning.rules)
  return Built(cfg=cfg, mesh=mesh, rules=rules, model=make_model(cfg.model, devices[0].platform),
               devices=devices)


class Stopped(BaseException):
  """Raised by the start-up SIGTERM handler where the job is: its `finally` blocks still run, and
  run_main turns it into a one-line message and exit code 0. (Not an Exception: no `except
  Exception` on the way swallows it.)"""


@contextlib.contextmanager
def sigterm_stops():
  """While inside: SIGTERM raises Stopped (once; a second SIGTERM during the clean-up is ignored).
  A job that can do better installs its own handler (train's multihost.PreemptionWatcher saves and
  stops at a step boundary) and restores this one when it is done; this covers the rest, from
  start-up on. The previous handler is back on the way out. No-op off the main thread."""

  def handle(signum, frame):
    del signum, frame
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped()

  try:
    previous = signal.signal(signal.SIGTERM, handle)
  except ValueError:  # not the main thread: signals are not ours to handle
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


STOPPED = 'stopped by SIGTERM before the first step: nothing to save yet'


def run_main(body: Callable[[], object], errors: Sequence[ErrorKind] = (),
             stopped: str = STOPPED) -> int:
  """Runs `body()`; returns 0, or the exit code of the first matching error kind (the job's own
  `errors` first, then COMMON_ERRORS) after printing `prefix: message` on stderr. A note on the
  error (`e.add_note`, e.g. the config file and line of a bad key) is printed before the message.
  SIGTERM (sigterm_stops) prints `stopped` and returns 0."""
  kinds = tuple(errors) + COMMON_ERRORS
  try:
    with sigterm_stops():
      body()
  except Stopped:
    print(stopped, file=sys.stderr)
    return 0
  except tuple(cls for cls, _, _ in kinds) as e:
    prefix, code = next((p, c) for cls, p, c in kinds if isinstance(e, cls))
    where = ''.join(f'{note}: ' for note in getattr(e, '__notes__', ()))
    print(f'{prefix}: {where}{" ".join(str(e).split())}', file=sys.stderr)
    return code
  return 0


def main(argv: Sequence[str], run: Callable[[Invocation], object], *, usage: str,
         job_flags: Sequence[Flag] = (), errors: Sequence[ErrorKind] = (),
         workdir_help: str = 'the run folder', stopped: str = STOPPED) -> int:
  """parse -> run(invocation), with errors mapped to exit codes and SIGTERM to `stopped` and exit
  code 0; what every job's main() does."""

  def body():
    invocation = parse(argv, job_flags, usage, workdir_help)
    if invocation is not None:
      run(invocation)

  return run_main(body, errors, stopped)
