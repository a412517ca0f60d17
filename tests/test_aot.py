"""python -m t5lite.aot: the real steps compiled for TPU topologies on this CPU host (libtpu from
the test extras), the memory report checked against parameter counts computed by hand, the
multislice mesh, and the tool's errors."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5lite import aot, cli, partitioning
from t5lite import config as config_lib
from t5lite import config_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20


def t5_1_1_params(d_model, d_ff, heads, head_dim, enc_layers, dec_layers, vocab, buckets=32):
  """T5.1.1's parameter count from its shapes (independent of the model code): untied embedding
  and logits, q/k/v/o per attention, gated-GELU MLP (wi_0, wi_1, wo), one norm scale per block
  and per stack, one relative-position table per stack."""
  attention = 4 * d_model * heads * head_dim
  mlp = 3 * d_model * d_ff
  encoder = enc_layers * (attention + mlp + 2 * d_model) + d_model + buckets * heads
  decoder = dec_layers * (2 * attention + mlp + 3 * d_model) + d_model + buckets * heads
  return 2 * vocab * d_model + encoder + decoder


def test_t5_1_1_small_has_its_published_parameter_count():
  # google/t5-v1_1-small: 76,961,152 parameters (the count HuggingFace's model reports).
  assert t5_1_1_params(512, 1024, 6, 64, 8, 8, 32128) == 76_961_152


def run_tool(*args):
  env = dict(os.environ)
  env.pop('JAX_PLATFORMS', None)  # the tool sets it itself, as for a user
  return subprocess.run([sys.executable, '-m', 't5lite.aot', *args], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=600, check=False)


def test_the_quickstart_compiles_for_v5e_2x2_and_reports_its_memory():
  done = run_tool('--config', 'configs/quickstart.py', '--topology', 'v5e:2x2', '--json')
  assert done.returncode == 0, done.stderr
  assert 'Failed to find host bounds' not in done.stderr  # libtpu's start-up noise is held back
  report = json.loads(done.stdout)
  assert report['devices'] == 4 and report['chip'] == 'v5e'
  assert report['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert report['model']['kernels'] == 'xla'  # 'auto' on TPU: the plain XLA path
  tiny = t5_1_1_params(128, 256, 4, 32, 2, 2, 2048)
  assert report['model']['params'] == tiny
  train = report['steps']['train']
  # Data parallel: every device holds all float32 params (plus Adafactor's small factored state
  # and a quarter of the batch), and the donated state is aliased to the output.
  assert tiny * 4 <= train['arguments'] <= tiny * 4 * 1.3 + MIB
  assert train['aliased'] >= tiny * 4
  assert train['hbm'] == 16 * 2**30 and train['fits'] is True
  assert set(report['steps']) == {'train', 'eval', 'decode'}  # every step, by default
  for step in report['steps'].values():
    assert tiny * 4 <= step['arguments'] and step['fits'] is True  # eval and decode take params
  assert report['step_seconds_at_peak'] == pytest.approx(report['train_flops_per_step'] /
                                                         (4 * 197e12))


def small_config(**mesh):
  config = config_files.load_config_file('configs/pretrain_c4.py:small')
  config.data.inputs_length = 64  # short sequences: a faster compile, the same parameters
  config.train.batch_size = 8
  for axis, size in mesh.items():
    config.mesh[axis] = size
  return config


def test_t5_1_1_small_fsdp_over_v5e_2x2_holds_a_quarter_of_the_params_per_chip():
  report = aot.run(small_config(data=1, fsdp=4), 'v5e:2x2', steps=('train',))
  params = t5_1_1_params(512, 1024, 6, 64, 8, 8, 32128)
  assert report['model']['params'] == params
  train = report['steps']['train']
  # fsdp=4 splits every parameter along d_model: a quarter of the float32 bytes per chip, plus
  # Adafactor's factored statistics (replicated vectors) and the batch.
  assert params * 4 / 4 <= train['arguments'] <= params * 4 / 4 * 1.3 + MIB
  assert train['fits'] is True


def test_two_slices_make_a_hybrid_mesh_whose_data_axis_crosses_the_dcn():
  config = config_files.load_config_file('configs/quickstart.py')
  config.mesh.dcn_data = 2
  devices = aot.topology_devices('v5e:2x2', num_slices=2)
  built = cli.build(config, devices)
  assert dict(built.mesh.shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  slices = np.vectorize(lambda d: d.slice_index)(built.mesh.devices).reshape(-1)
  assert list(slices) == [0, 0, 0, 0, 1, 1, 1, 1]  # each slice holds one half of the data axis
  compiled = aot.compile_steps(built, ('train',))
  assert compiled['train'].memory_analysis().argument_size_in_bytes > 0


def test_an_fsdp_axis_of_64_on_a_16x16_slice_splits_a_physical_axis():
  # No product of whole physical axes (16, 16) is 64: the layout splits one, as jax allows.
  mesh = partitioning.make_mesh((4, 64, 1), aot.topology_devices('v5e:16x16'))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 64, 'tensor': 1}
  assert len({d.id for d in mesh.devices.flat}) == 256


def test_slices_without_a_dcn_axis_are_refused_with_the_fix():
  config = config_files.load_config_file('configs/quickstart.py')
  with pytest.raises(config_lib.ConfigError, match=r'mesh.dcn_data=2'):
    cli.build(config, aot.topology_devices('v5e:2x2', num_slices=2))


def write_hf_teacher(config, directory) -> str:
  """hf:DIR of a teacher twice the width of config.model (its config.json alone: the AOT tool
  reads only a teacher's config)."""
  from t5lite import hf  # pylint: disable=import-outside-toplevel
  teacher = config.model.copy_and_resolve_references()
  teacher.update(d_model=2 * config.model.d_model, d_ff=2 * config.model.d_ff)
  os.makedirs(directory)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf.hf_config_from_model_config(teacher), f)
  return 'hf:' + str(directory)


def test_local_devices_compile_every_step_without_an_hbm_verdict_and_count_a_teacher(tmp_path):
  config = config_files.load_config_file('configs/quickstart.py')
  config.mesh.fsdp = 2
  config.mesh.tensor = 2
  # Distillation: the train step runs the teacher's forward pass and holds its params.
  config.train.distill_teacher = write_hf_teacher(config, tmp_path / 'teacher')
  report = aot.run(config, 'local', steps=('train', 'eval', 'decode'))
  assert report['devices'] == len(jax.devices()) == 8
  assert report['model']['kernels'] == 'tuned'  # 'auto' on CPU
  assert set(report['steps']) == {'train', 'eval', 'decode'}
  for step in report['steps'].values():
    assert step['arguments'] > 0 and step['hbm'] is None and step['fits'] is None

  s = report['model']
  t = report['teacher']
  v, d, f, heads, kv = 2048, 2 * 128, 2 * 256, 4, 32  # the quickstart's shape, twice as wide
  assert t['params'] == (2 * v * d + 2 * (4 * d * heads * kv + 3 * d * f + 2 * d) + d + 2 *
                         (8 * d * heads * kv + 3 * d * f + 3 * d) + d + 2 * 32 * heads)
  assert s['params'] * 2 < t['params']
  # Without the teacher the train step's arguments are the student's state (params and
  # Adafactor's factored statistics) and a batch, here sharded fsdp x tensor = 4 ways: well under
  # the student's and teacher's float32 bytes over 4, which they are at least with it.
  both = (s['params'] + t['params']) * 4 / 4
  assert both <= report['steps']['train']['arguments'] <= 1.3 * both + MIB
  assert 'distilling: teacher' in aot.format_report(report)


@pytest.mark.parametrize('topology, message', [
    ('gpu', 'not supported without a GPU'),
    ('v9:2x2', 'expected GENERATION:SHAPE'),
    ('v5e:3x3', 'libtpu refused it'),
    ('local --steps train,backward', 'unknown step(s) backward'),
])
def test_bad_topologies_get_one_line_and_exit_2(topology, message, capsys):
  topology, *extra = topology.split()
  code = aot.main(['--config', 'configs/quickstart.py', '--topology', topology, *extra])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0]


def test_without_libtpu_the_tool_says_how_to_install_it(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None
                      if name == 'libtpu' else real(name, *a))
  with pytest.raises(aot.AotError, match=r"pip install 't5lite\[aot\]'"):
    aot.topology_devices('v5e:2x2')


@pytest.mark.parametrize(
    'size, shape',
    [
        ('small', (512, 1024, 6, 64, 8, 8)),
        ('xxl', (4096, 10240, 64, 64, 24, 24)),
        ('ul2_20b', (4096, 16384, 16, 256, 32, 32)),  # UL2-20B's shape (Tay et al. 2022)
    ])
def test_the_scaling_configs_build_the_published_shapes(size, shape):
  config = config_files.load_config_file(f'configs/pretrain_c4.py:{size}')
  built = cli.build(config, jax.devices()[:1])
  params = partitioning.abstract_params(built.model, built.mesh, built.rules)[0]
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert count == t5_1_1_params(*shape, 32128)
  assert built.cfg.data.inputs_length == 512 and built.cfg.model.remat_policy == 'full'
