"""Freezing (config.train.trainable): frozen params stay bitwise unchanged, get no gradient work
and no optimizer state (measured), with sharding, scan_layers, init_from, checkpoints and exact
resume; a regex that matches nothing is a config error naming it."""
import importlib.util
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from t5lite import checkpoints, cli, optim, partitioning, train, trainer
from t5lite.config import ConfigError, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('quickstart',
                                               os.path.join(REPO, 'configs', 'quickstart.py'))
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)

DECODER = ('^decoder/',)


def tiny_config(steps, **overrides):
  c = quickstart.get_config()
  c.model.dtype = 'float32'
  c.data.inputs_length = 32
  c.train.update(steps=steps, batch_size=8, log_every=1)
  # constant after a short warm-up: the schedule does not depend on train.steps, so a shorter run
  # is a prefix of a longer one
  c.schedule.update(name='constant', warmup_steps=2)
  c.reporting.update(tensorboard=False, peak_flops_per_device=1e11)
  c.checkpoint.update(every_steps=2, keep=0, async_save=False)
  c.eval.every_steps = 0
  for dotted, value in overrides.items():
    section, name = dotted.split('__')
    c[section][name] = value
  return c


def opt_state_bytes(config):
  """(bytes of the optimizer state's leaves, names of the params that have state) for a config,
  traced only (jax.eval_shape: nothing allocated)."""
  built = cli.build(config, jax.devices())
  tx, _ = optim.make_optimizer(built.cfg)
  batch = partitioning.example_inputs(built.model, 8, 32)
  batch = {
      **batch, 'decoder_target_tokens': batch['decoder_input_tokens'],
      'decoder_loss_weights': batch['decoder_input_tokens']
  }
  abstract, shardings = trainer.abstract_train_state(built.model, tx, built.mesh, built.rules,
                                                     batch, 0)
  leaves = jax.tree.leaves(abstract.opt_state)
  names = {optim.param_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract.opt_state)}
  # the shardings follow the structure (a frozen param's MaskedNode has none)
  assert jax.tree.structure(shardings.opt_state) == jax.tree.structure(abstract.opt_state)
  return sum(x.size * x.dtype.itemsize for x in leaves), names


@pytest.mark.parametrize('optimizer', ['adafactor', 'adamw'])
def test_frozen_params_have_no_optimizer_state(optimizer):
  full = tiny_config(1, optimizer__name=optimizer, mesh__fsdp=2, mesh__tensor=2)
  frozen = tiny_config(1, optimizer__name=optimizer, mesh__fsdp=2, mesh__tensor=2,
                       train__trainable=DECODER, train__max_grad_norm=1.0)
  full_bytes, full_names = opt_state_bytes(full)
  frozen_bytes, frozen_names = opt_state_bytes(frozen)
  assert any('encoder/' in n for n in full_names)
  assert not any('encoder/' in n or 'token_embedder' in n for n in frozen_names), frozen_names
  assert any('decoder/' in n for n in frozen_names)
  assert frozen_bytes < full_bytes
  print(f'{optimizer}: optimizer state {full_bytes} bytes full, {frozen_bytes} with '
        f'trainable={DECODER}')


def test_a_regex_matching_nothing_is_a_config_error():
  config = tiny_config(1, train__trainable=('^decoder/', '^encodr/'))
  with pytest.raises(ConfigError, match="'\\^encodr/' match.* no parameter name"):
    opt_state_bytes(config)
  bad = tiny_config(1, train__trainable=('(',))
  with pytest.raises(ConfigError, match='train.trainable'):
    validate(bad, 8)


def test_mask_and_stop_gradient():
  params = {'encoder': {'k': np.ones(3)}, 'decoder': {'k': np.full(3, -0.0)}}
  mask = optim.trainable_mask(params, ('^enc',))
  assert mask == {'encoder': {'k': True}, 'decoder': {'k': False}}
  loss = lambda p: (p['encoder']['k'] * p['decoder']['k']).sum() + p['decoder']['k'].sum()
  grads = jax.grad(optim.frozen_stop_gradient(loss, ('^enc',)))(params)
  np.testing.assert_array_equal(grads['decoder']['k'], 0.0)
  np.testing.assert_array_equal(grads['encoder']['k'], -0.0)
  # -0.0 + 0.0 is +0.0: keep_frozen keeps the old bits
  moved = optax.apply_updates(params, jax.tree.map(np.zeros_like, params))
  kept = optim.keep_frozen(moved, params, ('^enc',))
  assert np.signbit(kept['decoder']['k']).all() and not np.signbit(moved['decoder']['k']).any()


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A one-step run all of whose params moved: init_from's source."""
  workdir = str(tmp_path_factory.mktemp('source'))
  train.run(tiny_config(1), workdir)
  return workdir, checkpoints.restore_as_numpy(workdir)[1]


@pytest.mark.parametrize('scan', [False, True])
def test_frozen_bitwise_with_init_from_sharding_scan_and_resume(source, tmp_path, scan):
  workdir, start = source
  config = tiny_config(4, train__trainable=DECODER, mesh__fsdp=2, mesh__tensor=2,
                       model__scan_layers=scan, checkpoint__init_from=workdir)
  if scan:  # the source is unscanned: a scanned model takes it as a new run from a fresh init
    config.checkpoint.init_from = ''
  run = str(tmp_path / 'run')
  train.run(config, run)
  step, end = checkpoints.restore_as_numpy(run)
  assert step == 4
  _, first = checkpoints.restore_as_numpy(run, 2)
  reference = first if scan else start
  for top in end['params']:
    for a, b in zip(jax.tree.leaves(reference['params'][top]), jax.tree.leaves(end['params'][top])):
      if top == 'decoder':
        assert not np.array_equal(a, b), top  # trained
      else:
        assert np.array_equal(a, b), top  # frozen: the same bits
  if scan:
    return
  # interrupted after the save of step 2 (kill -9): the resume gives the same step 4, bitwise
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(run, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  train.run(config, resumed)
  _, again = checkpoints.restore_as_numpy(resumed)
  jax.tree.map(np.testing.assert_array_equal, again, end)
