"""Configs: the defaults, loading `configs/*.py:arg`, command-line overrides, validation.

A config file defines `get_config(arg=None) -> ConfigDict`, usually by editing `base_config()`.
Overrides come as `--config.section.field=value`. Everything is checked before any compute, and
every problem raises `ConfigError` whose message names the field and what would be valid.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
from typing import Sequence

import ml_collections

from t5lite.models import presets

OPTIMIZERS = ('adafactor', 'adamw')
SCHEDULES = ('rsqrt', 'cosine', 'wsd', 'constant')
CONVERTERS = ('encdec', 'decoder', 'prefix_lm')
MESH_AXES = ('data', 'fsdp', 'tensor')
EVAL_VALUES = ('eval/loss', 'eval/accuracy')  # what in-training evaluation logs (t5lite/train.py)

# Logical axis -> mesh axes. First matching rule whose mesh axes are still free wins (flax).
# Parameters: fsdp shards the embed dimension (ZeRO-3 style), tensor shards heads / mlp / vocab.
# Activations use act_* names so the batch can take data+fsdp while weights use fsdp for embed.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('act_batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('kv', None),
    ('act_kv', None),
    ('act_embed', None),
    ('act_length', None),
    ('length', None),
    ('layers', None),
    ('relpos_buckets', None),
)


class ConfigError(ValueError):
  """A config problem, with a message that names the field and the valid choices."""


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default; config files start from this and change what they need."""
  c = ml_collections.ConfigDict()
  c.model = presets.model_config('tiny')

  c.data = ml_collections.ConfigDict()
  c.data.task = 'embedded_span_corruption'  # a registered task or mixture (t5lite.data.tasks;
                                            # python -m t5lite.data.inspect --task NAME shows it)
  c.data.inputs_length = 128                # encoder (or prefix) length
  c.data.targets_length = 0                 # 0: T5's random_spans_helper at noise 0.15, span 3
                                            # (the span-corruption target length for inputs_length)
  c.data.converter = 'encdec'               # encdec (encoder_decoder) | decoder | prefix_lm
                                            # (decoder_only); see t5lite/data/converters.py
  c.data.pack = True                        # several examples per row, separated by segment ids
  # Preprocessing worker processes (grain mp_prefetch); 0 runs it in the training process. Same
  # batches either way. Workers pay off when preprocessing, not the step, is the bottleneck.
  c.data.num_workers = 0
  # embedded: the embedded corpus's SentencePiece model (data.sp_vocab_size pieces + 100
  # sentinels) for every feature; task: each task's own vocabularies; byte: ByT5's bytes (259 ids
  # + 125 sentinels = 384); or a path to a SentencePiece .model (+ 100 sentinels).
  c.data.vocabulary = 'embedded'
  c.data.sp_vocab_size = 1948               # embedded SentencePiece size; + 100 sentinels = 2048

  # CPU backend: keep freed host memory for reuse instead of returning it to the kernel after
  # every step, one malloc arena for all threads (glibc settings; t5lite/host_memory.py): no page
  # faults on XLA's per-step buffers, T5.1.1-small steps ~1.3x faster; the process keeps its peak.
  c.keep_host_memory = True

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32                   # global, over all processes
  c.train.microbatches = 1                  # gradient accumulation: batch_size / microbatches per pass
  c.train.seed = 0                          # parameter init and dropout; data.seed defaults to it
  c.train.log_every = 10
  c.train.z_loss = 1e-4                     # PaLM/T5X auxiliary loss on log(Z)^2, keeps logits bounded
  c.train.label_smoothing = 0.0
  c.train.max_grad_norm = 0.0               # global-norm clipping; 0 turns it off (Adafactor clips updates)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adafactor'            # adafactor | adamw
  c.optimizer.learning_rate = 1.0           # peak/base value that the schedule multiplies
  c.optimizer.weight_decay = 0.0            # decoupled; adamw, and adafactor's weight_decay_rate
  c.optimizer.b1 = 0.9                      # adamw
  c.optimizer.b2 = 0.999                    # adamw
  c.optimizer.eps = 1e-8                    # adamw
  c.optimizer.decay_rate = 0.8              # adafactor second-moment decay exponent (T5)
  c.optimizer.clipping_threshold = 1.0      # adafactor update clipping (T5)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'rsqrt'                 # rsqrt | cosine | wsd | constant
  c.schedule.warmup_steps = 10_000          # rsqrt: lr = base / sqrt(max(step, warmup)); others: linear
  c.schedule.decay_fraction = 0.1           # wsd: final fraction of steps spent cooling down to 0
  c.schedule.end_ratio = 0.0                # cosine/wsd: final lr as a fraction of the peak

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                          # -1: whatever the other axes leave of the device count
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.partitioning = ml_collections.ConfigDict()
  c.partitioning.rules = DEFAULT_RULES

  c.reporting = ml_collections.ConfigDict()
  # Per-device peak FLOP/s for MFU. 0: look up the device kind; on CPU, measure a matmul at start.
  c.reporting.peak_flops_per_device = 0.0
  c.reporting.tensorboard = True

  # Checkpoints go to WORKDIR/checkpoints (see docs/checkpoints.md). Running the same command again
  # resumes from the newest complete one; the last step and a SIGTERM stop are always saved.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500            # save period in steps; 0: only at the end and on SIGTERM.
                                            # Shorter loses less work on a crash but writes more.
  c.checkpoint.keep = 3                     # newest checkpoints to keep on disk; 0 keeps all
  # Write in a background thread: the loop only waits for the device-to-host copy, then trains on
  # while the files are written. (`async` is a Python keyword, hence the name.) False: every save
  # blocks until it is on disk, simpler to reason about on flaky file systems.
  c.checkpoint.async_save = True
  # Fine-tuning (docs/checkpoints.md): when WORKDIR has no checkpoint yet, take the params (only:
  # optimizer state and step start fresh) from another run's checkpoint, a step directory or a
  # WORKDIR/checkpoints directory (its newest step). '' starts from a random init. The workdir's own
  # checkpoints always win, so a preempted fine-tune resumes where it stopped.
  c.checkpoint.init_from = ''
  # (regex, replacement) pairs applied in order (re.sub) to the checkpoint's '/'-joined param names,
  # e.g. (('^encoder/', 'enc/'),), so that differently named models can share weights.
  c.checkpoint.init_rename = ()
  # Regexes (re.search) over param names: matching model params keep their fresh init (a new head),
  # matching (renamed) checkpoint params are dropped. Anything else unmatched is an error.
  c.checkpoint.init_ignore = ()
  # Also keep the best checkpoint(s) by an evaluation metric, whatever `keep` drops: the name of a
  # value logged at eval steps, e.g. 'eval/loss'. '' keeps only the newest. Needs eval.every_steps
  # to divide checkpoint.every_steps, so every periodic checkpoint has the metric.
  c.checkpoint.keep_best_metric = ''
  c.checkpoint.keep_best_mode = 'min'       # min (a loss) | max (an accuracy, a BLEU)
  c.checkpoint.keep_best_n = 1

  # In-training evaluation (docs/evaluation.md): every `every_steps` steps and at the last step,
  # one ordered pass over eval.split of eval.task gives eval/loss (cross-entropy per target token,
  # without z-loss or label smoothing) and eval/accuracy, logged with that step's metrics.
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0                    # 0: off. Costs one forward pass per eval batch.
  c.eval.task = ''                          # '' = data.task
  c.eval.split = 'validation'
  c.eval.batch_size = 0                     # 0 = train.batch_size (must divide like it)
  c.eval.max_batches = 0                    # 0: the whole split; N: its first N batches
  # Metric evaluation (t5lite/evaluation/evaluator.py): decode / score every example of eval.split
  # of these tasks, postprocess, apply each task's metric_fns; results in WORKDIR/eval/<task>/
  # step_<N>.json and TensorBoard under WORKDIR/eval. Used by `python -m t5lite.eval` and, at
  # eval.every_steps, by training. () = none. Uses eval.batch_size and eval.max_batches too.
  c.eval.tasks = ()                         # e.g. ('docstring_kind', 'fill_word')
  c.eval.num_examples_to_save = 5           # example predictions kept in each step_<N>.json

  # Decoding for metric evaluation and `python -m t5lite.infer` (t5lite/models/decoding.py).
  c.decode = ml_collections.ConfigDict()
  c.decode.method = 'greedy'                # greedy | sample | beam
  c.decode.max_decode_length = 0            # generated tokens (EOS included); 0 = the targets length
  c.decode.temperature = 1.0                # sample: logits / temperature; 0 = argmax
  c.decode.top_k = 0                        # sample: keep the k most likely tokens; 0 = off
  c.decode.top_p = 1.0                      # sample: nucleus probability mass; 1 = off
  c.decode.num_beams = 4                    # beam: more beams search wider, cost grows linearly
  c.decode.length_penalty_alpha = 0.6       # beam: score = log p / ((5 + len) / 6) ** alpha
  c.decode.seed = 0                         # sample: PRNG seed (per batch: fold_in(seed, batch))

  # Batch inference (python -m t5lite.infer): JSONL in, JSONL out, resumable.
  c.infer = ml_collections.ConfigDict()
  c.infer.batch_size = 0                    # 0 = eval.batch_size, else train.batch_size
  c.infer.input_key = 'inputs'              # JSONL field holding the input text
  c.infer.target_key = 'targets'            # copied to the output when present
  c.infer.on_too_long = 'truncate'          # truncate (counted warning) | error: an input longer than
                                            # data.inputs_length tokens (EOS included)
  c.infer.on_bad_line = 'error'             # error (names the line) | skip (counted): a line that is
                                            # not JSON, or has no input_key string
  return c


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/file.py[:arg]` -> get_config(arg)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'--config: no config file at {path!r}; pass a path such as '
                      'configs/quickstart.py')
  module_spec = importlib.util.spec_from_file_location('t5lite_user_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'--config: {path} defines no get_config(arg=None) function')
  return module.get_config(arg or None)


def _parse_value(raw: str):
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw  # a bare word is a string: --config.optimizer.name=adamw


def _type_name(value) -> str:
  return type(value).__name__


def set_override(config: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
  """Applies `config.<dotted> = raw`, checking that the key exists and the type fits."""
  parts = dotted.split('.')
  node = config
  for depth, part in enumerate(parts):
    here = '.'.join(parts[:depth + 1])
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      siblings = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, siblings, n=1)
      hint = f" Did you mean '{'.'.join(parts[:depth] + close)}'?" if close else ''
      parent = '.'.join(parts[:depth]) or 'config'
      raise ConfigError(f"unknown config key '{here}'.{hint} Valid keys under {parent}: "
                        f"{', '.join(siblings)}")
    if depth < len(parts) - 1:
      node = node[part]
  key, old = parts[-1], node[parts[-1]]
  value = _parse_value(raw)
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, str) and not isinstance(value, str):
    value = raw  # --config.model.size=11 should still be the string '11'
  type_ok = old is None or type(value) is type(old)
  if not type_ok or isinstance(old, ml_collections.ConfigDict):
    raise ConfigError(f"config.{dotted}: expected {_type_name(old)} (like {old!r}), got "
                      f"{_type_name(value)} {raw!r}")
  node[key] = value


def parse_command_line(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str | None]:
  """`--config FILE[:arg] --config.a.b=v ... --workdir DIR` -> (config, workdir)."""
  spec, workdir, overrides = None, None, []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith('--'):
      raise ConfigError(f'unexpected argument {arg!r}; use --config FILE[:arg], '
                        '--config.section.field=value and --workdir DIR')
    name, has_value, value = arg[2:].partition('=')
    if not has_value:
      if i + 1 >= len(args):
        raise ConfigError(f'--{name} needs a value')
      value, i = args[i + 1], i + 1
    if name == 'config':
      spec = value
    elif name == 'workdir':
      workdir = value
    elif name.startswith('config.'):
      overrides.append((name[len('config.'):], value))
    else:
      raise ConfigError(f'unknown flag --{name}; valid: --config, --config.<field>, --workdir')
    i += 1
  if spec is None:
    raise ConfigError('--config is required, e.g. --config configs/quickstart.py')
  config = load_config_file(spec)
  for dotted, value in overrides:
    set_override(config, dotted, value)
  return config, workdir


# ---------------------------------------------------------------------------------------------
# Validation


def _choice(value, field: str, valid: Sequence[str]) -> None:
  if value not in valid:
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    raise ConfigError(f'config.{field}={value!r} is not valid{hint}; valid: {", ".join(valid)}')


def _positive(value, field: str, allow_zero: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
      value == 0 and not allow_zero):
    need = 'a number >= 0' if allow_zero else 'a positive number'
    raise ConfigError(f'config.{field}={value!r}: must be {need}')


def _check_task(name: str, field: str = 'data.task') -> None:
  from t5lite.data import tasks  # the registry imports the data stack: only when validating
  try:
    tasks.get(name)
  except tasks.UnknownNameError as e:
    raise ConfigError(f'config.{field}={name!r}: {e.args[0]}') from None


def _check_eval(config) -> None:
  e, k = config.eval, config.checkpoint
  for field in ('every_steps', 'batch_size', 'max_batches'):
    _positive(e[field], f'eval.{field}', allow_zero=True)
  if e.every_steps and e.task:
    _check_task(e.task, 'eval.task')
  _check_metric_eval(config)
  _choice(k.keep_best_mode, 'checkpoint.keep_best_mode', ('min', 'max'))
  _positive(k.keep_best_n, 'checkpoint.keep_best_n')
  if k.keep_best_metric:
    if not e.every_steps:
      raise ConfigError(f'config.checkpoint.keep_best_metric={k.keep_best_metric!r} needs '
                        'evaluation: set eval.every_steps > 0')
    by_task = k.keep_best_metric.split('/')
    if not (len(by_task) == 3 and by_task[0] == 'eval' and by_task[1] in e.tasks):
      # eval/<task>/<metric> of a metric task is named by the task's metric fns: checked when
      # it is first logged; the validation values are known now.
      _choice(k.keep_best_metric, 'checkpoint.keep_best_metric', EVAL_VALUES)
    if k.every_steps % e.every_steps:
      raise ConfigError(f'config.checkpoint.every_steps={k.every_steps} is not a multiple of '
                        f'eval.every_steps={e.every_steps}: a checkpoint without '
                        f'{k.keep_best_metric} cannot be ranked; make it a multiple')


def _check_metric_eval(config) -> None:
  """eval.tasks, decode.* and infer.* (metric evaluation, eval and infer jobs)."""
  e, d, i = config.eval, config.decode, config.infer
  if not isinstance(e.tasks, (tuple, list)) or not all(isinstance(t, str) for t in e.tasks):
    raise ConfigError(f'config.eval.tasks={e.tasks!r}: must be a tuple of task names, e.g. '
                      "('docstring_kind',), or () for none")
  for name in e.tasks:
    _check_task(name, 'eval.tasks')
  _positive(e.num_examples_to_save, 'eval.num_examples_to_save', allow_zero=True)
  _choice(d.method, 'decode.method', ('greedy', 'sample', 'beam'))
  for field in ('max_decode_length', 'top_k', 'temperature'):
    _positive(d[field], f'decode.{field}', allow_zero=True)
  _positive(d.num_beams, 'decode.num_beams')
  if not 0 < d.top_p <= 1:
    raise ConfigError(f'config.decode.top_p={d.top_p!r}: must be in (0, 1] (1 = off)')
  _positive(i.batch_size, 'infer.batch_size', allow_zero=True)
  _choice(i.on_too_long, 'infer.on_too_long', ('truncate', 'error'))
  _choice(i.on_bad_line, 'infer.on_bad_line', ('error', 'skip'))


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with at most one -1 filled so that the product is `num_devices`."""
  dims = [mesh_cfg[a] for a in MESH_AXES]
  for axis, dim in zip(MESH_AXES, dims):
    if not isinstance(dim, int) or (dim < 1 and dim != -1):
      raise ConfigError(f'config.mesh.{axis}={dim!r}: must be a positive int or -1')
  if dims.count(-1) > 1:
    raise ConfigError('config.mesh: at most one of data, fsdp, tensor may be -1')
  known = 1
  for d in dims:
    known *= d if d != -1 else 1
  if -1 in dims:
    if num_devices % known:
      raise ConfigError(f'config.mesh: the fixed axes multiply to {known}, which does not divide '
                        f'the {num_devices} devices; choose sizes whose product divides '
                        f'{num_devices}')
    dims[dims.index(-1)] = num_devices // known
  product = dims[0] * dims[1] * dims[2]
  if product != num_devices:
    raise ConfigError(
        f'config.mesh: data*fsdp*tensor = {dims[0]}*{dims[1]}*{dims[2]} = {product}, but there are '
        f'{num_devices} devices; make the product {num_devices} (set one axis to -1 to fill it)')
  return tuple(dims)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks everything that can be checked without compute; returns the resolved mesh shape."""
  m = config.model
  _choice(m.variant, 'model.variant', presets.VARIANTS)
  _choice(m.architecture, 'model.architecture', presets.ARCHITECTURES)
  _choice(m.dtype, 'model.dtype', presets.DTYPES)
  _choice(m.remat_policy, 'model.remat_policy', presets.REMAT_POLICIES)
  for field in ('vocab_size', 'd_model', 'd_ff', 'num_heads', 'head_dim', 'num_decoder_layers',
                'relative_attention_num_buckets', 'relative_attention_max_distance'):
    _positive(m[field], f'model.{field}')
  if m.architecture == 'encoder_decoder':
    _positive(m.num_encoder_layers, 'model.num_encoder_layers')
  if m.attention_dim != m.num_heads * m.head_dim:
    raise ConfigError(
        f'config.model.attention_dim={m.attention_dim} but model.num_heads * model.head_dim = '
        f'{m.num_heads} * {m.head_dim} = {m.num_heads * m.head_dim}; set model.attention_dim='
        f'{m.num_heads * m.head_dim} or change num_heads/head_dim so their product is '
        f'{m.attention_dim}')
  if not 0 <= m.dropout_rate < 1:
    raise ConfigError(f'config.model.dropout_rate={m.dropout_rate}: must be in [0, 1)')

  _check_task(config.data.task)
  _positive(config.data.inputs_length, 'data.inputs_length')
  _positive(config.data.num_workers, 'data.num_workers', allow_zero=True)
  _positive(config.data.targets_length, 'data.targets_length', allow_zero=True)
  _choice(config.data.converter, 'data.converter', CONVERTERS)
  wanted = ('encdec',) if m.architecture == 'encoder_decoder' else ('decoder', 'prefix_lm')
  if config.data.converter not in wanted:
    raise ConfigError(f'config.data.converter={config.data.converter!r} does not feed '
                      f'model.architecture={m.architecture!r}; use data.converter in '
                      f'{", ".join(wanted)}')

  t = config.train
  for field in ('steps', 'batch_size', 'microbatches', 'log_every'):
    _positive(t[field], f'train.{field}')
  for field in ('z_loss', 'label_smoothing', 'max_grad_norm'):
    _positive(t[field], f'train.{field}', allow_zero=True)

  _choice(config.optimizer.name, 'optimizer.name', OPTIMIZERS)
  _positive(config.optimizer.learning_rate, 'optimizer.learning_rate')
  _choice(config.schedule.name, 'schedule.name', SCHEDULES)
  _positive(config.schedule.warmup_steps, 'schedule.warmup_steps', allow_zero=True)
  if not 0 <= config.schedule.decay_fraction <= 1:
    raise ConfigError(f'config.schedule.decay_fraction={config.schedule.decay_fraction}: must be '
                      'in [0, 1]')

  k = config.checkpoint
  for field in ('every_steps', 'keep'):
    if isinstance(k[field], bool) or not isinstance(k[field], int) or k[field] < 0:
      what = ('the save period in steps; 0 saves only at the end and on SIGTERM'
              if field == 'every_steps' else 'how many checkpoints to keep; 0 keeps all')
      raise ConfigError(f'config.checkpoint.{field}={k[field]!r}: must be an int >= 0 ({what})')
  if not isinstance(k.async_save, bool):
    raise ConfigError(f'config.checkpoint.async_save={k.async_save!r}: must be True or False')
  if not isinstance(k.init_from, str):
    raise ConfigError(f'config.checkpoint.init_from={k.init_from!r}: must be a path string '
                      "(a checkpoint step directory or WORKDIR/checkpoints; '' for none)")
  if k.init_from.startswith('hf:'):
    # A HuggingFace T5: its config.json must give config.model's shape (read now, before any
    # compute; fields such as relative_attention_max_distance change no param shape).
    from t5lite import hf  # pylint: disable=import-outside-toplevel  (the optional [hf] extra)
    try:
      problems = hf.config_mismatches(k.init_from[len('hf:'):], config.model)
    except hf.HFConversionError as e:
      raise ConfigError(f'config.checkpoint.init_from={k.init_from}: {e}') from None
    if problems:
      raise ConfigError(f'config.checkpoint.init_from={k.init_from}: config.model does not match '
                        'the HF model: ' + '; '.join(problems) + ' (python -m t5lite.convert '
                        'hf-to-t5lite prints the overrides)')
  pairs = k.init_rename
  if not isinstance(pairs, (tuple, list)) or not all(
      isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p)
      for p in pairs):
    raise ConfigError(f'config.checkpoint.init_rename={pairs!r}: must be a tuple of '
                      "(regex, replacement) string pairs, e.g. (('^encoder/', 'enc/'),)")
  patterns = k.init_ignore
  if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) for p in patterns):
    raise ConfigError(f'config.checkpoint.init_ignore={patterns!r}: must be a tuple of regex '
                      "strings, e.g. ('^decoder/logits_dense/',)")
  for field, regexes in (('init_rename', [p[0] for p in pairs]), ('init_ignore', patterns)):
    for regex in regexes:
      try:
        re.compile(regex)
      except re.error as e:
        raise ConfigError(f'config.checkpoint.{field}: {regex!r} is not a valid regex ({e})')

  _check_eval(config)

  shape = mesh_shape(config.mesh, num_devices)
  data_parallel = shape[0] * shape[1]
  per_pass = t.batch_size // t.microbatches if t.batch_size % t.microbatches == 0 else None
  if per_pass is None:
    raise ConfigError(f'config.train.batch_size={t.batch_size} is not divisible by '
                      f'train.microbatches={t.microbatches}')
  if per_pass % data_parallel:
    raise ConfigError(
        f'config.train.batch_size={t.batch_size} (per microbatch {per_pass}) is not divisible by '
        f'the data-parallel size mesh.data*mesh.fsdp = {shape[0]}*{shape[1]} = {data_parallel}; '
        f'use a batch size that is a multiple of {data_parallel * t.microbatches}')
  eval_batch = config.eval.batch_size or t.batch_size
  if (config.eval.every_steps or config.eval.tasks) and eval_batch % data_parallel:
    raise ConfigError(f'config.eval.batch_size={eval_batch} is not divisible by the data-parallel '
                      f'size mesh.data*mesh.fsdp = {data_parallel}; use a multiple of '
                      f'{data_parallel}')
  rules = config.partitioning.rules
  for rule in rules:
    if len(rule) != 2:
      raise ConfigError(f'config.partitioning.rules: each rule is (logical_name, mesh_axes), '
                        f'got {rule!r}')
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for axis in axes:
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f'config.partitioning.rules: {rule!r} names mesh axis {axis!r}; valid '
                          f'mesh axes: {", ".join(MESH_AXES)}')
  return shape


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config as JSON (and the readable repr) to the workdir."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  with open(path, 'w') as f:
    json.dump(config.to_dict(), f, indent=2, default=str)
  with open(os.path.join(workdir, 'config.txt'), 'w') as f:
    f.write(str(config))
  return path
