"""The gated MLP activations (gated-gelu, gated-silu, gated-relu) have the same parameter shapes,
so a checkpoint's activation is compared by name: on resume (Checkpointer.check_compatible) and
for checkpoint.init_from of a t5lite checkpoint (config validation, before any compute)."""
import json
import os

import jax.numpy as jnp
import pytest

from t5lite import checkpoints, config_files
from t5lite import config as config_lib
from t5lite.data import catalog  # pylint: disable=unused-import  (registers the built-in tasks)
from t5lite.models import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_activation_of_a_saved_model():
  assert presets.activation_of({'variant': 'v1_1'}) == 'gated-gelu'  # saved before the field
  assert presets.activation_of({'variant': 'v1_0', 'mlp_activation': ''}) == 'relu'
  assert presets.activation_of({'variant': 'v1_1', 'mlp_activation': 'gated-silu'}) == 'gated-silu'
  assert presets.activation_of({}) is None


@pytest.fixture()
def silu_workdir(tmp_path):
  """A checkpoint whose saved config says gated-SiLU (the quickstart's shapes do not matter)."""
  config = config_files.load_config_file(os.path.join(REPO, 'configs', 'quickstart.py'))
  config.model.mlp_activation = 'gated-silu'
  state = {'params': {'w': jnp.zeros((2, 3))}}
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  saved = json.loads(json.dumps(config.to_dict(), default=str))
  ckpt.save(5, state, {}, saved)
  ckpt.close()
  return str(tmp_path), state, saved


def test_resume_refuses_another_activation_of_the_same_shapes(silu_workdir):
  workdir, state, saved = silu_workdir
  ckpt = checkpoints.Checkpointer(workdir, async_save=False)
  try:
    ckpt.check_compatible(5, state, saved)  # the same config: fine
    gelu = {**saved, 'model': {**saved['model'], 'mlp_activation': ''}}  # v1_1's gated-gelu
    with pytest.raises(
        checkpoints.CheckpointError,
        match='trained with the MLP activation gated-silu, but this config '
        'computes gated-gelu; set --config.model.mlp_activation=gated-silu'):
      ckpt.check_compatible(5, state, gelu)
  finally:
    ckpt.close()


def test_init_from_refuses_another_activation_before_any_compute(silu_workdir):
  workdir, _, _ = silu_workdir
  config = config_files.load_config_file(os.path.join(REPO, 'configs', 'quickstart.py'))
  config.checkpoint.init_from = workdir
  with pytest.raises(
      config_lib.ConfigError, match='computes the MLP activation gated-gelu, but the model of '
      f'checkpoint.init_from={workdir} was trained with gated-silu'):
    config_lib.validate(config, 1)
  config.model.mlp_activation = 'gated-silu'
  config_lib.validate(config, 1)
