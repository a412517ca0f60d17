"""Convert checkpoints between HuggingFace T5 and t5lite (the weights maths is in t5lite/hf.py).

    python -m t5lite.convert hf-to-t5lite --model HF_DIR --out WORKDIR [--scan_layers]
    python -m t5lite.convert t5lite-to-hf --checkpoint PATH --out HF_DIR [--dtype bfloat16]
        [--merge_lora | --lora_adapter_only [--base_model NAME] | --drop_lora]
    python -m t5lite.convert t5x-to-t5lite --checkpoint T5X_DIR/checkpoint_N --out WORKDIR \
        [--scan_layers] [--mlp_activation gated-silu]

t5x-to-t5lite (the reading and the name mapping are in t5lite/t5x.py) writes WORKDIR the same way
as hf-to-t5lite; `--config.checkpoint.init_from=t5x:T5X_DIR/checkpoint_N` converts in memory.

hf-to-t5lite writes WORKDIR/checkpoints/0/ the way a training run writes its checkpoints (orbax
`state` item holding {'params': ...}, `config` item holding {'model': ...}), so
`--config.checkpoint.init_from=WORKDIR` reads it and so does t5lite-to-hf; it also writes
WORKDIR/model_config.json and prints the `--config.model.*` overrides that build the same model.
(`--config.checkpoint.init_from=hf:HF_DIR` skips this step and converts in memory.) When HF_DIR
holds a tokenizer (spiece.model, tokenizer.json or a ByT5Tokenizer config), its identity (kind,
size, sha256 of the file) is recorded in both and `--config.data.vocabulary=hf:HF_DIR` is printed
too; a fine-tune on another vocabulary is refused (t5lite/config_rules.py).

t5lite-to-hf reads PATH (a workdir, its checkpoints/ directory or one step directory; the newest
complete step is used), takes the model config from the checkpoint's saved config, and writes
model.safetensors, config.json and generation_config.json for
`T5ForConditionalGeneration.from_pretrained(HF_DIR)`, and the tokenizer files (spiece.model,
tokenizer_config.json, special_tokens_map.json; t5lite/data/hf_vocab.py) of the vocabulary the
checkpoint records (a training run's data.vocabulary, a conversion's tokenizer) or --vocabulary
names, for `AutoTokenizer.from_pretrained(HF_DIR)`. Only the params are read, never the optimizer
state. A LoRA checkpoint (model.lora_rank > 0) takes one of --merge_lora, --lora_adapter_only,
--drop_lora (t5lite/lora_export.py); they refuse a checkpoint without LoRA factors.

Every path may be a gs:// URL (pip install 't5lite[gcp]'): an HF model on gs:// is read into
memory, an HF --out on gs:// is written locally and then uploaded, and t5lite checkpoints are read
and written there by orbax. Info lines say what is being read and written.

Errors (a missing path, a non-T5 model, a config t5lite cannot represent, a tensor that does not
fit, an --out that cannot be written) print one line and exit with status 2; a weights file that
cannot be read (truncated, corrupt) or a failed write, with status 1. SIGTERM stops it with a
message and status 0 (remove --out and run again).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import Sequence

from t5lite import cli, files, hf, lora_export
from t5lite import config as config_lib
from t5lite.data import hf_vocab, vocab

log = logging.getLogger('t5lite.convert')  # not __name__: '__main__' under python -m


class ConvertError(Exception):
  """A one-line reason the conversion cannot run."""


def _overrides(model: dict, tokenizer: dict | None = None) -> list[str]:
  vocabulary = ([f'--config.data.vocabulary={shlex.quote(tokenizer["vocabulary"])}']
                if tokenizer else [])
  # Quoted for a shell: mlp_activation='' (the variant's) must survive a copy and paste.
  return [
      f'--config.model.{k}={shlex.quote(str(model[k]))}' for k in hf.MODEL_FIELDS + ('scan_layers',)
  ] + vocabulary


def _hf_tokenizer(model_path: str, model_vocab_size: int) -> dict | None:
  """The record (t5lite/data/hf_vocab.py) of the tokenizer in the HF directory, None if none."""
  if not vocab.has_hf_tokenizer(model_path):
    return None
  spec = vocab.HF_PREFIX + hf.model_dir(model_path)
  try:
    rec = hf_vocab.record(vocab.load_hf_tokenizer(model_path), spec)
  except (OSError, ValueError, RuntimeError) as e:
    raise ConvertError(f'--model {model_path}: its tokenizer cannot be read: {e}') from None
  if rec['vocab_size'] > model_vocab_size:
    raise ConvertError(f'--model {model_path}: its tokenizer has {rec["vocab_size"]} ids, more '
                       f'than the model\'s {model_vocab_size} embedding rows')
  return rec


def hf_to_t5lite(model_path: str, out: str, scan_layers: bool = False) -> dict:
  """Converts the HF model directory `model_path` into a t5lite checkpoint under `out`; returns
  the t5lite config.model block written beside it."""
  if not files.to_path(model_path).is_dir():
    raise ConvertError(f'--model {model_path}: no such directory')
  cli.check_folder(out, '--out')
  out = os.fspath(files.to_path(out))  # absolute if local; a URL kept as it is
  held = files.to_path(out) / 'checkpoints'
  if held.is_dir() and any(held.iterdir()):
    raise ConvertError(f'--out {out}: it already holds checkpoints; choose an empty directory')
  log.info(f'reading the HuggingFace model {hf.model_dir(model_path)} ...')
  fields, params = hf.load_hf(model_path, scan_layers)  # all checks before anything is written
  tokenizer = _hf_tokenizer(model_path, fields['vocab_size'])

  # Imported here: JAX/orbax start-up is not needed for the checks above.
  from t5lite import checkpoints  # pylint: disable=import-outside-toplevel
  from t5lite.models import presets  # pylint: disable=import-outside-toplevel
  model = presets.model_config('tiny', fields['variant']).to_dict()
  model.update(fields)
  model.update(size='custom', scan_layers=bool(scan_layers))
  hf_config = hf.read_config(model_path)
  source = {
      'hf_model': hf.model_dir(model_path), 'model_type': hf_config.get('model_type'),
      'architectures': hf_config.get('architectures'), 'tokenizer': tokenizer
  }
  log.info(f'writing the t5lite checkpoint {files.join(out, "checkpoints", "0")} ...')
  ckpt = checkpoints.Checkpointer(out, async_save=False)
  try:
    ckpt.save(0, {'params': params}, {}, {'model': model, 'converted_from': source})
  finally:
    ckpt.close()
  files.write_text(
      files.join(out, 'model_config.json'),
      json.dumps(
          {'model': model, 'overrides': _overrides(model, tokenizer), 'converted_from': source},
          indent=2))
  return model


def _read_step(step_dir: str) -> tuple[dict, dict]:
  """(saved config, params as nested numpy dicts) of a t5lite step directory."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  config_dir = files.join(step_dir, 'config')
  if not files.to_path(config_dir).is_dir():
    raise ConvertError(f'{step_dir}: no saved config (config/ item), so the model config is '
                       'unknown')
  config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(config_dir)
  if 'model' not in config:
    raise ConvertError(f'{config_dir}: the saved config has no model block')
  state_dir = files.join(step_dir, 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(state_dir)
  metadata = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(metadata, 'tree', metadata)
  if 'params' not in tree:
    raise ConvertError(f'{state_dir}: no params in the saved state')
  # Params only, on one device whatever mesh wrote them (the optimizer state is never read).
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        tree['params'], is_leaf=lambda x: hasattr(x, 'shape'))
  restored = checkpointer.restore(
      state_dir, args=ocp.args.PyTreeRestore(
          item={'params': target},
          restore_args={'params': ocp.checkpoint_utils.construct_restore_args(target)},
          partial_restore=True))['params']
  return config, jax.tree.map(np.asarray, restored)


def _vocabulary_for_hf(config: dict, spec: str | None, step_dir: str):
  """(the t5lite vocabulary to write beside the model or None, what the output line says of it):
  `spec` (--vocabulary; 'none' writes none), else the one the checkpoint's config records."""
  data = config.get('data') if isinstance(config.get('data'), dict) else {}
  sp_size = int(data.get('sp_vocab_size', vocab.DEFAULT_SP_VOCAB_SIZE))
  if spec == 'none':
    return None, 'no tokenizer files (--vocabulary none)'
  rec, where = None, '--vocabulary'
  if spec is None:
    rec, where = hf_vocab.model_tokenizer(config)
    if rec is None:
      return None, (f'no tokenizer files: {step_dir} records no vocabulary t5lite can read '
                    f'({where}); pass --vocabulary (as data.vocabulary) to write them')
    spec = rec['vocabulary']
  try:
    vocabulary = vocab.get_vocabulary(spec, sp_size)
  except FileNotFoundError as e:
    raise ConvertError(f'{e} ({where}); pass --vocabulary') from None
  if vocabulary is None:
    raise ConvertError(f'vocabulary {spec!r} ({where}) names no one vocabulary; pass --vocabulary')
  if rec is not None and hf_vocab.mismatch(hf_vocab.record(vocabulary, spec), rec):
    now = hf_vocab.describe(hf_vocab.record(vocabulary, spec))
    raise ConvertError(f'the vocabulary {where} was {hf_vocab.describe(rec)}, but {spec} is now '
                       f'{now}; pass --vocabulary')
  return vocabulary, f'its tokenizer ({spec})'


def t5lite_to_hf(checkpoint: str, out: str, dtype: str = 'float32', vocabulary: str | None = None,
                 lora: str = '', base_model: str = '') -> tuple[str, dict, str]:
  """Writes the t5lite checkpoint `checkpoint` as a HF T5 under `out`, with the tokenizer files
  of `vocabulary` (a data.vocabulary value; None: the one the checkpoint records; 'none': none);
  (step dir, model block, what was said of the tokenizer). `lora` (a LoRA checkpoint's export,
  t5lite/lora_export.py): 'merge', 'base', or 'adapter' (a peft adapter for `base_model`, alone)."""
  if not files.to_path(checkpoint).exists():
    raise ConvertError(f'--checkpoint {checkpoint}: no such path')
  for name in ('config.json', 'model.safetensors'):
    if files.to_path(out).joinpath(name).exists():
      raise ConvertError(f'--out {out}: it already holds {name}; choose an empty directory')
  cli.check_folder(out, '--out')
  from t5lite import checkpoints  # pylint: disable=import-outside-toplevel
  try:
    step_dir = checkpoints.resolve_init_path(checkpoint)
  except checkpoints.CheckpointError as e:
    raise ConvertError(str(e).replace('checkpoint.init_from=', '--checkpoint ')) from None
  log.info(f'reading the params of {step_dir} ...')
  config, params = _read_step(step_dir)
  model = config['model']
  try:
    params, peft = lora_export.prepare(config, params, lora, base_model)
  except lora_export.LoraExportError as e:
    raise ConvertError(str(e)) from None
  if peft is not None:
    log.info(f'writing the peft LoRA adapter {os.fspath(files.to_path(out))} ...')
    return step_dir, model, ', '.join(lora_export.write_adapter(out, *peft))
  tokenizer, said = _vocabulary_for_hf(config, vocabulary, step_dir)
  if tokenizer is not None and tokenizer.vocab_size > int(model['vocab_size']):
    raise ConvertError(f'the vocabulary {tokenizer!r} has more ids than the model\'s '
                       f'{model["vocab_size"]} embedding rows; pass --vocabulary')
  log.info(f'writing the HuggingFace model {os.fspath(files.to_path(out))} ...')
  hf.save_hf(params, model, out, dtype, dropout_rate=float(model.get('dropout_rate', 0.0)))
  if tokenizer is None:
    log.warning(f'{said}: AutoTokenizer.from_pretrained will not find the model\'s tokenizer')
  else:
    names = hf_vocab.write_tokenizer(tokenizer, out)
    said += f': {", ".join(names)}'
  return step_dir, model, said


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m t5lite.convert',
                                   description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  a = sub.add_parser('hf-to-t5lite', help='HF T5 directory -> t5lite checkpoint (a workdir)')
  a.add_argument('--model', required=True, help='HF model directory (config.json + weights)')
  a.add_argument('--out', required=True, help='directory for the t5lite checkpoint')
  a.add_argument('--scan_layers', action='store_true',
                 help='write layers stacked on a leading axis (config.model.scan_layers=True)')
  t = sub.add_parser('t5x-to-t5lite', help='T5X checkpoint -> t5lite checkpoint (a workdir)')
  t.add_argument('--checkpoint', required=True,
                 help='a T5X checkpoint directory, DIR/checkpoint_N (orbax or legacy format)')
  t.add_argument('--out', required=True, help='directory for the t5lite checkpoint')
  t.add_argument('--scan_layers', action='store_true',
                 help='write layers stacked on a leading axis (config.model.scan_layers=True)')
  t.add_argument(
      '--mlp_activation', default='',
      choices=('', 'gated-gelu', 'gated-silu', 'gated-relu', 'relu'),
      help='the MLP activation, which T5X checkpoints do not record: a gated MLP '
      '(wi_0, wi_1) is read as gated-gelu (T5.1.1, Flan-T5, mT5, ByT5) unless this '
      'says otherwise, e.g. gated-silu for UL2')
  b = sub.add_parser('t5lite-to-hf', help='t5lite checkpoint -> HF T5 directory')
  b.add_argument('--checkpoint', required=True,
                 help='t5lite workdir, its checkpoints/ directory or a step directory')
  b.add_argument('--out', required=True, help='directory for the HF model')
  b.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='dtype of the written tensors (t5lite params are float32)')
  b.add_argument(
      '--vocabulary', default=None,
      help='the tokenizer to write, as data.vocabulary (embedded, byte, hf:DIR, a '
      '.model path) or none; default: the one the checkpoint records')
  lora = b.add_mutually_exclusive_group()  # a LoRA checkpoint (model.lora_rank > 0) needs one
  lora.add_argument('--merge_lora', dest='lora', action='store_const', const='merge', default='',
                    help='LoRA: write W + (alpha/r) A B, a plain HF T5 computing the LoRA model')
  lora.add_argument(
      '--lora_adapter_only', dest='lora', action='store_const', const='adapter',
      help='LoRA: write only a peft adapter (adapter_config.json, '
      'adapter_model.safetensors) for PeftModel.from_pretrained(base, OUT)')
  lora.add_argument('--drop_lora', dest='lora', action='store_const', const='base',
                    help='LoRA: write the base model, without the LoRA factors')
  b.add_argument('--base_model', default='',
                 help="--lora_adapter_only: the adapter's base_model_name_or_path")
  args = parser.parse_args(argv)

  def body():
    if args.command == 'hf-to-t5lite':
      model = hf_to_t5lite(args.model, args.out, args.scan_layers)
      out = os.fspath(files.to_path(args.out))
      print(f'wrote a t5lite checkpoint of {hf.model_dir(args.model)} '
            f'({model["variant"]}) to {files.join(out, "checkpoints", "0")} and its model '
            f'config to {files.join(out, "model_config.json")}')
      tokenizer = json.loads(files.read_text(files.join(out, 'model_config.json')))
      tokenizer = tokenizer['converted_from']['tokenizer']
      if tokenizer is None:
        print(f'{hf.model_dir(args.model)} holds no tokenizer (spiece.model, tokenizer.json): '
              '--config.data.vocabulary must name the one the model was trained with '
              f'({model["vocab_size"]} embedding rows)')
      else:
        print(f'its tokenizer: {hf_vocab.describe(tokenizer)}')
      print('fine-tune from it with these overrides:')
      print(' '.join(_overrides(model, tokenizer) + [f'--config.checkpoint.init_from={out}']))
    elif args.command == 't5x-to-t5lite':
      from t5lite import t5x  # pylint: disable=import-outside-toplevel
      cli.check_folder(args.out, '--out')
      try:
        model = t5x.to_t5lite_workdir(args.checkpoint, args.out, args.scan_layers,
                                      args.mlp_activation)
      except t5x.T5XError as e:
        raise ConvertError(str(e)) from None
      out = os.fspath(files.to_path(args.out))
      print(f'wrote a t5lite checkpoint of the T5X checkpoint {args.checkpoint} '
            f'({model["variant"]}, {model["mlp_activation"]}) to '
            f'{files.join(out, "checkpoints", "0")} and its model config to '
            f'{files.join(out, "model_config.json")}')
      print('fine-tune from it with these overrides (T5X checkpoints record no vocabulary: '
            'add --config.data.vocabulary=PATH/TO/its/spm.model):')
      print(' '.join(t5x.config_overrides(model) + [f'--config.checkpoint.init_from={out}']))
    else:
      step_dir, model, said = t5lite_to_hf(args.checkpoint, args.out, args.dtype, args.vocabulary,
                                           args.lora, args.base_model)
      if args.lora == 'adapter':
        print(f'wrote a peft LoRA adapter of {step_dir} to {os.fspath(files.to_path(args.out))}: '
              f'{said}')
        return
      kind = 'UMT5' if model.get('relpos_per_layer') else 'T5'
      print(
          f'wrote a HuggingFace {kind}ForConditionalGeneration ({model["variant"]}) of {step_dir} '
          f'to {os.fspath(files.to_path(args.out))}, with {said}')

  errors = [(files.MissingFileSystemError, 'convert error', 2),
            (hf.HFFileError, 'convert error', 1), (ConvertError, 'convert error', 2),
            (hf.HFConversionError, 'convert error', 2),
            (config_lib.ConfigError, 'convert error', 2), (OSError, 'convert error', 1)]
  return cli.run_main(
      body, errors, stopped='convert: stopped by SIGTERM before it finished; '
      'remove --out and run again')


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
