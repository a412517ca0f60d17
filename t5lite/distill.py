"""Knowledge distillation's teacher: its model config, its params on the run's mesh.

`train.distill_teacher` names a t5lite checkpoint (a workdir, checkpoints directory or step
directory: the model config is the one the checkpoint saved, as t5lite-to-hf reads it) or `hf:DIR`
(a HuggingFace T5: its config.json, as hf-to-t5lite reads it). `teacher_config` reads only the
config and checks it against the student (the same vocab_size and architecture) before anything
is computed; `load_teacher` then reads its params once, onto the shardings the same logical rules
give its own model. The params are not part of the train state (never saved, never updated): a
resumed run reads them again: from the same step directory, because `pin` records the step a
workdir or checkpoints directory named when the run began (WORKDIR/distill_teacher.json), so a
teacher that trains on meanwhile does not change a resumed run. The loss itself is in trainer.make_train_step and losses.py
(kl_divergence_sum): the teacher runs in the same jitted step, its logits under stop_gradient.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import flax.linen as nn
import jax

from t5lite import checkpoints, files, init_from, losses, partitioning
from t5lite.data import hf_vocab
from t5lite.fields import ConfigError
from t5lite.models import presets
from t5lite.models.t5 import make_model


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """The teacher's model config, the step directory (or hf:DIR) its params come from, and the
  train.distill_teacher value that named it."""
  model: presets.ModelConfig
  path: str
  spec: str = ''


@dataclasses.dataclass
class Teacher:
  """The teacher's flax module, its params on the mesh and their shardings; `source`: a log line."""
  model: nn.Module
  params: Any
  shardings: Any
  source: str


def teacher_config(train_cfg, student: presets.ModelConfig) -> TeacherConfig | None:
  """The teacher that train_cfg.distill_teacher names (None when it is ''), its model config
  checked against the student's. Reads config files only. Raises ConfigError."""
  spec = train_cfg.distill_teacher
  if not spec:
    return None
  name = f'config.train.distill_teacher={spec}'
  if spec.startswith(checkpoints.T5X_PREFIX):
    raise ConfigError(f'{name}: a T5X checkpoint cannot be a teacher directly; convert it with '
                      '`python -m t5lite.convert t5x-to-t5lite` and name the workdir it writes')
  try:
    path = checkpoints.resolve_init_path(spec)
  except checkpoints.CheckpointError as e:
    raise ConfigError(str(e).replace('checkpoint.init_from=',
                                     'config.train.distill_teacher=')) from None
  if path.startswith(checkpoints.HF_PREFIX):
    from t5lite import hf  # pylint: disable=import-outside-toplevel  (the optional [hf] extra)
    try:
      found = hf.model_config_from_hf(hf.read_config(path[len(checkpoints.HF_PREFIX):]))
    except hf.HFConversionError as e:
      raise ConfigError(f'{name}: {e}') from None
    # As hf-to-t5lite writes it: the variant's preset with the HF shape; layers unstacked.
    fields = presets.model_config('tiny', found['variant']).to_dict()
    fields.update(found, size='custom', scan_layers=False, dtype=student.dtype)
  else:
    fields = hf_vocab.read_saved_config(path).get('model')
    if not isinstance(fields, dict):
      raise ConfigError(f'{name}: {path} saved no model config (config/ item), so the teacher '
                        "model is unknown; name a t5lite run's checkpoint or hf:DIR")
  # No backward pass runs through the teacher: remat would only cost; dropout is off anyway.
  fields = dict(fields, remat_policy='none', dropout_rate=0.0)
  if train_cfg.distill_dtype:
    fields['dtype'] = train_cfg.distill_dtype
  model = presets.ModelConfig.from_config(fields)
  if model.vocab_size != student.vocab_size:
    raise ConfigError(
        f'{name}: the teacher has vocab_size={model.vocab_size} but the student '
        f'config.model.vocab_size={student.vocab_size}; distillation compares the two softmaxes '
        'token by token, so both must have the same vocabulary size (and vocabulary)')
  if model.architecture != student.architecture:
    raise ConfigError(f'{name}: the teacher is {model.architecture} but the student '
                      f'config.model.architecture={student.architecture}; both must read the '
                      'same batch')
  return TeacherConfig(model=model, path=path, spec=spec)


PIN_FILE = 'distill_teacher.json'


def pin(config: TeacherConfig, workdir: str, resumed: bool, write: bool = True) -> TeacherConfig:
  """The teacher a resumed run must read: the step directory recorded when the run began with the
  same train.distill_teacher, not the newest step a workdir has now (it may have trained on). A
  fresh start, or a changed distill_teacher, records the path resolved now (`write`: whether this
  process writes the record; the caller says, as for the workdir's config files)."""
  record = files.join(workdir, PIN_FILE)
  if resumed and files.to_path(record).exists():
    saved = json.loads(files.read_text(record))
    if saved.get('spec') == config.spec and saved.get('path') != config.path:
      if not (files.to_path(saved['path']) / 'state').is_dir():
        raise ConfigError(
            f'config.train.distill_teacher={config.spec}: this run began with the teacher '
            f'{saved["path"]} ({record}), which no longer exists; a resumed run must read the '
            'same teacher. Restore that step, or name a teacher step directory on purpose '
            '(the run then continues with another teacher)')
      return dataclasses.replace(config, path=saved['path'])
    if saved.get('spec') == config.spec:
      return config
  if write:
    files.write_text(record, json.dumps({'spec': config.spec, 'path': config.path}) + '\n')
  return config


def load_teacher(config: TeacherConfig, mesh, rules, example_batch,
                 platform: str | None = None) -> Teacher:
  """The teacher's module and its params, read once onto the shardings that `rules` give its
  parameters on `mesh` (as a student's would be sharded)."""
  model = make_model(config.model, platform)
  abstract, shardings = partitioning.abstract_params(model, mesh, rules,
                                                     losses.model_inputs(example_batch))
  try:
    params = init_from.load_params(config.path, abstract)
  except checkpoints.CheckpointError as e:
    raise checkpoints.CheckpointError(
        str(e).replace('checkpoint.init_from=', 'train.distill_teacher=')) from None
  m = config.model
  return Teacher(
      model=model, params=params, shardings=shardings,
      source=(f'distilling from the teacher {config.path} ({m.d_model} wide, '
              f'{m.num_encoder_layers}+{m.num_decoder_layers} layers, {m.dtype})'))


def bind(step_fn: Callable, teacher: Teacher | None) -> Callable:
  """The jitted step called as (state, batch, watch) with the teacher's params passed on as its
  last argument on every call (an argument, so they are not constants of the compiled step)."""
  if teacher is None:
    return step_fn
  return lambda state, batch, watch: step_fn(state, batch, watch, teacher.params)


def teacher_logits(teacher_model: nn.Module, teacher_params, batch) -> jax.Array:
  """The teacher's logits for a batch, with no gradient and dropout off."""
  logits = teacher_model.apply({'params': teacher_params}, **losses.model_inputs(batch),
                               deterministic=True)
  return jax.lax.stop_gradient(logits)
