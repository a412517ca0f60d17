"""Fine-tuning from a checkpoint (config.checkpoint.init_from / init_rename / init_ignore): params
only, fresh optimizer and step, renames, and errors that name the parameters."""
import importlib.util
import os

import jax
import ml_collections
import numpy as np
import pytest

from t5lite import checkpoints, init_from, train
from t5lite.config import ConfigError, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('quickstart',
                                               os.path.join(REPO, 'configs', 'quickstart.py'))
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)


def tiny_config(steps, seed=0, **checkpoint):
  c = quickstart.get_config()
  c.model.dtype = 'float32'
  c.data.inputs_length = 32
  c.train.update(steps=steps, batch_size=8, log_every=1, seed=seed)
  # Linear warm-up from 0: the first step's learning rate is 0, so a fine-tune's step 1 leaves the
  # loaded params unchanged and its checkpoint shows them exactly.
  c.schedule.warmup_steps = 100
  c.reporting.update(tensorboard=False, peak_flops_per_device=1e11)
  c.checkpoint.update(every_steps=0, async_save=False, **checkpoint)
  return c


@pytest.fixture(scope='module')
def run_a(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('a'))
  train.run(tiny_config(2), workdir)
  step, state = checkpoints.restore_as_numpy(workdir)
  assert step == 2
  return workdir, state


def abstract_of(params, edit=None):
  """ShapeDtypeStructs on one device for a (possibly edited) copy of A's param tree."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
  return edit(tree) if edit else tree


def test_finetune_starts_from_the_params_with_a_fresh_optimizer_and_resume_wins(
    run_a, tmp_path, capsys):
  workdir_a, state_a = run_a
  config = tiny_config(1, seed=1, init_from=os.path.join(workdir_a, 'checkpoints'))
  train.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert f'initialised params from {os.path.join(workdir_a, "checkpoints", "2")}' in out
  step, state_b = checkpoints.restore_as_numpy(str(tmp_path))
  assert step == 1 and int(state_b['step']) == 1  # counted from 0, not from A's 2
  # lr 0 at step 1: B's params are A's final ones, bit for bit (seed 1's fresh init differs).
  for x, y in zip(jax.tree.leaves(state_a['params']), jax.tree.leaves(state_b['params'])):
    assert np.array_equal(x, y)
  # A fresh AdamW: its step count is 1 and the moments hold one gradient, not A's two.
  counts = [int(x) for x in jax.tree.leaves(state_b['opt_state']) if np.ndim(x) == 0]
  assert counts and set(counts) == {1}, counts

  # Run B again with more steps: its own checkpoint (step 1) wins over init_from.
  train.run(tiny_config(2, seed=1, init_from=os.path.join(workdir_a, 'checkpoints')), str(tmp_path))
  out = capsys.readouterr().out
  assert 'resumed from the checkpoint of step 1' in out and 'initialised params' not in out


def test_loader_matches_the_restored_params(run_a):
  workdir_a, state_a = run_a
  loaded = init_from.load_params_for_init(workdir_a, abstract_of(state_a['params']))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), loaded,
               state_a['params'])


def rename_top(tree, old, new):
  tree = dict(tree)
  tree[new] = tree.pop(old)
  return tree


def test_rename_maps_checkpoint_names_onto_the_model(run_a):
  workdir_a, state_a = run_a
  abstract = abstract_of(state_a['params'], lambda t: rename_top(t, 'encoder', 'enc'))
  with pytest.raises(checkpoints.CheckpointError) as e:
    init_from.load_params_for_init(workdir_a, abstract)
  message = str(e.value)
  assert 'model params not in the checkpoint' in message and 'enc/' in message
  assert 'checkpoint params the model has no place for' in message and 'encoder/' in message
  assert 'init_rename' in message and 'init_ignore' in message
  assert '... and' in message  # only the first few are listed

  loaded = init_from.load_params_for_init(workdir_a, abstract, rename=(('^encoder/', 'enc/'),))
  expected = rename_top(state_a['params'], 'encoder', 'enc')
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), loaded, expected)


def test_shape_mismatch_names_the_param_and_both_shapes(run_a):
  workdir_a, state_a = run_a
  name, x = next((init_from._path_name(p), x)  # pylint: disable=protected-access
                 for p, x in jax.tree_util.tree_leaves_with_path(state_a['params']) if x.ndim == 2)

  def widen(tree):
    return jax.tree_util.tree_map_with_path(lambda p, s: jax.ShapeDtypeStruct(
        (s.shape[0], s.shape[1] * 2), s.dtype, sharding=s.sharding)
                                            if init_from._path_name(p) == name else s, tree)  # pylint: disable=protected-access

  with pytest.raises(checkpoints.CheckpointError) as e:
    init_from.load_params_for_init(workdir_a, abstract_of(state_a['params'], widen))
  assert (f'{name}: checkpoint {x.shape} vs model {(x.shape[0], x.shape[1] * 2)}'
          in str(e.value)), str(e.value)


def test_ignore_keeps_fresh_params_and_drops_checkpoint_ones(run_a):
  workdir_a, state_a = run_a

  def add_head(tree):
    tree = dict(tree)
    tree['new_head'] = {'kernel': jax.ShapeDtypeStruct((4, 3), np.float32)}
    return tree

  abstract = abstract_of(state_a['params'], add_head)
  with pytest.raises(checkpoints.CheckpointError, match='new_head/kernel'):
    init_from.load_params_for_init(workdir_a, abstract)
  loaded = init_from.load_params_for_init(workdir_a, abstract, ignore=('^new_head/',))
  assert isinstance(loaded['new_head']['kernel'], jax.ShapeDtypeStruct)
  fresh = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), abstract)
  merged = init_from.merge_init_params(fresh, loaded)
  assert np.all(merged['new_head']['kernel'] == 7.0)
  np.testing.assert_array_equal(np.asarray(merged['encoder']['relpos_bias']['rel_embedding']),
                                state_a['params']['encoder']['relpos_bias']['rel_embedding'])

  # An ignore rule also drops checkpoint params the model no longer has.
  dropped = abstract_of(state_a['params'], lambda t: {k: v for k, v in t.items() if k != 'decoder'})
  with pytest.raises(checkpoints.CheckpointError, match='no place for'):
    init_from.load_params_for_init(workdir_a, dropped)
  loaded = init_from.load_params_for_init(workdir_a, dropped, ignore=('^decoder/',))
  assert set(loaded) == set(dropped)


def test_config_fields_are_validated():
  for field, value in (('init_from', 3), ('init_rename', ('a', 'b')), ('init_ignore', (1,)),
                       ('init_ignore', ('(',))):
    c = tiny_config(1)
    # A fresh ConfigDict: the default one's type safety would refuse an int for a str field.
    c.checkpoint = ml_collections.ConfigDict(dict(c.checkpoint.to_dict(), **{field: value}))
    with pytest.raises(ConfigError, match=f'config.checkpoint.{field}'):
      validate(c, 1)
