"""Config errors: each names the field and what would be valid; the CLI exits non-zero."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

import t5lite.data.catalog  # noqa: F401  (registers the built-in tasks that validate names)
from t5lite import config as config_lib
from t5lite import config_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, 'configs', 'quickstart.py')


def load(*overrides):
  """The quickstart config with `section.field=value` overrides, applied like the command line."""
  config = config_files.load_config_file(QUICKSTART)
  for override in overrides:
    config_files.set_override(config, *override.split('=', 1))
  return config


def error_of(*overrides, devices=1):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(load(*overrides), devices)
  return str(info.value)


def test_unknown_key_names_the_field_and_the_closest_key():
  with pytest.raises(config_lib.ConfigError, match=r'train\.stepz.*train\.steps'):
    load('train.stepz=3')
  with pytest.raises(config_lib.ConfigError, match=r"'modle'.*model"):
    load('modle.d_model=3')


def test_wrong_type_names_field_and_expected_type():
  with pytest.raises(config_lib.ConfigError, match=r"train\.steps: expected int.*'ten'"):
    load('train.steps=ten')
  with pytest.raises(config_lib.ConfigError, match=r'model\.scan_layers: expected bool'):
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
  result = subprocess.run([
      sys.executable, '-m', 't5lite.train', '--config', QUICKSTART, '--workdir',
      str(workdir), '--config.train.stepz=3'
  ], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode != 0
  assert 'train.stepz' in result.stderr and 'Traceback' not in result.stderr
  assert not workdir.exists()  # nothing was started


def test_quickstart_smoke_run_through_the_command_line(tmp_path):
  workdir = tmp_path / 'w'
  env = dict(os.environ, XLA_FLAGS='')  # one device, as a newcomer's machine
  result = subprocess.run([
      sys.executable, '-m', 't5lite.train', '--config', QUICKSTART, '--workdir',
      str(workdir), '--config.train.steps=4', '--config.train.log_every=2'
  ], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
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
  result = subprocess.run([
      sys.executable, '-m', 't5lite.train', '--config', QUICKSTART, '--workdir',
      str(workdir), '--config.train.steps=6', '--config.train.log_every=1',
      '--config.optimizer.name=adamw', '--config.optimizer.learning_rate=1e30',
      '--config.schedule.name=constant', '--config.schedule.warmup_steps=0'
  ], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'training stopped: the loss or gradients became non-finite at step' in result.stderr and 'learning_rate' in result.stderr
  assert 'Traceback' not in result.stderr


def test_unknown_task_lists_close_names_and_converter_must_fit_the_model():
  msg = error_of('data.task=embedded_span_corruptoin')
  assert "config.data.task='embedded_span_corruptoin'" in msg and 'embedded_span_corruption' in msg
  msg = error_of('data.converter=decoder')
  assert "config.data.converter='decoder'" in msg and 'encdec' in msg


# ---------------------------------------------------------------------------------------------
# The declarations, unknown keys in files, resolution into typed parts


def test_base_config_is_built_from_the_declarations():
  c = config_lib.base_config()
  declared = config_lib._declared()  # pylint: disable=protected-access
  assert sorted(c.keys()) == sorted(declared)
  for section, names in declared.items():
    if names is not None:
      assert sorted(c[section].keys()) == sorted(names), section
  assert c.partitioning.rules == config_lib.DEFAULT_RULES
  assert (c.train.steps, c.optimizer.name, c.data.task,
          c.keep_host_memory) == (1000, 'adafactor', 'embedded_span_corruption', True)
  assert isinstance(c.eval.tasks, tuple) and isinstance(c.checkpoint.init_rename, tuple)


def test_config_error_is_the_one_from_fields():
  from t5lite import fields
  assert config_lib.ConfigError is fields.ConfigError


def test_unknown_key_in_a_config_file_is_an_error_like_an_override(tmp_path):
  path = tmp_path / 'typo.py'
  path.write_text('from t5lite.config import base_config\n\n'
                  'def get_config(arg=None):\n'
                  '  c = base_config()\n'
                  '  c.train.stepz = 3\n'
                  '  return c\n')
  with pytest.raises(config_lib.ConfigError) as from_file:
    config_files.load_config_file(str(path))
  with pytest.raises(config_lib.ConfigError) as from_flag:
    load('train.stepz=3')
  assert str(from_file.value) == str(from_flag.value)
  assert "unknown config key 'train.stepz'. Did you mean 'train.steps'?" in str(from_file.value)
  # validate() checks the keys too: a config built in code (or by another loader) is caught there.
  c = config_lib.base_config()
  c.optimzer = 1
  with pytest.raises(config_lib.ConfigError, match=r"'optimzer'. Did you mean 'optimizer'"):
    config_lib.validate(c, 1)


def _json(tree):
  return json.loads(json.dumps(tree))


def test_resolve_gives_typed_frozen_parts_with_the_same_names():
  c = load('train.steps=7', 'eval.tasks=("fill_word",)', 'mesh.fsdp=4')
  c.checkpoint.init_ignore = ['^decoder/']  # a file may write a list: resolved as a tuple
  cfg = config_lib.resolve(c)
  assert isinstance(cfg.train, config_lib.TrainConfig) and cfg.train.steps == 7
  assert isinstance(cfg.decode, config_lib.DecodeOptions)
  assert isinstance(cfg.model, config_lib.presets.ModelConfig)
  assert cfg.eval.tasks == ('fill_word',) and cfg.checkpoint.init_ignore == ('^decoder/',)
  assert cfg.partitioning.rules == tuple(c.partitioning.rules)
  hash(cfg)  # frozen all the way down
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.train.steps = 8  # pytype: disable=not-writable
  for section in config_lib.SECTIONS:
    if section != 'model':
      assert _json(cfg.to_dict()[section]) == _json(c.to_dict()[section]), section
  assert cfg.keep_host_memory is c.keep_host_memory
  assert config_lib.resolve(cfg) is cfg
  # Validation reads the typed parts as it reads the ConfigDict.
  assert config_lib.validate(cfg, 8) == config_lib.validate(c, 8) == (2, 4, 1)
  assert config_lib.mesh_shape(cfg.mesh, 8) == (2, 4, 1)


def test_resolved_config_round_trips_to_the_config_dict():
  c = load('train.steps=7')
  cfg = config_lib.resolve(c)
  assert _json(cfg.to_dict()) == _json(c.to_dict())
  assert _json(cfg.as_config_dict().to_dict()) == _json(c.to_dict())


def test_save_config_writes_either_form(tmp_path):
  c = load('train.steps=7')
  config_files.save_config(c, str(tmp_path / 'a'))
  config_files.save_config(config_lib.resolve(c), str(tmp_path / 'b'))
  a = json.load(open(tmp_path / 'a' / 'config.json'))
  b = json.load(open(tmp_path / 'b' / 'config.json'))
  assert a['train'] == b['train'] and a['train']['steps'] == 7
  assert (tmp_path / 'b' / 'config.txt').read_text().strip()


def test_optimizer_reads_only_its_parts_and_takes_either_form():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from t5lite import optim
  for name in ('adafactor', 'adamw'):
    c = load(f'optimizer.name={name}', 'train.max_grad_norm=0.5', 'schedule.name=cosine',
             'schedule.warmup_steps=2', 'train.steps=10')
    params = {'w': jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7}
    grads = jax.tree.map(lambda p: jnp.cos(p) * 3, params)
    results = []
    for cfg in (c, config_lib.resolve(c)):
      tx, schedule = optim.make_optimizer(cfg)
      updates, _ = tx.update(grads, tx.init(params), params)
      results.append((np.asarray(updates['w']), float(schedule(5))))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize('override, message', [
    ('model.dropout_rate=1.0', 'config.model.dropout_rate=1.0: must be in [0, 1)'),
    ('schedule.decay_fraction=1.5', 'config.schedule.decay_fraction=1.5: must be in [0, 1]'),
    ('decode.top_p=0.0', 'config.decode.top_p=0.0: must be in (0, 1] (1 = off)'),
    ('train.z_loss=-1.0', 'config.train.z_loss=-1.0: must be a number >= 0'),
    ('train.steps=0', 'config.train.steps=0: must be a positive number'),
    ('checkpoint.async_save=1', 'config.checkpoint.async_save'),
    ('checkpoint.init_ignore=("(",)', "config.checkpoint.init_ignore: '(' is not a valid regex"),
    ('checkpoint.init_rename=(("a",),)', 'must be a tuple of (regex, replacement) string pairs'),
    ('partitioning.rules=(("batch", "dp"),)', "names mesh axis 'dp'; valid mesh axes: data, fsdp"),
    ('infer.on_bad_line=skp', "config.infer.on_bad_line='skp' is not valid (did you mean 'skip'?)"),
    ('model.num_encoder_layers=0', 'config.model.num_encoder_layers=0: must be a positive number'),
])
def test_table_checks_keep_their_messages(override, message):
  try:
    c = load(override)
  except config_lib.ConfigError as e:  # a type the override itself refuses
    assert message in str(e)
    return
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(c, 1)
  assert message in str(info.value)


def test_every_declared_choice_is_checked():
  for section, cls in config_lib.SECTIONS.items():
    for f in dataclasses.fields(cls):
      if f.metadata.get('choices'):
        c = config_lib.base_config()
        c[section][f.name] = 'no_such_choice'
        with pytest.raises(config_lib.ConfigError, match=rf'config\.{section}\.{f.name}='):
          config_lib.validate(c, 1)


def test_init_from_hf_shape_check_reads_either_form(tmp_path):
  from t5lite import hf
  c = load()
  hf_cfg = hf.hf_config_from_model_config(c.model)
  hf_cfg['d_model'] = c.model.d_model * 2
  (tmp_path / 'config.json').write_text(json.dumps(hf_cfg))
  config_files.set_override(c, 'checkpoint.init_from', f'hf:{tmp_path}')
  messages = []
  for cfg in (c, config_lib.resolve(c)):
    with pytest.raises(config_lib.ConfigError) as info:
      config_lib.validate(cfg, 1)
    messages.append(str(info.value))
  assert messages[0] == messages[1]
  assert f'model.d_model={c.model.d_model} but' in messages[0]
