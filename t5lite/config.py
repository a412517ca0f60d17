"""Configs: every field declared once; key checks, validation, resolution.

Each config section is a frozen dataclass below whose fields carry their default and documentation
(`t5lite.fields.field`); `RunConfig` lists the sections in order. `base_config()` builds the
`ml_collections.ConfigDict` that config files edit (`get_config(arg=None) -> ConfigDict`), overrides
come as `--config.section.field=value` (loading and overrides: t5lite/config_files.py),
`validate()` checks everything before any compute (a table of per-field checks plus the
cross-field rules of t5lite/config_rules.py; every problem raises `ConfigError`, naming the field and what
would be valid), and `resolve()` turns the checked ConfigDict into a typed `RunConfig` once, at
start-up. docs/configs.md's field reference is generated from the declarations
(`python -m t5lite.config_docs --update-docs`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Sequence

import ml_collections

from t5lite import fields
from t5lite.checks import (Check, boolean, count, in_range, logical_rules, new_rows, non_negative,
                           positive, regex_pairs, regexes, stage_list, string, task, task_names)
from t5lite.fields import ConfigError, field  # ConfigError: re-exported, THE config error
# Re-exported: the cross-field rules and the mesh shape (t5lite/config_rules.py).
# The eval, decode and infer sections are declared in t5lite/config_eval.py.
from t5lite.config_eval import DecodeOptions, EvalConfig, InferConfig
from t5lite.config_rules import (
    DCN_AXES,
    EVAL_VALUES,
    RULES,
    batches_divide,
    dcn_shape,  # pylint: disable=unused-import
    mesh_shape)
from t5lite.models import presets

# Re-exported: the mesh axes and the default rules live with the rest of sharding.
from t5lite.partitioning import DEFAULT_RULES, MESH_AXES  # pylint: disable=unused-import

OPTIMIZERS = ('adafactor', 'adamw')
SCHEDULES = ('rsqrt', 'cosine', 'wsd', 'constant')
CONVERTERS = ('encdec', 'decoder', 'prefix_lm')

# ---------------------------------------------------------------------------------------------
# The declarations: one frozen dataclass per section, in the order of `RunConfig`.


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the model reads: the task, lengths, the converter and the vocabulary (docs/data.md)."""
  task: str = field(
      'embedded_span_corruption', 'A registered task or mixture (t5lite.data.tasks; '
      '`python -m t5lite.data.inspect --task NAME` shows it). An unknown name lists '
      'the closest registered ones.')
  inputs_length: int = field(128, 'Encoder (or prefix) length in tokens.')
  targets_length: int = field(
      0, "Target length; 0: T5's random_spans_helper at noise 0.15, span 3 "
      '(the span-corruption target length for inputs_length: 128 inputs '
      '=> 29 targets, 512 => 114).')
  converter: str = field(
      'encdec', 'How examples become model features '
      '(t5lite/data/converters.py): encdec feeds encoder_decoder; decoder and '
      'prefix_lm feed decoder_only.', choices=CONVERTERS)
  pack: bool = field(True, 'Several examples per row, separated by segment ids.')
  num_workers: int = field(
      0, 'Preprocessing worker processes (grain mp_prefetch); 0 runs it in '
      'the training process. Same batches either way; workers pay off when '
      'preprocessing, not the step, is the bottleneck.')
  vocabulary: str = field(
      'embedded', "embedded: the embedded corpus's SentencePiece model "
      '(data.sp_vocab_size pieces + 100 sentinels) for every feature; task: '
      "each task's own vocabularies; byte: ByT5's bytes (259 ids + 125 "
      'sentinels = 384); a path to a SentencePiece .model (+ 100 '
      'sentinels); or hf:DIR, a HuggingFace tokenizer directory (spiece.model, a ByT5Tokenizer '
      'config or tokenizer.json; docs/hf.md).')
  sp_vocab_size: int = field(1948, 'Embedded SentencePiece size; + 100 sentinels = 2048.')
  source: str = field(
      '', 'Train on files with no Python: FORMAT:PATTERN with FORMAT jsonl, tsv (a header line '
      'names the columns), text, parquet (these four read gs:// too) or arrayrecord (JSON-object '
      "records; local), globs allowed, '{split}' in PATTERN replaced by the split name; or hf:DIR "
      '(a local HuggingFace `datasets` save_to_disk directory or Parquet/Arrow files). '
      "It replaces data.task (docs/data.md); '': data.task.")
  source_fields: str = field(
      'inputs=inputs,targets=targets', 'data.source: feature=column pairs, e.g. '
      "'inputs=question,targets=answer'; span_corruption and prefix_lm read only `inputs`.")
  objective: str = field(
      'supervised', 'data.source: supervised (inputs -> targets as given), span_corruption '
      "(T5's, noise 0.15, mean span 3) or prefix_lm (a random split of each text).",
      choices=('supervised', 'span_corruption', 'prefix_lm'))
  reset_position: bool = field(
      False, 'When the data pipeline changed since the checkpoint (another task '
      'or mixture, rates, lengths, seed, batch size), resume the model but read '
      'the data afresh from its start. Without it such a resume is refused, '
      'saying what changed. An unchanged pipeline resumes its exact position '
      'either way, so the flag can stay set.')
  stages: tuple = field(
      (), "Stage-wise mixtures: 'START:SPEC' strings, e.g. ('0:embedded_span_corruption', "
      "'300:data.task=0.3,my_task=0.7'); from training step START on (its batches feed steps "
      'START+1...) the data is SPEC: a task or mixture name or name=rate pairs, data.task '
      'standing for data.task (or data.source) itself. The first starts at 0. Stages not yet '
      'started may change on resume, started ones not. () = data.task alone '
      '(t5lite/data/stages.py, docs/data.md).')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop. Loss = cross-entropy summed over the target tokens / the number of target
  tokens in the whole batch."""
  steps: int = field(1000, 'Training steps.')
  batch_size: int = field(32, 'Global batch size, over all processes.')
  microbatches: int = field(
      1, 'Gradient accumulation: batch_size / microbatches rows per pass, '
      'the same update.')
  seed: int = field(0, 'Parameter init and dropout; the data order follows it too.')
  log_every: int = field(10, 'Steps between logged metrics.')
  z_loss: float = field(1e-4, 'PaLM/T5X auxiliary loss on log(Z)^2, keeps the logits bounded.')
  label_smoothing: float = field(0.0, 'Label smoothing of the cross-entropy.')
  max_grad_norm: float = field(
      0.0, 'Global-norm gradient clipping; 0 turns it off (Adafactor '
      'clips its updates anyway).')
  max_dead_steps: int = field(
      20, 'Stop a dead run: when the gradient norm has been exactly 0 for this '
      'many consecutive steps while the loss is not 0 (the model no longer '
      'learns anything, e.g. after a far too high learning rate), training '
      'stops with exit 1. 0 turns the guard off.')
  trainable: tuple = field(
      (), "Freezing: regexes (re.search) over the '/'-joined param names; only matching params "
      'train, the others stay bitwise unchanged and get no optimizer state. () = all train; '
      'with LoRA (model.lora_rank > 0) or prompt tuning (model.prompt_length > 0): the LoRA '
      'factors / the prompt and these. '
      "A regex matching no param is an error. E.g. ('^decoder/',) (docs/adaptation.md).")
  distill_teacher: str = field(
      '', 'Knowledge distillation (Kim & Rush 2016; docs/adaptation.md): the teacher, a t5lite '
      'workdir, checkpoints directory or step directory (its model config is read from the '
      "checkpoint's saved config) or hf:DIR (a HuggingFace T5). Its vocab_size must equal "
      'model.vocab_size. The loss becomes distill_alpha * T^2 * KL(teacher || student) + '
      "(1 - distill_alpha) * cross-entropy, per target token (z-loss unchanged). '': off.")
  distill_temperature: float = field(
      1.0, 'Distillation: the softmax temperature T of both models in the KL term.')
  distill_alpha: float = field(
      0.5, 'Distillation: the weight of the KL term; 1 - alpha weighs the cross-entropy.')
  distill_dtype: str = field(
      '', "Distillation: the teacher's activation dtype; '': its own (the saved config's "
      "model.dtype; for hf: this run's model.dtype).", choices=('', 'bfloat16', 'float32'))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer (t5lite/optim.py). Adafactor has T5's defaults: factored second moments,
  parameter-scaled updates, no momentum."""
  name: str = field('adafactor', "The optimizer; adafactor with T5's settings.", choices=OPTIMIZERS)
  learning_rate: float = field(1.0, 'Peak / base value that the schedule multiplies.')
  weight_decay: float = field(
      0.0, "Decoupled weight decay: adamw's, and adafactor's "
      'weight_decay_rate; 0 turns it off.')
  b1: float = field(0.9, 'adamw: first-moment decay.')
  b2: float = field(0.999, 'adamw: second-moment decay.')
  eps: float = field(1e-8, 'adamw: denominator epsilon.')
  decay_rate: float = field(0.8, 'adafactor: second-moment decay exponent (T5).')
  clipping_threshold: float = field(1.0, 'adafactor: update clipping (T5).')


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The learning rate over the steps (t5lite/optim.py make_schedule)."""
  name: str = field(
      'rsqrt', 'rsqrt: lr / sqrt(max(step, warmup)) (T5); cosine: linear warm-up, '
      'cosine decay to lr * end_ratio; wsd: warm-up, constant, linear cool-down over '
      'the last decay_fraction of the steps; constant: warm-up, then flat.', choices=SCHEDULES)
  warmup_steps: int = field(
      10_000, 'rsqrt: the constant stretch at the start '
      '(lr / sqrt(warmup)); the others: a linear warm-up from 0.')
  decay_fraction: float = field(
      0.1, 'wsd: the final fraction of the steps spent cooling down (when decay_start_step is 0).')
  decay_start_step: int = field(
      0, 'wsd: > 0 starts the cool-down at this absolute step (of the schedule, step + '
      'step_offset) and ends it at train.steps + step_offset, so a run can be extended, or '
      'cooled down from any checkpoint of its stable phase (docs/adaptation.md); 0: decay_fraction.'
  )
  step_offset: int = field(
      0, 'The schedule is read at step + step_offset: a run started at step 0 from step N of '
      'another (checkpoint.init_from_state=params_and_optimizer) continues its schedule with N.')
  rewarm_steps: int = field(
      0, 'Re-warm: the learning rate times a linear ramp from 0 over the run\'s first N steps '
      '(continual pretraining from a trained checkpoint, with init_from_state '
      'params_and_optimizer or params; a full branch keeps its step, refused); 0: off.')
  end_ratio: float = field(0.0, 'cosine / wsd: the final learning rate as a fraction of the peak.')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh. Within one slice (the devices joined by fast interconnect, ICI: a TPU
  slice, or all devices when there is one) data * fsdp * tensor must equal its device count;
  across slices (data-center network, DCN: TPU multislice) each axis is further multiplied by its
  dcn_* size, and dcn_data * dcn_fsdp * dcn_tensor must equal the number of slices."""
  data: int = field(
      -1, 'Data parallelism within a slice; -1: whatever the other axes leave of its devices.')
  fsdp: int = field(
      1, 'Fully sharded data parallelism: parameters and optimizer state are split '
      'along embed (ZeRO-3 style), the batch along data+fsdp.')
  tensor: int = field(1, 'Tensor parallelism over heads, mlp and vocab.')
  dcn_data: int = field(
      1, 'Multislice: slices that split the batch (data parallelism over DCN, the usual '
      'choice: one gradient all-reduce per step crosses the slow network).')
  dcn_fsdp: int = field(
      1, 'Multislice: slices that also split the parameters (fsdp over DCN: every layer\'s '
      'all-gather crosses the slow network; for models too big for one slice).')
  dcn_tensor: int = field(1, 'Multislice: tensor parallelism over DCN (rarely worth it).')


@dataclasses.dataclass(frozen=True)
class PartitioningConfig:
  """Logical axis names -> mesh axes (docs/models.md, partitioning)."""
  rules: tuple = field(
      DEFAULT_RULES, 'A tuple of (logical_axis, mesh_axes); the first matching '
      'rule whose mesh axes are still free wins (flax). Default: '
      't5lite.partitioning.DEFAULT_RULES (fsdp shards embed, tensor shards heads '
      '/ mlp / vocab; activations use act_* names so the batch can take data+fsdp '
      'while the weights use fsdp for embed).')


@dataclasses.dataclass(frozen=True)
class ReportingConfig:
  """Logged throughput: MFU = model FLOPs per step / step time / (peak * devices)."""
  peak_flops_per_device: float = field(
      0.0, 'Per-device peak FLOP/s for MFU; 0: look up the device '
      'kind, or on CPU measure a matmul at start.')
  tensorboard: bool = field(True, 'Also write TensorBoard events to WORKDIR/tensorboard.')


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Checkpoints go to WORKDIR/checkpoints (docs/checkpoints.md). Running the same command again
  resumes from the newest complete one; the last step and a SIGTERM stop are always saved."""
  every_steps: int = field(
      500, 'Save period in steps; 0: only at the end and on SIGTERM. Shorter '
      'loses less work on a crash but writes more.')
  keep: int = field(3, 'Newest checkpoints to keep on disk; 0 keeps all.')
  async_save: bool = field(
      True, 'Write in a background thread: the loop only waits for the '
      'device-to-host copy, then trains on while the files are written. '
      'False: every save blocks until it is on disk, simpler to reason about '
      'on flaky file systems. (`async` is a Python keyword.)')
  init_from: str = field(
      '', 'Fine-tuning: when WORKDIR has no checkpoint yet, take the params '
      "(and what init_from_state adds) from another run's "
      'checkpoint, a step directory or a WORKDIR/checkpoints directory (its '
      'newest step); `hf:DIR` for a HuggingFace T5 (docs/hf.md); `t5x:DIR/checkpoint_N` (or '
      't5x:DIR, its newest) for a T5X checkpoint (with init_from_state=params_and_optimizer '
      "and optimizer.name=adafactor also T5X's Adafactor second moments; docs/migrating.md). The "
      "workdir's own checkpoints always win, so a preempted fine-tune resumes "
      "where it stopped. '': a random init.")
  init_from_state: str = field(
      'params',
      'What init_from takes: params (a fresh optimizer; the step, data and schedule start '
      'at 0); params_and_optimizer (also the optimizer state: statistics and their counts; the '
      "step, data and schedule still start at 0, see schedule.step_offset; from t5x: T5X's "
      'Adafactor statistics); full (a t5lite checkpoint whole: params, optimizer, step and data '
      'position: a branch of that run, e.g. a cool-down, in a new workdir).',
      choices=('params', 'params_and_optimizer', 'full'))
  init_rename: tuple = field((), '(regex, replacement) pairs applied in order (re.sub) to the '
                             "checkpoint's '/'-joined param names, e.g. (('^encoder/', 'enc/'),), "
                             'so that differently named models can share weights.')
  init_ignore: tuple = field((), 'Regexes (re.search) over param names: matching model params keep '
                             'their fresh init (a new head), matching (renamed) checkpoint params '
                             'are dropped. Anything else unmatched is an error.')
  init_new_rows: str = field(
      '', 'Vocabulary expansion (docs/adaptation.md): init_from a model trained with a vocabulary '
      'that the run\'s data.vocabulary extends (more pieces, more rows): the rows of shared tokens '
      '(pieces by their text, sentinel <extra_id_k> by k) are copied into the token embedding and '
      "the output layer, every other row starts as 'mean' (of the old rows), 'mean_noise:STD' "
      "(that plus N(0, STD^2)) or 'pieces' (the mean of the old pieces the new piece's text "
      "splits into). '': off, the vocabularies must match.")
  init_vocabulary: str = field(
      '', 'With init_new_rows: the vocabulary (a data.vocabulary value) the init_from model was '
      "trained with; '': the one its checkpoint recorded (needed for t5x:).")
  lock_stale_minutes: float = field(
      10.0, 'The workdir lock (WORKDIR/lock.json, refreshed every minute by the '
      'running trainer) counts as stale, and is taken over, after this many '
      'minutes without a refresh (a host that died); a dead process on the '
      'same host is detected at once.')
  keep_best_metric: str = field(
      '', 'Also keep the best checkpoint(s) by a value logged at eval '
      "steps, whatever `keep` drops, e.g. 'eval/loss'; '' keeps only "
      'the newest. Needs eval.every_steps to divide every_steps, so '
      'every periodic checkpoint has the metric.')
  keep_best_mode: str = field('min', 'min for a loss, max for an accuracy or a BLEU.',
                              choices=('min', 'max'))
  keep_best_n: int = field(1, 'How many best checkpoints to keep.')


def _section(cls):
  return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The whole config, resolved once at start-up (`resolve`): typed, frozen parts with the same
  attribute names as the ConfigDict, so `cfg.train.steps` reads the same from either."""
  model: presets.ModelConfig = _section(presets.ModelConfig)  # t5lite/models/presets.py
  data: DataConfig = _section(DataConfig)
  keep_host_memory: bool = field(
      True, 'CPU backend: keep freed host memory for reuse instead of '
      'returning it to the kernel after every step, one malloc arena '
      'for all threads (glibc settings, applied before JAX starts; '
      't5lite/host_memory.py): no page faults on XLA\'s per-step '
      'buffers, T5.1.1-small steps ~1.3x faster; the process keeps its '
      'peak memory.')
  imports: tuple = field(
      (), 'Python modules imported before the config is validated, so that the tasks and '
      "mixtures they register can be named (T5X's --module_import, which adds to this list), "
      "e.g. ('my_project.tasks',).")
  train: TrainConfig = _section(TrainConfig)
  optimizer: OptimizerConfig = _section(OptimizerConfig)
  schedule: ScheduleConfig = _section(ScheduleConfig)
  mesh: MeshConfig = _section(MeshConfig)
  partitioning: PartitioningConfig = _section(PartitioningConfig)
  reporting: ReportingConfig = _section(ReportingConfig)
  checkpoint: CheckpointConfig = _section(CheckpointConfig)
  eval: EvalConfig = _section(EvalConfig)
  decode: DecodeOptions = _section(DecodeOptions)
  infer: InferConfig = _section(InferConfig)

  def to_dict(self) -> dict:
    """Plain nested dicts (JSON-able), equal to the ConfigDict's `to_dict()` after a JSON trip."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      out[f.name] = ({g.name: getattr(value, g.name) for g in dataclasses.fields(value)}
                     if dataclasses.is_dataclass(value) else value)
    return out

  def as_config_dict(self) -> ml_collections.ConfigDict:
    """The same values as a ConfigDict, in the declared order (what `base_config` builds)."""
    return _config_dict(self.to_dict())


# Section name -> its dataclass, in order; the other RunConfig fields are top-level values.
SECTIONS = {
    f.name: f.default_factory for f in dataclasses.fields(RunConfig)
    if f.default_factory is not dataclasses.MISSING
}


def _config_dict(tree: dict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for name, value in tree.items():
    c[name] = _config_dict(value) if isinstance(value, dict) else value
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default; config files start from this and change what they need."""
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(RunConfig):
    if f.name == 'model':
      c.model = presets.model_config('tiny')  # the same as ModelConfig's defaults
    elif f.name in SECTIONS:
      c[f.name] = _config_dict({g.name: g.default for g in dataclasses.fields(SECTIONS[f.name])})
    else:
      c[f.name] = f.default
  return c


def _frozen(value):
  """Lists (a config file may write them) as tuples, so that the resolved parts are hashable."""
  return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def resolve(config) -> RunConfig:
  """The (validated) ConfigDict as a typed, frozen `RunConfig`; done once, at start-up."""
  if isinstance(config, RunConfig):
    return config
  parts = {}
  for f in dataclasses.fields(RunConfig):
    value = config[f.name]
    if f.name in SECTIONS:  # a key the config lacks (an older config.json) takes its default
      parts[f.name] = SECTIONS[f.name](**{
          g.name: _frozen(value[g.name]) for g in dataclasses.fields(SECTIONS[f.name])
          if g.name in value
      })
    else:
      parts[f.name] = _frozen(value)
  return RunConfig(**parts)


def _declared() -> dict:
  """Section -> its field names (None for a top-level field): the keys a config may have."""
  out = {}
  for f in dataclasses.fields(RunConfig):
    if f.name in SECTIONS:
      out[f.name] = tuple(g.name for g in dataclasses.fields(SECTIONS[f.name]))
    else:
      out[f.name] = None
  return out


# ---------------------------------------------------------------------------------------------
# Keys (loading a config file and overriding its fields: t5lite/config_files.py)


def _unknown_key(parts: Sequence[str], depth: int, siblings: Sequence[str]) -> ConfigError:
  here = '.'.join(parts[:depth + 1])
  close = difflib.get_close_matches(parts[depth], siblings, n=1)
  hint = f" Did you mean '{'.'.join(list(parts[:depth]) + close)}'?" if close else ''
  parent = '.'.join(parts[:depth]) or 'config'
  error = ConfigError(f"unknown config key '{here}'.{hint} Valid keys under {parent}: "
                      f"{', '.join(siblings)}")
  error.key = parts[depth]  # load_config_file looks for the line that sets it
  return error


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a key that no declaration has (a typo in a config file, such as
  `c.train.stepz = 3`), with the same message as an unknown `--config.train.stepz` override."""
  declared = _declared()
  for name in config.keys():
    if name not in declared:
      raise _unknown_key([name], 0, sorted(declared))
    names = declared[name]
    if names is not None and isinstance(config[name], ml_collections.ConfigDict):
      for key in config[name].keys():
        if key not in names:
          raise _unknown_key([name, key], 1, sorted(names))


# ---------------------------------------------------------------------------------------------
# Validation: one table of per-field checks, then the few rules that relate fields.


def choices_of(dotted: str) -> tuple:
  """The values `section.field` may take, from its declaration; () when any value goes."""
  section, _, name = dotted.partition('.')
  cls = SECTIONS.get(section)
  declared = {f.name: f.metadata.get(fields.CHOICES, ()) for f in dataclasses.fields(cls)
             } if (cls is not None) else {}
  return tuple(declared.get(name, ()))


def choice(value, field_name: str) -> None:
  valid = choices_of(field_name)
  if value not in valid:
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    raise ConfigError(f'config.{field_name}={value!r} is not valid{hint}; valid: '
                      f'{", ".join(valid)}')


# Every field with a check, in the order they run. A declared field with choices and no row here
# gets `choice` (see _field_checks); fields without a row take any value of their type.
CHECKS: tuple[tuple[str, Check], ...] = (
    ('model.variant', choice),
    ('model.architecture', choice),
    ('model.dtype', choice),
    ('model.remat_policy', choice),
    *((f'model.{name}', positive)
      for name in ('vocab_size', 'd_model', 'd_ff', 'num_heads', 'head_dim', 'num_decoder_layers',
                   'relative_attention_num_buckets', 'relative_attention_max_distance',
                   'lora_alpha')),
    *((f'model.{name}', in_range(0, 1, hi_open=True)) for name in ('dropout_rate', 'lora_dropout')),
    ('model.lora_rank', count('the LoRA rank; 0 turns LoRA off')),
    ('model.lora_targets', regexes),
    ('model.mlp_activation', presets.check_mlp_activation),
    ('data.task', task),
    ('data.inputs_length', positive),
    ('data.num_workers', non_negative),
    ('data.targets_length', non_negative),
    ('data.converter', choice),
    ('data.stages', stage_list),
    *((f'train.{name}', positive) for name in ('steps', 'batch_size', 'microbatches', 'log_every')),
    *((f'train.{name}', non_negative) for name in ('z_loss', 'label_smoothing', 'max_grad_norm')),
    ('train.max_dead_steps',
     count('consecutive zero-gradient steps before a dead run stops; 0 '
           'turns the guard off')),
    ('train.distill_teacher',
     string("a t5lite checkpoint path or hf:DIR ('' turns distillation off)")),
    ('train.distill_temperature', positive),
    ('train.distill_alpha', in_range(0, 1)),
    ('optimizer.name', choice),
    ('optimizer.learning_rate', positive),
    ('schedule.name', choice),
    ('schedule.warmup_steps', non_negative),
    ('schedule.decay_fraction', in_range(0, 1)),
    *((f'schedule.{name}', non_negative)
      for name in ('decay_start_step', 'step_offset', 'rewarm_steps')),
    ('train.trainable', regexes),
    ('checkpoint.every_steps',
     count('the save period in steps; 0 saves only at the end and on SIGTERM')),
    ('checkpoint.keep', count('how many checkpoints to keep; 0 keeps all')),
    ('checkpoint.init_from',
     string('a path string (a checkpoint step directory or '
            "WORKDIR/checkpoints; '' for none)")),
    ('checkpoint.init_rename', regex_pairs),
    ('checkpoint.init_ignore', regexes),
    ('checkpoint.init_new_rows', new_rows),
    ('checkpoint.init_vocabulary', string("a data.vocabulary value ('' = recorded)")),
    ('eval.every_steps', non_negative),
    ('eval.batch_size', non_negative),
    ('eval.max_batches', non_negative),
    ('eval.tasks', task_names),
    ('eval.num_examples_to_save', non_negative),
    ('decode.method', choice),
    ('decode.max_decode_length', non_negative),
    ('decode.top_k', non_negative),
    ('decode.temperature', non_negative),
    ('decode.num_beams', positive),
    ('decode.top_p', in_range(0, 1, lo_open=True, note=' (1 = off)')),
    ('infer.batch_size', non_negative),
    ('infer.on_too_long', choice),
    ('infer.on_bad_line', choice),
    ('data.source', string("FORMAT:PATTERN or hf:DIR ('' reads data.task)")),
    ('checkpoint.keep_best_mode', choice),
    ('partitioning.rules', logical_rules),
    *((name, boolean)
      for name in ('model.relpos_per_layer', 'checkpoint.async_save', 'data.reset_position',
                   'infer.length_normalize', 'eval.length_normalize')),
    *((name, positive) for name in ('eval.max_inputs_length', 'eval.max_targets_length',
                                    'checkpoint.lock_stale_minutes', 'checkpoint.keep_best_n')),
)


def _field_checks() -> list[tuple[str, Check]]:
  rows = list(CHECKS)
  listed = {name for name, _ in rows}
  for section, cls in SECTIONS.items():
    for f in dataclasses.fields(cls):
      if f.metadata.get(fields.CHOICES) and f'{section}.{f.name}' not in listed:
        rows.append((f'{section}.{f.name}', choice))
  return rows


def _value(config, dotted: str):
  section, _, name = dotted.partition('.')
  return getattr(getattr(config, section), name)


def _all_floats_finite(config) -> None:
  """No field may hold inf or nan (e.g. learning_rate=1e999), whether or not it has a check."""
  for section, names in _declared().items():
    dotted = [section] if names is None else [f'{section}.{name}' for name in names]
    for name in dotted:
      value = getattr(config, name) if names is None else _value(config, name)
      if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f'config.{name}={value} is not a finite number')


def validate(config, num_devices: int, num_slices: int = 1) -> tuple[int, int, int]:
  """Checks everything that can be checked without compute (a ConfigDict's keys, each field, the
  rules between fields, the mesh and the batch sizes); returns the resolved mesh shape (whole
  axes: within-slice size times dcn_* size)."""
  if isinstance(config, ml_collections.ConfigDict):
    check_keys(config)
  _all_floats_finite(config)
  for dotted, check in _field_checks():
    check(_value(config, dotted), dotted)
  for rule in RULES:
    rule(config)
  shape = mesh_shape(config.mesh, num_devices, num_slices)
  batches_divide(config, shape)
  return shape
