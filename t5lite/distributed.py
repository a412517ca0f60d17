"""Multi-process start-up: decide whether this is one process of many, and initialise JAX for it.

Call `maybe_initialize` first thing in an entry point, before any other JAX call (JAX fixes the
process count and the device list the first time a backend starts). Where the settings come from,
first match wins:

1. Flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`: absl flags of the
   jobs (t5lite/cli.py), or, for a script of your own, taken out of argv by `pop_distributed_flags`
   (`setup(argv)`) so that the script's own parser never sees them.
2. Environment variables of the same meaning (what `python -m t5lite.launch.local` sets):
   T5LITE_COORDINATOR_ADDRESS, T5LITE_NUM_PROCESSES, T5LITE_PROCESS_ID. A flag overrides its variable.
3. A cluster that JAX recognises by itself: a SLURM step of more than one task, a TPU slice of more
   than one host (TPU_WORKER_HOSTNAMES with a comma, or MEGASCALE_* multislice variables), or
   T5LITE_DISTRIBUTED=auto (what launch/tpu_pod.sh sets, since a TPU VM made by `gcloud compute tpus
   tpu-vm create` keeps its worker list in the metadata server, not in the environment). Then
   `jax.distributed.initialize()` is called with no arguments and detects the rest.

T5LITE_DISTRIBUTED=off skips 3 (for a lone `python` inside an sbatch script, which would otherwise
wait for SLURM tasks that never start). Separately, `--local_device_count=K` /
T5LITE_LOCAL_DEVICE_COUNT gives this process K CPU devices, to simulate a multi-device host.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

from t5lite.fields import ConfigError

ENV = {
    'coordinator_address': 'T5LITE_COORDINATOR_ADDRESS',
    'num_processes': 'T5LITE_NUM_PROCESSES',
    'process_id': 'T5LITE_PROCESS_ID',
    'local_device_count': 'T5LITE_LOCAL_DEVICE_COUNT',
}
ENV_MODE = 'T5LITE_DISTRIBUTED'  # auto | off; unset: detect
_INT_FIELDS = ('num_processes', 'process_id', 'local_device_count')
_PROCESS_FIELDS = ('coordinator_address', 'num_processes', 'process_id')


class DistributedError(ConfigError):
  """A bad or half-given multi-process setting; the message names the flag and its variable.

  A ConfigError, so entry points report it like any other bad setting (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the flags and the environment say; None where they say nothing."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_count: int | None = None
  mode: str | None = None  # from T5LITE_DISTRIBUTED: 'auto', 'off' or None
  cluster: str | None = None  # a detected cluster ('slurm', 'tpu'), when no explicit settings

  @property
  def explicit(self) -> bool:
    return self.coordinator_address is not None


def _name(field: str) -> str:
  return f'--{field} (or {ENV[field]})'


def _to_int(field: str, raw: str, minimum: int) -> int:
  try:
    value = int(raw)
  except ValueError:
    raise DistributedError(f'{_name(field)} must be an integer, got {raw!r}') from None
  if value < minimum:
    raise DistributedError(f'{_name(field)} must be >= {minimum}, got {value}')
  return value


def pop_distributed_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """Takes `--coordinator_address`, `--num_processes`, `--process_id`, `--local_device_count`
  (as `--flag=value` or `--flag value`) out of argv. Returns (the other arguments, {field: raw
  value}); pass the dict to `resolve` or `maybe_initialize`."""
  rest, flags, args = [], {}, list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, eq, value = arg[2:].partition('=') if arg.startswith('--') else ('', '', '')
    if name in ENV:
      if not eq:  # --flag value
        if i + 1 >= len(args) or args[i + 1].startswith('--'):
          raise DistributedError(f'--{name} needs a value, e.g. --{name}='
                                 + ('127.0.0.1:12345' if name == 'coordinator_address' else '2'))
        i += 1
        value = args[i]
      flags[name] = value
    else:
      rest.append(arg)
    i += 1
  return rest, flags


def detect_cluster(environ: Mapping[str, str]) -> str | None:
  """'slurm' or 'tpu' when the environment is one process of a multi-process cluster job that
  `jax.distributed.initialize()` can configure by itself; else None. Cheap: reads variables only."""
  # SLURM: JAX's own detector needs these five; the task count is the step's (srun) when set.
  slurm_vars = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                'SLURM_LOCALID')
  if all(v in environ for v in slurm_vars):
    tasks = environ.get('SLURM_STEP_NUM_TASKS', environ['SLURM_NTASKS'])
    if tasks.isdigit() and int(tasks) > 1:
      return 'slurm'
  # TPU: several hosts in the slice, or several slices (multislice sets MEGASCALE_*).
  slices = environ.get('MEGASCALE_NUM_SLICES', '')
  if (',' in environ.get('TPU_WORKER_HOSTNAMES', '') or environ.get('MEGASCALE_COORDINATOR_ADDRESS')
      or (slices.isdigit() and int(slices) > 1)):
    return 'tpu'
  return None


def resolve(flags: Mapping[str, str] | None = None,
            environ: Mapping[str, str] | None = None) -> Settings:
  """Merges flags over environment variables, checks them, and detects a cluster. Raises
  DistributedError naming the flag for a bad value or for a half-given set."""
  flags = dict(flags or {})
  environ = os.environ if environ is None else environ
  unknown = set(flags) - set(ENV)
  if unknown:
    raise DistributedError(
        f'unknown distributed setting(s) {sorted(unknown)}; known: {sorted(ENV)}')
  raw = {}
  for field, var in ENV.items():
    value = flags.get(field, environ.get(var))
    if value is not None and value != '':
      raw[field] = value.strip()
  values: dict = {}
  if 'coordinator_address' in raw:
    address = raw['coordinator_address']
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise DistributedError(f'{_name("coordinator_address")} must be HOST:PORT, e.g. '
                             f'127.0.0.1:12345, got {address!r}')
    values['coordinator_address'] = address
  for field in _INT_FIELDS:
    if field in raw:
      values[field] = _to_int(field, raw[field], 0 if field == 'process_id' else 1)

  given = [f for f in _PROCESS_FIELDS if f in values]
  if given and len(given) < len(_PROCESS_FIELDS):
    missing = [f for f in _PROCESS_FIELDS if f not in values]
    raise DistributedError(
        f'{", ".join(_name(f) for f in given)} given without {", ".join(_name(f) for f in missing)}: '
        'a multi-process run needs all three of --coordinator_address, --num_processes and '
        '--process_id')
  if given and values['process_id'] >= values['num_processes']:
    raise DistributedError(f'{_name("process_id")}={values["process_id"]} must be below '
                           f'--num_processes={values["num_processes"]}')

  mode = environ.get(ENV_MODE, '').strip().lower() or None
  if mode not in (None, 'auto', 'off'):
    raise DistributedError(f'{ENV_MODE} must be "auto" or "off", got {mode!r}')
  cluster = None
  if not given and mode != 'off':
    cluster = 'auto' if mode == 'auto' else detect_cluster(environ)
  return Settings(mode=mode, cluster=cluster, **values)


def maybe_initialize(flags: Mapping[str, str] | Settings | None = None,
                     environ: Mapping[str, str] | None = None) -> bool:
  """Sets the local CPU device count and calls `jax.distributed.initialize` when this is one
  process of several. Must come before any other JAX call. Returns True when it initialised
  (or JAX already was), False for a single-process run."""
  settings = flags if isinstance(flags, Settings) else resolve(flags, environ)
  import jax  # importing JAX starts no backend; the first device query would

  if settings.local_device_count is not None:
    # Overrides --xla_force_host_platform_device_count in XLA_FLAGS (jax >= 0.4.31), so a value
    # inherited from a parent (the test conftest sets 8) cannot leak into a launched process.
    try:
      jax.config.update('jax_num_cpu_devices', settings.local_device_count)
    except RuntimeError as e:
      raise DistributedError(f'{_name("local_device_count")} came after JAX had started its '
                             f'backend; set it before any JAX call ({e})') from None
  if jax.distributed.is_initialized():
    return True
  if settings.explicit:
    if settings.num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                               num_processes=settings.num_processes, process_id=settings.process_id)
    return True
  if settings.cluster is not None:
    jax.distributed.initialize()  # JAX detects SLURM / TPU settings itself
    return True
  return False


def setup(argv: Sequence[str]) -> list[str]:
  """`pop_distributed_flags` + `maybe_initialize`: returns the arguments left for the caller."""
  rest, flags = pop_distributed_flags(argv)
  maybe_initialize(flags)
  return rest
