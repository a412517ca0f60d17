"""A LoRA model's params for HuggingFace (`python -m t5lite.convert t5lite-to-hf`; LoRA itself is
t5lite/models/lora.py): merged into the kernels, as a peft adapter, or the base alone.

  --merge_lora         W' = W + (alpha / r) A B per adapted kernel, written as a plain HF T5: it
                       computes the LoRA model's function (dropout aside, as in eval).
  --lora_adapter_only  adapter_config.json + adapter_model.safetensors, which
                       `peft.PeftModel.from_pretrained(base, DIR)` loads onto the base model (the
                       base exported without the factors: --drop_lora, or the checkpoint the LoRA
                       run started from). Refused when train.trainable also trained other params
                       (an adapter holds the factors only: use --merge_lora).
  --drop_lora          the params without the factors: the base model the adapter applies to.

peft's layout (peft 0.1x, tuners/lora): module M of the HF model gets M.lora_A (nn.Linear in ->
r, weight [r, in]) and M.lora_B (r -> out, weight [out, r]); y = M(x) + lora_B(lora_A(dropout(x)))
* lora_alpha / r; the adapter file names them 'base_model.model.<M>.lora_A.weight'. t5lite's A is
[in dims..., r] and B [r, out dims...], with HF's in/out dims split per head where the kernel is
(t5lite/hf.py's layouts): flattening those dims row-major gives HF's order (as hf.py's heads).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from t5lite import files, hf

FACTORS = ('lora_a', 'lora_b')  # t5lite/models/lora.py's param names


class LoraExportError(Exception):
  """A one-line reason the LoRA export cannot run."""


def _flat(params: Mapping) -> dict[str, np.ndarray]:
  flat = {n: np.asarray(x) for n, x in hf.flatten(params).items()}
  scanned = any(re.match(r'(encoder|decoder)/layers/', n) for n in flat)
  return hf.unstack_layers(flat) if scanned else flat


def split(
    params: Mapping) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
  """(the other params, flat and unstacked; {kernel name: (A, B)} of the LoRA factors)."""
  flat = _flat(params)
  base = {n: x for n, x in flat.items() if n.rsplit('/', 1)[-1] not in FACTORS}
  pairs = {}
  for n in flat:
    if n.endswith('/lora_a'):
      module = n[:-len('/lora_a')]
      pairs[f'{module}/kernel'] = (flat[n], flat[f'{module}/lora_b'])
  return base, pairs


def lora_fields(model: Mapping) -> tuple[int, float, float]:
  """(rank, alpha, dropout) of a saved config.model block."""
  return (int(model.get('lora_rank',
                        0)), float(model.get('lora_alpha',
                                             0.0)), float(model.get('lora_dropout', 0.0)))


def merged(params: Mapping, model: Mapping) -> dict[str, np.ndarray]:
  """The params with every adapted kernel replaced by W + (alpha / r) A B, the factors dropped
  (flat, unstacked: hf.t5lite_to_hf takes them)."""
  rank, alpha, _ = lora_fields(model)
  base, pairs = split(params)
  for name, (a, b) in pairs.items():
    w = base[name]
    delta = (a.reshape(-1, rank).astype(np.float64) @ b.reshape(rank, -1)) * (alpha / rank)
    base[name] = (w.astype(np.float64) + delta.reshape(w.shape)).astype(w.dtype)
  return base


def _hf_modules(model: Mapping) -> dict[str, str]:
  """{t5lite kernel name: HF module name} of the weight kernels (hf.weight_map)."""
  return {
      name: hf_name[:-len('.weight')] for hf_name, name, kind, _, _ in hf.weight_map(model)
      if kind != 'copy' and hf_name != 'lm_head.weight'
  }


def adapter(params: Mapping, model: Mapping,
            base_model: str = '') -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(adapter_config.json's dict, adapter_model.safetensors' tensors) in peft's names."""
  rank, alpha, dropout = lora_fields(model)
  _, pairs = split(params)
  modules = _hf_modules(model)
  unknown = sorted(n for n in pairs if n not in modules)
  if unknown:
    raise LoraExportError(f'LoRA factors on {", ".join(unknown[:3])}: no HF module to put them on')
  tensors = {}
  for name, (a, b) in sorted(pairs.items()):
    key = f'base_model.model.{modules[name]}'
    tensors[f'{key}.lora_A.weight'] = np.ascontiguousarray(a.reshape(-1, rank).T, np.float32)
    tensors[f'{key}.lora_B.weight'] = np.ascontiguousarray(b.reshape(rank, -1).T, np.float32)
  adapted = sorted(modules[n] for n in pairs)
  short = sorted({m.rsplit('.', 1)[-1] for m in adapted})
  # peft: a list matches every module whose name ends in one of them; a string is a regex that
  # must fullmatch the module name. The short names when they pick out exactly these modules.
  every = sorted(m for m in modules.values() if m.rsplit('.', 1)[-1] in short)
  targets = short if every == adapted else '|'.join(re.escape(m) for m in adapted)
  config = {
      'peft_type': 'LORA',
      'task_type': 'SEQ_2_SEQ_LM',
      'r': rank,
      'lora_alpha': alpha,
      'lora_dropout': dropout,
      'target_modules': targets,
      'base_model_name_or_path': base_model or None,
      'bias': 'none',
      'fan_in_fan_out': False,
      'inference_mode': True,
      'init_lora_weights': True,
      'modules_to_save': None,
      'use_rslora': False,
  }
  return config, tensors


def write_adapter(out_dir: str, config: dict, tensors: dict[str, np.ndarray]) -> list[str]:
  """Writes adapter_config.json and adapter_model.safetensors under `out_dir` (local or a URL)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  with files.local_output(out_dir) as local:
    os.makedirs(local, exist_ok=True)
    save_file(tensors, os.path.join(local, 'adapter_model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(local, 'adapter_config.json'), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
  return ['adapter_model.safetensors', 'adapter_config.json']


def check_adapter_only(config: Mapping) -> None:
  """An adapter holds the factors only: refused when train.trainable trained other params too."""
  trainable = (config.get('train') or {}).get('trainable') or ()
  if trainable:
    raise LoraExportError(
        f'--lora_adapter_only: the run also trained train.trainable={tuple(trainable)!r}, which '
        'a LoRA adapter does not hold; export the whole model with --merge_lora')


FLAGS = {'merge': '--merge_lora', 'adapter': '--lora_adapter_only', 'base': '--drop_lora'}


def prepare(config: Mapping, params: Mapping, mode: str = '', base_model: str = ''):
  """(params for hf.save_hf or None, (adapter config, tensors) or None) of a checkpoint's saved
  `config` and `params` for the export `mode` ('' plain, or a FLAGS key)."""
  model = config['model']
  if 'prompt' in params:
    # Checked first: a soft prompt is part of the model whatever the flags, and neither an HF T5
    # nor a peft LoRA adapter has a place for it.
    raise LoraExportError(
        f'the checkpoint has a soft prompt (prompt/embedding, model.prompt_length='
        f'{model.get("prompt_length")}): an HF T5 and a peft LoRA adapter have no place for '
        'it, so a prompt-tuned model is not exported; evaluate and infer with t5lite itself')
  base, pairs = split(params)
  if not mode:
    if pairs:
      raise LoraExportError(
          f'the checkpoint has LoRA factors (model.lora_rank={model.get("lora_rank")}): pass '
          '--merge_lora (one HF model computing the LoRA model), --lora_adapter_only (a peft '
          'adapter) or --drop_lora (the base model without the factors)')
    return params, None
  if not pairs:
    raise LoraExportError(
        f'{FLAGS[mode]}: the checkpoint has no LoRA factors (model.lora_rank='
        f'{model.get("lora_rank", 0)}); it is a plain model: convert it without {FLAGS[mode]}')
  if mode == 'merge':
    return merged(params, model), None
  if mode == 'base':
    return base, None
  check_adapter_only(config)
  return None, adapter(params, model, base_model)
