"""Config errors: each names the field and what would be valid; the CLI exits non-zero."""
import json
import os
import subprocess
import sys

import pytest

from t5lite import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, 'configs', 'quickstart.py')


def load(*overrides):
  argv = ['--config', QUICKSTART] + [f'--config.{o}' for o in overrides]
  config, _ = config_lib.parse_command_line(argv)
  return config


def error_of(*overrides, devices=1):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(load(*overrides), devices)
  return str(info.value)


def test_unknown_key_names_the_field_and_the_closest_key():
  with pytest.raises(config_lib.ConfigError, match=r"train\.stepz.*train\.steps"):
    load('train.stepz=3')
  with pytest.raises(config_lib.ConfigError, match=r"'modle'.*model"):
    load('modle.d_model=3')


def test_wrong_type_names_field_and_expected_type():
  with pytest.raises(config_lib.ConfigError, match=r"train\.steps: expected int.*'ten'"):
    load('train.steps=ten')
  with pytest.raises(config_lib.ConfigError, match=r"model\.scan_layers: expected bool"):
    load('model.scan_layers=3')


def test_overrides_parse_values():
  c = load('train.steps=7', 'optimizer.learning_rate=1', 'model.scan_layers=True',
           'optimizer.name=adamw', 'mesh.data=2')
  assert (c.train.steps, c.optimizer.learning_rate, c.model.scan_layers, c.optimizer.name,
          c.mesh.data) == (7, 1.0, True, 'adamw', 2)
  assert isinstance(c.optimizer.learning_rate, float)


def test_mesh_product_must_match_devices():
  msg = error_of('mesh.data=2', 'mesh.fsdp=2', devices=8)
  assert 'config.mesh' in msg and '= 4' in msg and '8 devices' in msg
  assert config_lib.validate(load('mesh.data=-1', 'mesh.fsdp=2'), 8) == (4, 2, 1)


def test_batch_must_divide_by_data_parallel_size():
  msg = error_of('train.batch_size=12', 'mesh.data=4', 'mesh.fsdp=2', devices=8)
  assert 'train.batch_size=12' in msg and 'mesh.data*mesh.fsdp' in msg and 'multiple of 8' in msg
  msg = error_of('train.batch_size=32', 'train.microbatches=3')
  assert 'train.microbatches=3' in msg


def test_heads_times_head_dim_must_match_attention_dim():
  msg = error_of('model.num_heads=8')
  assert 'model.attention_dim=128' in msg and '8 * 32 = 256' in msg


@pytest.mark.parametrize('override, field, valid', [
    ('model.variant=v2', 'model.variant', 'v1_0, v1_1'),
    ('optimizer.name=adam', 'optimizer.name', 'adafactor, adamw'),
    ('schedule.name=cosin', 'schedule.name', 'rsqrt, cosine, wsd, constant'),
    ('model.remat_policy=some', 'model.remat_policy', 'none, minimal, full'),
])
def test_unknown_names_list_valid_choices(override, field, valid):
  msg = error_of(override)
  assert f'config.{field}=' in msg and valid in msg


def test_cli_rejects_unknown_key_before_any_compute(tmp_path):
  workdir = tmp_path / 'w'
  result = subprocess.run(
      [sys.executable, '-m', 't5lite.train', '--config', QUICKSTART, '--workdir', str(workdir),
       '--config.train.stepz=3'], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode != 0
  assert 'train.stepz' in result.stderr and 'Traceback' not in result.stderr
  assert not workdir.exists()  # nothing was started


def test_quickstart_smoke_run_through_the_command_line(tmp_path):
  workdir = tmp_path / 'w'
  env = dict(os.environ, XLA_FLAGS='')  # one device, as a newcomer's machine
  result = subprocess.run(
      [sys.executable, '-m', 't5lite.train', '--config', QUICKSTART, '--workdir', str(workdir),
       '--config.train.steps=4', '--config.train.log_every=2'],
      capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2, 4]
  for key in ('loss', 'accuracy', 'learning_rate', 'grad_norm', 'steps_per_sec', 'tokens_per_sec',
              'mfu', 'eta_seconds'):
    assert key in records[-1], key
  assert all(0 < r['loss'] < 20 for r in records)
  saved = json.load(open(workdir / 'config.json'))
  assert saved['train']['steps'] == 4
  assert any(name.startswith('events') for name in os.listdir(workdir / 'tensorboard'))
  assert 'step 4 | loss' in result.stdout


def test_nan_loss_stops_with_a_clear_message(tmp_path):
  workdir = tmp_path / 'w'
  env = dict(os.environ, XLA_FLAGS='')
  result = subprocess.run(
      [sys.executable, '-m', 't5lite.train', '--config', QUICKSTART, '--workdir', str(workdir),
       '--config.train.steps=6', '--config.train.log_every=1', '--config.optimizer.name=adamw',
       '--config.optimizer.learning_rate=1e30', '--config.schedule.name=constant',
       '--config.schedule.warmup_steps=0'],
      capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'training stopped: loss is nan' in result.stderr and 'learning_rate' in result.stderr
  assert 'Traceback' not in result.stderr


def test_unknown_task_lists_close_names_and_converter_must_fit_the_model():
  msg = error_of('data.task=embedded_span_corruptoin')
  assert "config.data.task='embedded_span_corruptoin'" in msg and 'embedded_span_corruption' in msg
  msg = error_of('data.converter=decoder')
  assert "config.data.converter='decoder'" in msg and 'encdec' in msg
