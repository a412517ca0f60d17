"""Ahead-of-time compilation for a TPU topology on a CPU host: memory per chip, fit, FLOPs.

    python -m t5lite.aot --config configs/quickstart.py:xl --topology v5e:4x4 \
        [--num_slices 2 --config.mesh.dcn_data=2] [--steps train,eval,decode] [--json] \
        [--config.mesh.fsdp=16 --config.train.batch_size=64 ...]

XLA compiles the run's real train step (and its eval step and cached decode) for the devices of
a TPU topology (jax.experimental.topologies, through libtpu: `pip install 't5lite[aot]'`)
without any TPU and without executing anything: the train state, the batch and the decode
inputs are ShapeDtypeStructs carrying the mesh's shardings, built the way training builds them
(t5lite.cli.build, trainer.abstract_train_state). The report per step and per device:
arguments, outputs, temporaries and their total against the chip's HBM (CHIPS below), the model
FLOPs per step (t5lite.reporting's formula, the one behind the logged MFU) and the step time
that implies at the chip's published bf16 peak: a lower bound, reached at 100% MFU.

`--topology local` compiles for this host's own devices instead (CPU, or a GPU on a GPU host, whose
memory limit as jax reports it is then the HBM of the verdict): XLA cannot target a GPU from a host
without one, so that is the GPU path. The same idea ships in MaxText as its train_compile tool.
"""
from __future__ import annotations

import os
import sys

if __name__ == '__main__' and not any(a in ('--topology=local', 'local') for a in sys.argv):
  # Before JAX starts: compiling for a TPU topology needs libtpu but not a TPU backend, and on a
  # host without TPUs libtpu's start-up queries a metadata server that is not there.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')

# pylint: disable=wrong-import-position
import contextlib
import dataclasses
import importlib.util
import json
import logging
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from t5lite import cli, distill, losses, optim, partitioning, reporting, trainer
from t5lite import config as config_lib
from t5lite.data import catalog  # pylint: disable=unused-import  (registers the built-in tasks)
from t5lite.data import converters
from t5lite.evaluation import evaluator
from t5lite.models import decoding
from t5lite.models.t5 import make_model

log = logging.getLogger('t5lite.aot')

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation: HBM per chip (what jax sees as one device; v4 in megacore mode) and its
  dense bf16 peak, both from Google Cloud's TPU system-architecture pages."""
  hbm_bytes: int
  peak_flops: float
  topology_options: tuple = ()  # extra options for get_topology_desc


CHIPS = {
    'v4': Chip(32 * GIB, 275e12, (('chip_config_name', 'megacore'),)),  # 2 cores, one device
    'v5e': Chip(16 * GIB, 197e12),
    'v5p': Chip(95 * GIB, 459e12),
    'v6e': Chip(32 * GIB, 918e12),
}
STEPS = ('train', 'eval', 'decode')


class AotError(config_lib.ConfigError):
  """The topology or the tool's set-up is wrong (a one-line message, exit 2)."""


def chip_of(topology: str) -> tuple[str, Chip]:
  """('v5e', its Chip) for 'v5e:4x4'."""
  name = topology.partition(':')[0].lower()
  if name not in CHIPS or ':' not in topology:
    raise AotError(f'--topology {topology!r}: expected GENERATION:SHAPE with GENERATION one of '
                   f'{", ".join(CHIPS)} (e.g. v5e:4x4, v4:2x2x4, v5p:4x4x4), or local')
  return name, CHIPS[name]


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The device descriptions of `num_slices` slices of `topology` (no TPU needed, libtpu is)."""
  _, chip = chip_of(topology)
  if importlib.util.find_spec('libtpu') is None:
    raise AotError('compiling for a TPU topology needs libtpu (about 140 MB): '
                   "pip install 't5lite[aot]'")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # libtpu takes a machine-wide lock file (/tmp/libtpu_lockfile) meant to keep two processes off
  # the same TPU chips; compiling touches no chip, so several compiling processes may share it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  options = dict(chip.topology_options)
  if num_slices > 1:
    options['num_slices'] = num_slices
  with _stderr_held():
    try:
      return list(
          topologies.get_topology_desc(topology_name=topology, platform='tpu', **options).devices)
    except (RuntimeError, ValueError) as e:
      raise AotError(
          f'--topology {topology!r}: libtpu refused it: {str(e).splitlines()[0]}') from None


@contextlib.contextmanager
def _stderr_held():
  """File descriptor 2 goes to a temporary file while inside.

  libtpu starts as a TPU host would and, on a host without TPUs, logs that it found no TPU
  accelerator type and no worker hostnames: noise when only compiling for a topology."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile('w+') as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def batch_spec(cfg, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one batch of `rows` as the run's data pipeline makes it (converter,
  lengths, packing): the converter itself is run on a one-example placeholder."""
  d = cfg.data
  lengths = converters.feature_lengths(d.converter, d.inputs_length, d.targets_length)
  example = {'inputs': np.ones(2, np.int32), 'targets': np.ones(2, np.int32)}
  features = converters.Converter(d.converter, lengths)([example], [[0]], d.pack)
  return {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype) for k, v in features.items()}


def _with_sharding(tree, sharding):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def compile_steps(built: cli.Built, steps: Sequence[str] = STEPS) -> dict[str, Any]:
  """{step name: compiled executable} for the run `built` describes, compiled for its mesh's
  devices from abstract inputs: nothing is allocated or run on them."""
  unknown = [name for name in steps if name not in STEPS]
  if unknown:  # before minutes of compiling the others
    raise AotError(f'--steps: unknown step(s) {", ".join(unknown)}; valid: {", ".join(STEPS)}')
  cfg, mesh, rules, model = built.cfg, built.mesh, built.rules, built.model
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  train_batch = batch_spec(cfg, cfg.train.batch_size // cfg.train.microbatches)
  tx, schedule = optim.make_optimizer(cfg)
  state, shardings = trainer.abstract_train_state(model, tx, mesh, rules, train_batch,
                                                  cfg.train.seed)
  compiled = {}
  for name in steps:
    if name == 'train':
      batch = _with_sharding(batch_spec(cfg, cfg.train.batch_size), batch_sharding)
      teacher = _abstract_teacher(cfg, mesh, rules, train_batch)
      step = trainer.jit_train_step(
          trainer.make_train_step(model, tx, schedule, cfg.train, dropout=cfg.model.dropout_rate
                                  > 0, teacher_model=teacher and teacher.model), shardings, mesh,
          rules, teacher_shardings=teacher and teacher.shardings)
      teacher_args = (teacher.params,) if teacher else ()
      compiled[name] = step.lower(state, batch, *teacher_args).compile()
    elif name == 'eval':
      batch = _with_sharding(batch_spec(cfg, cfg.eval.batch_size or cfg.train.batch_size),
                             batch_sharding)
      step = trainer.make_eval_step(model, shardings.params, mesh, rules)
      compiled[name] = step.lower(state.params, batch).compile()
    else:
      compiled[name] = _compile_decode(built, state.params, batch_sharding)
  return compiled


def _abstract_teacher(cfg, mesh, rules, train_batch) -> distill.Teacher | None:
  """A distillation teacher (train.distill_teacher) as the train step takes it, its params
  abstract on the mesh: the compiled step runs its forward pass and holds its params, so the
  memory report counts both. Only the teacher's config is read."""
  teacher_cfg = distill.teacher_config(cfg.train, cfg.model)
  if teacher_cfg is None:
    return None
  teacher_model = make_model(teacher_cfg.model, mesh.devices.flat[0].platform)
  params, shardings = partitioning.abstract_params(teacher_model, mesh, rules,
                                                   losses.model_inputs(train_batch))
  return distill.Teacher(model=teacher_model, params=params, shardings=shardings,
                         source=teacher_cfg.path)


def _compile_decode(built: cli.Built, params, batch_sharding):
  """The cached decode of an eval batch (config.decode's method, evaluation's lengths)."""
  cfg, model = built.cfg, built.model
  inputs_length, targets_length = evaluator.lengths(cfg)
  rows = cfg.eval.batch_size or cfg.train.batch_size
  key = 'encoder_input_tokens' if cfg.model.architecture == 'encoder_decoder' else (
      'decoder_prompt_tokens')
  batch = {key: jax.ShapeDtypeStruct((rows, inputs_length), jnp.int32, sharding=batch_sharding)}
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=NamedSharding(built.mesh, P()))
  decode = decoding.jitted_decode(model, evaluator.decode_config(cfg, targets_length), built.mesh,
                                  built.rules, prefix_lm=cfg.data.converter == 'prefix_lm')
  return decode.lower(params, batch, rng).compile()


@dataclasses.dataclass
class StepReport:
  """One compiled step on one device (bytes): what `memory_analysis` says, and the fit."""
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  hbm: int | None

  @property
  def total(self) -> int:
    """Live at the peak: arguments + outputs not aliased to an argument + temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @property
  def fits(self) -> bool | None:
    return None if self.hbm is None else self.total + self.code <= self.hbm


def step_report(compiled, hbm: int | None) -> StepReport:
  m = compiled.memory_analysis()
  return StepReport(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                    aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                    code=m.generated_code_size_in_bytes, hbm=hbm)


def _memory_limit(device) -> int | None:
  """What XLA may allocate on a local accelerator (a GPU's or TPU's memory_stats); None on CPU."""
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):
    stats = None
  return (stats or {}).get('bytes_limit')


def run(config, topology: str, num_slices: int = 1, steps: Sequence[str] = STEPS) -> dict:
  """Compiles `steps` of `config` for `num_slices` slices of `topology` ('local': this host's
  devices); returns the report as a JSON-ready dict (also what --json prints)."""
  if topology == 'local':
    devices = jax.devices()
    chip_name, hbm = devices[0].device_kind, _memory_limit(devices[0])
    peak = next(
        (flops for kind, flops in reporting.KNOWN_PEAK_FLOPS.items() if chip_name.startswith(kind)),
        0.0)
  else:
    chip_name, chip = chip_of(topology)
    devices = topology_devices(topology, num_slices)
    hbm, peak = chip.hbm_bytes, chip.peak_flops
  built = cli.build(config, devices)
  cfg = built.cfg
  compiled = compile_steps(built, steps)
  n_params = sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(
          partitioning.abstract_params(built.model, built.mesh, built.rules)[0]))
  train_lengths = converters.feature_lengths(cfg.data.converter, cfg.data.inputs_length,
                                             cfg.data.targets_length)
  flops = reporting.train_flops_per_step(
      cfg.model, cfg.train.batch_size,
      train_lengths.get('inputs', 0) if cfg.model.architecture == 'encoder_decoder' else 0,
      train_lengths['targets'])
  report = {
      'topology': topology, 'num_slices': num_slices, 'chip': chip_name, 'devices': len(devices),
      'mesh': dict(built.mesh.shape), 'model': {
          'size': cfg.model.size, 'params': n_params, 'dtype': cfg.model.dtype,
          'kernels': built.model.cfg.kernels, 'remat_policy': cfg.model.remat_policy,
          'scan_layers': cfg.model.scan_layers
      }, 'batch_size': cfg.train.batch_size, 'microbatches': cfg.train.microbatches,
      'lengths': train_lengths, 'optimizer': cfg.optimizer.name, 'hbm_per_device_bytes': hbm,
      'train_flops_per_step': flops, 'peak_flops_per_device': peak,
      'step_seconds_at_peak': flops / (peak * len(devices)) if peak else None, 'steps': {}
  }
  teacher = _abstract_teacher(cfg, built.mesh, built.rules,
                              batch_spec(cfg, cfg.train.batch_size // cfg.train.microbatches))
  if teacher:  # its params are arguments of the train step (counted in its memory)
    report['teacher'] = {
        'path': teacher.source, 'dtype': teacher.model.cfg.dtype,
        'params': sum(int(np.prod(x.shape)) for x in jax.tree.leaves(teacher.params))
    }
  for name, executable in compiled.items():
    r = step_report(executable, hbm)
    report['steps'][name] = {**dataclasses.asdict(r), 'total': r.total, 'fits': r.fits}
  return report


def _gib(n: int | None) -> str:
  return '-' if n is None else f'{n / GIB:.2f}'


def format_report(report: dict) -> str:
  """The report as the table the tool prints."""
  m = report['model']
  lines = [
      f'{report["topology"]} x{report["num_slices"]} ({report["chip"]}, {report["devices"]} '
      f'devices) mesh {report["mesh"]}',
      f'model {m["size"]} {m["params"]:,} params, {m["dtype"]}, kernels {m["kernels"]}, remat '
      f'{m["remat_policy"]}, scan {m["scan_layers"]} | batch {report["batch_size"]} '
      f'(microbatches {report["microbatches"]}) lengths {report["lengths"]} | '
      f'{report["optimizer"]}',
  ]
  if 'teacher' in report:
    t = report['teacher']
    lines.append(f'distilling: teacher {t["params"]:,} params, {t["dtype"]} ({t["path"]}), '
                 'its params and forward pass in the train step')
  lines += [
      '',
      f'{"step":<8}{"args":>9}{"outputs":>9}{"aliased":>9}{"temp":>9}{"total":>9}{"HBM":>9}  '
      'GiB per device',
  ]
  for name, s in report['steps'].items():
    verdict = {True: 'fits', False: 'DOES NOT FIT', None: ''}[s['fits']]
    lines.append(f'{name:<8}{_gib(s["arguments"]):>9}{_gib(s["outputs"]):>9}'
                 f'{_gib(s["aliased"]):>9}{_gib(s["temporaries"]):>9}{_gib(s["total"]):>9}'
                 f'{_gib(s["hbm"]):>9}  {verdict}')
  flops, peak = report['train_flops_per_step'], report['peak_flops_per_device']
  lines.append('')
  if peak:
    lines.append(f'train step: {flops / 1e12:.1f} TFLOP (model FLOPs); at the bf16 peak of '
                 f'{peak / 1e12:.0f} TFLOP/s x {report["devices"]} devices: '
                 f'{report["step_seconds_at_peak"] * 1e3:.1f} ms per step (100% MFU)')
  else:
    lines.append(f'train step: {flops / 1e12:.1f} TFLOP (model FLOPs); no published peak for '
                 f'{report["chip"]}')
  return '\n'.join(lines)


FLAGS = (
    cli.Flag(
        'topology', '', 'GENERATION:SHAPE (v4:2x2x4, v5e:4x4, v5e:16x16, v5p:4x4x4, '
        'v6e:8x8) to compile for on this host, or local (this host\'s devices; the GPU path)', str),
    cli.Flag(
        'num_slices', 1, 'slices of the topology joined by DCN (multislice; set '
        'config.mesh.dcn_* to use them)'),
    cli.Flag('steps', ','.join(STEPS), 'comma-separated steps to compile: train, eval, decode'),
    cli.Flag('json', False, 'print the report as JSON instead of a table'),
)


def main(argv: Sequence[str]) -> int:

  def job(invocation: cli.Invocation):
    o = invocation.options
    if not o['topology']:
      raise AotError('--topology is required, e.g. --topology v5e:4x4 (or local)')
    if o['topology'].startswith(('gpu', 'cuda', 'h100', 'a100')):
      raise AotError(f'--topology {o["topology"]}: compiling for a GPU is not supported without a '
                     'GPU (XLA needs the CUDA device to target it); on a GPU host use --topology '
                     'local')
    steps = [s.strip() for s in o['steps'].split(',') if s.strip()]
    report = run(invocation.config, o['topology'], o['num_slices'], steps)
    print(json.dumps(report, indent=1) if o['json'] else format_report(report), flush=True)

  return cli.main(argv, job, usage=__doc__, errors=[(AotError, 'aot error', 2)], job_flags=FLAGS)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
