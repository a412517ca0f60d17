"""Config rules that relate fields, and the mesh shape they imply; run by `config.validate` after
the per-field checks (t5lite/config.py). Each rule takes the config (a ConfigDict or a RunConfig) and
raises `ConfigError` naming the fields involved and a setting that would work."""
from __future__ import annotations

import dataclasses
import re
import difflib
from typing import Any, Callable

from t5lite.checks import non_negative, positive, task
from t5lite.fields import ConfigError
from t5lite.models import prompt as prompt_lib
from t5lite.partitioning import MESH_AXES

EVAL_VALUES = ('eval/loss', 'eval/accuracy')  # what in-training evaluation logs (t5lite/train.py)


def _encoder_layers(c) -> None:
  if c.model.architecture == 'encoder_decoder':
    positive(c.model.num_encoder_layers, 'model.num_encoder_layers')


def _attention_dim(c) -> None:
  m = c.model
  if m.attention_dim != m.num_heads * m.head_dim:
    raise ConfigError(
        f'config.model.attention_dim={m.attention_dim} but model.num_heads * model.head_dim = '
        f'{m.num_heads} * {m.head_dim} = {m.num_heads * m.head_dim}; set model.attention_dim='
        f'{m.num_heads * m.head_dim} or change num_heads/head_dim so their product is '
        f'{m.attention_dim}')


def _converter_fits_architecture(c) -> None:
  architecture = c.model.architecture
  wanted = ('encdec',) if architecture == 'encoder_decoder' else ('decoder', 'prefix_lm')
  if c.data.converter not in wanted:
    raise ConfigError(f'config.data.converter={c.data.converter!r} does not feed '
                      f'model.architecture={architecture!r}; use data.converter in '
                      f'{", ".join(wanted)}')


def _hf_shapes(c) -> None:
  """init_from=hf:DIR: its config.json must give config.model's shape (read now, before any
  compute; fields such as relative_attention_max_distance change no param shape)."""
  init_from = c.checkpoint.init_from
  if not init_from.startswith('hf:'):
    return
  from t5lite import hf  # pylint: disable=import-outside-toplevel  (the optional [hf] extra)
  model = dataclasses.asdict(c.model) if dataclasses.is_dataclass(c.model) else c.model
  try:
    problems = hf.config_mismatches(init_from[len('hf:'):], model)
  except hf.HFConversionError as e:
    raise ConfigError(f'config.checkpoint.init_from={init_from}: {e}') from None
  if problems:
    raise ConfigError(f'config.checkpoint.init_from={init_from}: config.model does not match '
                      'the HF model: ' + '; '.join(problems) + ' (python -m t5lite.convert '
                      'hf-to-t5lite prints the overrides)')


def _t5x_shapes(c) -> None:
  """init_from=t5x:DIR/checkpoint_N: its param shapes must give config.model's shape (read now,
  from the checkpoint's metadata only, before any compute)."""
  init_from = c.checkpoint.init_from
  if not init_from.startswith('t5x:'):
    return
  from t5lite import t5x  # pylint: disable=import-outside-toplevel
  model = dataclasses.asdict(c.model) if dataclasses.is_dataclass(c.model) else c.model
  try:
    problems = t5x.config_mismatches(init_from[len('t5x:'):], model)
  except t5x.T5XError as e:
    raise ConfigError(f'config.checkpoint.init_from={init_from}: {e}') from None
  if problems:
    raise ConfigError(f'config.checkpoint.init_from={init_from}: config.model does not match '
                      'the T5X checkpoint: ' + '; '.join(problems) + ' (python -m t5lite.convert '
                      't5x-to-t5lite prints the overrides)')


def _eval_task(c) -> None:
  if c.eval.every_steps and c.eval.task:
    task(c.eval.task, 'eval.task')


def _keep_best_needs_eval(c) -> None:
  e, k = c.eval, c.checkpoint
  if not k.keep_best_metric:
    return
  if not e.every_steps:
    raise ConfigError(f'config.checkpoint.keep_best_metric={k.keep_best_metric!r} needs '
                      'evaluation: set eval.every_steps > 0')
  by_task = k.keep_best_metric.split('/')
  if not (len(by_task) == 3 and by_task[0] == 'eval' and by_task[1] in e.tasks):
    # eval/<task>/<metric> of a metric task is named by the task's metric fns: checked when it is
    # first logged; the validation values are known now.
    if k.keep_best_metric not in EVAL_VALUES:
      close = difflib.get_close_matches(k.keep_best_metric, EVAL_VALUES, n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ''
      raise ConfigError(f'config.checkpoint.keep_best_metric={k.keep_best_metric!r} is not '
                        f'valid{hint}; valid: {", ".join(EVAL_VALUES)}')
  if k.every_steps % e.every_steps:
    raise ConfigError(f'config.checkpoint.every_steps={k.every_steps} is not a multiple of '
                      f'eval.every_steps={e.every_steps}: a checkpoint without '
                      f'{k.keep_best_metric} cannot be ranked; make it a multiple')


def _embeddings_ignored(c) -> bool:
  """Whether checkpoint.init_ignore leaves the token embedding (and an untied output layer)
  behind: a fine-tune that re-initialises them may change vocabulary on purpose."""
  names = ['token_embedder/embedding'
          ] + (['logits_dense/kernel'] if c.model.variant != 'v1_0' else [])
  patterns = tuple(c.checkpoint.init_ignore)
  return bool(patterns) and all(any(re.search(p, n) for p in patterns) for n in names)


def _vocabulary_fits_init(c) -> None:
  """init_from: the fine-tune's vocabulary must be the one the model was trained with (by size,
  kind and model-file sha256 where recorded; by size alone where not), before any compute: a
  converted Flan-T5 fed the embedded 2k vocabulary trains on the wrong tokens (t5lite/data/
  hf_vocab.py)."""
  init_from, d = c.checkpoint.init_from, c.data
  if not init_from or _embeddings_ignored(c):
    return
  if c.checkpoint.init_new_rows:  # a new vocabulary on purpose: t5lite/vocab_expansion.py checks
    return
  # pylint: disable=import-outside-toplevel  (the data stack and orbax: only when validating)
  from t5lite import checkpoints
  from t5lite.data import hf_vocab, tasks, vocab
  try:
    data = hf_vocab.record_of_spec(d.vocabulary, d.sp_vocab_size)
    if data is None and not d.source:  # 'task': the vocabulary of the task's targets
      found = tasks.get(d.task)
      leaf = found if isinstance(found, tasks.Task) else found.tasks[0]
      feature = leaf.output_features.get('targets') or next(iter(leaf.output_features.values()))
      data = hf_vocab.record(feature.vocabulary, f'task:{leaf.name}')
    if init_from.startswith('t5x:'):
      model = None  # T5X checkpoints record no vocabulary: the sizes are compared
    elif init_from.startswith('hf:'):
      directory = init_from[len('hf:'):]
      model = (hf_vocab.record(vocab.load_hf_tokenizer(directory), init_from)
               if vocab.has_hf_tokenizer(directory) else None)
    else:
      step_dir = checkpoints.resolve_init_path(init_from)
      model, _ = hf_vocab.model_tokenizer(hf_vocab.read_saved_config(step_dir))
  except checkpoints.CheckpointError:
    return  # a missing or incomplete init_from is named when the run starts
  except (FileNotFoundError, ValueError, tasks.UnknownNameError) as e:
    raise ConfigError(f'{e}') from None
  problem = hf_vocab.init_mismatch(data, model, c.model.vocab_size, init_from)
  if problem:
    raise ConfigError(problem)


def _init_activation(c) -> None:
  """init_from a t5lite checkpoint: the gated MLP activations have the same shapes, so the one it
  was trained with is compared by name (hf: is compared with its config.json in _hf_shapes; T5X
  checkpoints record none)."""
  init_from = c.checkpoint.init_from
  if not init_from or init_from.startswith(('hf:', 't5x:')):
    return
  # pylint: disable=import-outside-toplevel  (orbax: only when validating an init_from)
  from t5lite import checkpoints
  from t5lite.data import hf_vocab
  from t5lite.models import presets
  try:
    saved = hf_vocab.read_saved_config(checkpoints.resolve_init_path(init_from)).get('model', {})
  except (checkpoints.CheckpointError, ValueError, OSError):
    return  # a missing or unreadable init_from is named when the run starts
  model = dataclasses.asdict(c.model) if dataclasses.is_dataclass(c.model) else c.model
  trained, wanted = presets.activation_of(saved), presets.activation_of(model)
  if trained and wanted and trained != wanted:
    raise ConfigError(f'config.model computes the MLP activation {wanted}, but the model of '
                      f'checkpoint.init_from={init_from} was trained with {trained}; set '
                      f'--config.model.mlp_activation={trained}')


def _data_source(c) -> None:
  """data.source: its syntax, the columns its objective reads, a vocabulary and converter it can
  use, and files for its split 'train' (t5lite/data/file_tasks.py)."""
  from t5lite.data import file_tasks  # pylint: disable=import-outside-toplevel
  file_tasks.check_config(c)


def _full_branch_schedule(c) -> None:
  """A full branch (init_from_state=full) goes on at the source run's own step, and the schedule is
  read at that step: an offset would count those steps twice, and a re-warm ramp (over the run's
  first steps from 0) would be over before the branch starts."""
  if not c.checkpoint.init_from or c.checkpoint.init_from_state != 'full':
    return
  for name in ('step_offset', 'rewarm_steps'):
    if getattr(c.schedule, name):
      raise ConfigError(
          f'config.schedule.{name}={getattr(c.schedule, name)} with '
          'checkpoint.init_from_state=full: a full branch continues the source run at its own '
          'step N, and its schedule at N, so the step offset is already there and a re-warm '
          'ramp (steps 0..rewarm_steps) is over. To re-warm from step N, use '
          f'init_from_state=params_and_optimizer with schedule.step_offset=N and '
          f'schedule.rewarm_steps; or set schedule.{name}=0')


def _new_params_without_t5x_statistics(c) -> None:
  """init_from=t5x: with params_and_optimizer carries T5X's Adafactor statistics and its one
  shared step count: params that T5X never had (LoRA factors, a soft prompt) would start with
  zero statistics under that count, i.e. a second-moment estimate that is not one."""
  k, m = c.checkpoint, c.model
  if not (k.init_from.startswith('t5x:') and k.init_from_state == 'params_and_optimizer'):
    return
  new = [
      f'model.{name}={getattr(m, name)}' for name in ('lora_rank', 'prompt_length')
      if getattr(m, name, 0)
  ]
  if new:
    raise ConfigError(
        f'config.checkpoint.init_from={k.init_from} with init_from_state=params_and_optimizer '
        f'and {" and ".join(new)}: the T5X checkpoint has no optimizer statistics for these new '
        'params, and its Adafactor step count would apply to them anyway; use '
        "init_from_state='params' (a fresh optimizer for what trains)")


def _data_stages(c) -> None:
  """data.stages: every task and mixture it names exists (`data.task` in it stands for
  data.task, which data.source has set by now)."""
  from t5lite.data import stages  # pylint: disable=import-outside-toplevel
  stages.check_config(c)


def _prompt_tuning(c) -> None:
  """model.prompt_length > 0 (t5lite/models/prompt.py): unpacked rows, and enough real token
  rows to draw the prompt's initial rows from, without replacement."""
  m = c.model
  length = getattr(m, 'prompt_length', 0)  # absent from configs saved before prompt tuning
  non_negative(length, 'model.prompt_length')
  if not length:
    return
  positive(m.prompt_init_vocab, 'model.prompt_init_vocab')
  if c.data.pack:
    raise ConfigError(
        f'config.model.prompt_length={m.prompt_length} (prompt tuning) with data.pack=True: a '
        'packed row holds several examples and one soft prompt per row would reach only its '
        'first; set data.pack=False')
  if m.prompt_init_vocab < m.prompt_length:
    raise ConfigError(
        f'config.model.prompt_init_vocab={m.prompt_init_vocab} is below model.prompt_length='
        f'{m.prompt_length}: the prompt starts as distinct token rows drawn from that many ids; '
        f'set prompt_init_vocab >= {m.prompt_length}')
  last = prompt_lib.FIRST_ID + m.prompt_init_vocab - 1
  if last >= m.vocab_size:
    raise ConfigError(
        f'config.model.prompt_init_vocab={m.prompt_init_vocab}: the prompt would start from '
        f'token ids {prompt_lib.FIRST_ID}..{last}, past model.vocab_size={m.vocab_size}; set it '
        f'at most {m.vocab_size - prompt_lib.FIRST_ID}, and below the vocabulary\'s sentinels (e.g. '
        '1900 for the quickstart\'s 1948 pieces)')


# Rules that relate fields, run after the per-field checks.
RULES: tuple[Callable[[Any], None],
             ...] = (_encoder_layers, _attention_dim, _converter_fits_architecture, _hf_shapes,
                     _t5x_shapes, _vocabulary_fits_init, _init_activation, _data_source,
                     _data_stages, _eval_task, _keep_best_needs_eval, _full_branch_schedule,
                     _prompt_tuning, _new_params_without_t5x_statistics)

DCN_AXES = tuple(f'dcn_{a}' for a in MESH_AXES)


def dcn_shape(mesh_cfg) -> tuple[int, int, int]:
  """(dcn_data, dcn_fsdp, dcn_tensor): how many slices each mesh axis spans (1, 1, 1: one)."""
  dims = tuple(getattr(mesh_cfg, a, 1) for a in DCN_AXES)
  for axis, dim in zip(DCN_AXES, dims):
    if not isinstance(dim, int) or dim < 1:
      raise ConfigError(f'config.mesh.{axis}={dim!r}: must be a positive int')
  return dims


def mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[int, int, int]:
  """(data, fsdp, tensor) of the whole mesh: each axis's size within a slice (at most one -1,
  filled so that the product is a slice's device count) times its dcn_* size."""
  dcn = dcn_shape(mesh_cfg)
  slices = dcn[0] * dcn[1] * dcn[2]
  if slices != num_slices:
    raise ConfigError(
        f'config.mesh: dcn_data*dcn_fsdp*dcn_tensor = {dcn[0]}*{dcn[1]}*{dcn[2]} = {slices}, but '
        f'the devices form {num_slices} slice(s); make the product {num_slices} (usually '
        f'mesh.dcn_data={num_slices})')
  num_devices //= num_slices
  dims = [getattr(mesh_cfg, a) for a in MESH_AXES]
  for axis, dim in zip(MESH_AXES, dims):
    if not isinstance(dim, int) or (dim < 1 and dim != -1):
      raise ConfigError(f'config.mesh.{axis}={dim!r}: must be a positive int or -1')
  if dims.count(-1) > 1:
    raise ConfigError('config.mesh: at most one of data, fsdp, tensor may be -1')
  known = 1
  for d in dims:
    known *= d if d != -1 else 1
  where = f'{num_devices} devices' + (' per slice' if num_slices > 1 else '')
  if -1 in dims:
    if num_devices % known:
      raise ConfigError(f'config.mesh: the fixed axes multiply to {known}, which does not divide '
                        f'the {where}; choose sizes whose product divides {num_devices}')
    dims[dims.index(-1)] = num_devices // known
  product = dims[0] * dims[1] * dims[2]
  if product != num_devices:
    raise ConfigError(
        f'config.mesh: data*fsdp*tensor = {dims[0]}*{dims[1]}*{dims[2]} = {product}, but there are '
        f'{where}; make the product {num_devices} (set one axis to -1 to fill it)')
  return tuple(d * n for d, n in zip(dims, dcn))


def batches_divide(c, shape: tuple[int, int, int]) -> None:
  """The train batch (per microbatch) and the eval batch split evenly over data * fsdp."""
  t = c.train
  data_parallel = shape[0] * shape[1]
  if t.batch_size % t.microbatches:
    raise ConfigError(f'config.train.batch_size={t.batch_size} is not divisible by '
                      f'train.microbatches={t.microbatches}')
  per_pass = t.batch_size // t.microbatches
  if per_pass % data_parallel:
    raise ConfigError(
        f'config.train.batch_size={t.batch_size} (per microbatch {per_pass}) is not divisible by '
        f'the data-parallel size mesh.data*mesh.fsdp = {shape[0]}*{shape[1]} = {data_parallel}; '
        f'use a batch size that is a multiple of {data_parallel * t.microbatches}')
  eval_batch = c.eval.batch_size or t.batch_size
  if (c.eval.every_steps or c.eval.tasks) and eval_batch % data_parallel:
    raise ConfigError(f'config.eval.batch_size={eval_batch} is not divisible by the data-parallel '
                      f'size mesh.data*mesh.fsdp = {data_parallel}; use a multiple of '
                      f'{data_parallel}')
