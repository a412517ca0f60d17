"""HuggingFace T5 <-> t5lite: weights and config, both ways, exactly, or a refusal that says why.

Supported: `T5ForConditionalGeneration` / `MT5ForConditionalGeneration` /
`UMT5ForConditionalGeneration` checkpoints, whose
  - output layer is tied to `shared` with logits rescaled by d_model**-0.5 (T5 v1.0)
    <-> t5lite variant 'v1_0', or untied and not rescaled (T5.1.1 / Flan-T5 / mT5 / UMT5)
    <-> variant 'v1_1';
  - MLP (feed_forward_proj) is 'relu', 'gated-gelu' (tanh-GELU, 'gelu_new'), 'gated-silu' (UL2)
    or 'gated-relu' <-> model.mlp_activation ('' when it is the variant's own: v1_0 relu,
    v1_1 gated-gelu);
  - relative position bias is one per stack (t5, mt5) or one per self-attention layer (umt5)
    <-> model.relpos_per_layer False / True.
Anything else t5lite cannot compute the same way (tied-but-not-rescaled outputs, another
activation, layer_norm_epsilon != 1e-6, ...) raises HFConversionError naming the HF field and
its value: a silently different model is worse than none.

The files themselves (config.json, safetensors / torch weights, local or gs://) are read and
written by t5lite/hf_files.py; this module maps what they hold. Its names (HFConversionError,
read_config, read_tensors, model_dir, is_model_dir, ...) are re-exported here. transformers is
not imported.

Layouts. HF's nn.Linear weight is [out, in]; t5lite kernels are [in, out], attention ones split
per head: query/key/value [d_model, heads, head_dim], out [heads, head_dim, d_model]. HF's head
split is `view(..., heads, head_dim)` on the out axis, so a transpose plus reshape maps one onto
the other: bitwise exact, both ways. T5 / mT5 keep a stack's relative position bias in block
0's self-attention ([buckets, heads]) and share it with the other blocks, as t5lite's one
`relpos_bias` table per stack does; UMT5 has one in every block's self-attention
(transformers' UMT5Attention with has_relative_attention_bias=True), t5lite's per-layer
`layers_<i>/relpos_bias` (relpos_per_layer). HF attention has no 1/sqrt(d) either, so nothing is
rescaled.

transformers 5.x note (measured with 5.23): T5Config always sets tie_word_embeddings=True in the
model and keeps the old flag's meaning as `scale_decoder_outputs`; from_pretrained unties lm_head
when the file holds an lm_head.weight that differs from shared.weight. MT5 in 5.x never rescales.
UMT5Config does the same. So here: rescaling comes from `scale_decoder_outputs` when the file has
it, else from `tie_word_embeddings` (default True), never for model_type mt5; tying comes from
the tensors.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from t5lite.models import presets
# Re-exported: callers use hf.HFConversionError, hf.read_config, ... (one import for HF interop).
from t5lite.hf_files import (  # pylint: disable=unused-import
    HFConversionError, HFFileError, is_model_dir, model_dir, numpy_dtype, read_config, read_tensors,
    write_model_dir)

HF_PREFIX = 'hf:'  # checkpoint.init_from=hf:PATH
MODEL_TYPES = ('t5', 'mt5', 'umt5')
ARCHITECTURES = ('T5ForConditionalGeneration', 'MT5ForConditionalGeneration',
                 'UMT5ForConditionalGeneration')
# The t5lite config.model fields that a HF config determines (all others keep the user's values).
MODEL_FIELDS = ('variant', 'vocab_size', 'd_model', 'd_ff', 'num_heads', 'head_dim',
                'attention_dim', 'num_encoder_layers', 'num_decoder_layers', 'mlp_activation',
                'relpos_per_layer', 'relative_attention_num_buckets',
                'relative_attention_max_distance')
# Their values in configs written before they existed (a t5lite checkpoint's saved config.model).
LATER_FIELDS = {'mlp_activation': '', 'relpos_per_layer': False}
# All the tanh approximation of GELU that t5lite's gated gelu computes (nn.gelu(approximate=True)).
TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh')
# HF dense_act_fn -> the t5lite gate activation of a gated MLP (gated-X); silu's other HF name is
# swish (transformers' ACT2FN maps both to nn.SiLU).
GATED_ACTS = {**{g: 'gelu' for g in TANH_GELUS}, 'silu': 'silu', 'swish': 'silu', 'relu': 'relu'}
LAYER_NORM_EPSILON = 1e-6  # t5lite's RMSNorm epsilon (fixed)
# HF ignores this one on load (cross-attention has no position bias); old checkpoints carry it.
IGNORED = ('decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',)
# Copies of `shared` that some (older) checkpoints also store; accepted when bitwise equal.
EMBEDDING_COPIES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')

# ---------------------------------------------------------------------------------------------
# Config: HF config.json <-> t5lite config.model fields


def _int_field(config: dict, name: str, default: Any = None) -> int:
  value = config.get(name, default)
  if value is None:
    raise HFConversionError(f'config.json has no {name}: it is needed to build the model')
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise HFConversionError(f'config.json {name}={value!r}: must be a positive int')
  return value


def _rescales_outputs(config: dict) -> bool:
  """Whether HF multiplies the decoder output by d_model**-0.5 before lm_head (see module doc)."""
  if config.get('model_type') == 'mt5':
    return False
  if 'scale_decoder_outputs' in config:
    return bool(config['scale_decoder_outputs'])
  return config.get('tie_word_embeddings', True) is not False


def _scale_field(config: dict) -> str:
  if config.get('model_type') == 'mt5':
    return 'model_type=mt5 (never rescaled by transformers 5.x)'
  if 'scale_decoder_outputs' in config:
    return f'scale_decoder_outputs={config["scale_decoder_outputs"]!r}'
  return f'tie_word_embeddings={config.get("tie_word_embeddings", True)!r}'


def _activation(config: dict, model_type) -> str:
  """The MLP activation (presets.MLP_ACTIVATIONS) of a HF T5 config, as transformers derives it:
  from feed_forward_proj, unless the file also stores the derived dense_act_fn / is_gated_act
  (which then win, as they do in transformers 5.x)."""
  proj = config.get('feed_forward_proj', 'relu' if model_type == 't5' else 'gated-gelu')
  parts = str(proj).split('-')
  gated, act = parts[0] == 'gated', parts[-1]
  if proj == 'gated-gelu':
    act = 'gelu_new'  # transformers' backwards-compatible meaning: the tanh approximation
  act = config.get('dense_act_fn', act)
  gated = config.get('is_gated_act', gated)
  what = f'feed_forward_proj={proj!r} (dense_act_fn={act!r}, is_gated_act={gated!r})'
  if gated and act not in GATED_ACTS:
    raise HFConversionError(
        f'config.json {what}: a gated MLP with activation {act!r}; t5lite\'s gated MLPs are '
        f'{", ".join(a for a in presets.MLP_ACTIVATIONS if a.startswith("gated-"))} (gelu: the '
        'tanh approximation, gelu_new)')
  if not gated and act != 'relu':
    raise HFConversionError(f'config.json {what}: a non-gated MLP with activation {act!r}; '
                            't5lite\'s non-gated MLP is ReLU only')
  return f'gated-{GATED_ACTS[act]}' if gated else 'relu'


def model_config_from_hf(config: dict, tensors: Mapping[str, np.ndarray] | None = None) -> dict:
  """The t5lite config.model fields (MODEL_FIELDS) of a HF T5 config.json.

  With `tensors`, also checks the output layer against them (tied or untied: the weights decide,
  as transformers 5.x does). Raises HFConversionError naming the HF field t5lite cannot follow.
  """
  model_type = config.get('model_type')
  if model_type not in MODEL_TYPES:
    raise HFConversionError(f'config.json model_type={model_type!r}: not a T5 model (t5lite '
                            f'converts model_type {", ".join(MODEL_TYPES)})')
  archs = config.get('architectures') or []
  if archs and archs[0] not in ARCHITECTURES:
    raise HFConversionError(f'config.json architectures={archs!r}: t5lite converts '
                            f'{" / ".join(ARCHITECTURES)} (encoder, decoder and lm_head)')
  if config.get('is_encoder_decoder', True) is not True:
    raise HFConversionError(f'config.json is_encoder_decoder={config["is_encoder_decoder"]!r}: '
                            'only encoder-decoder T5 checkpoints convert')
  epsilon = config.get('layer_norm_epsilon', LAYER_NORM_EPSILON)
  if epsilon != LAYER_NORM_EPSILON:
    raise HFConversionError(f'config.json layer_norm_epsilon={epsilon!r}: t5lite\'s RMS norm uses '
                            f'{LAYER_NORM_EPSILON} (as every released T5); not convertible')
  activation = _activation(config, model_type)

  # Output layer. t5lite v1_0: tied and rescaled; v1_1: untied, not rescaled. Nothing else.
  variant = 'v1_0' if _rescales_outputs(config) else 'v1_1'
  if tensors is not None and 'shared.weight' in tensors:
    head = tensors.get('lm_head.weight')
    untied = head is not None and not (head.shape == tensors['shared.weight'].shape
                                       and np.array_equal(head, tensors['shared.weight']))
    if variant == 'v1_1' and head is None:
      raise HFConversionError(
          f'tensor lm_head.weight is missing with {_scale_field(config)}: that is tied embeddings '
          'without rescaling, which t5lite cannot represent (v1_1 has an untied lm_head)')
    if variant == 'v1_0' and untied:
      raise HFConversionError(
          f'tensor lm_head.weight differs from shared.weight with {_scale_field(config)}: an '
          'untied lm_head with rescaled logits, which t5lite cannot represent (v1_0 ties them)')

  num_layers = _int_field(config, 'num_layers')
  heads, head_dim = _int_field(config, 'num_heads'), _int_field(config, 'd_kv')
  return {
      'variant': variant,
      # '' when it is the variant's own, as a preset of that variant has it.
      'mlp_activation': '' if activation == presets.VARIANT_ACTIVATION[variant] else activation,
      'relpos_per_layer': model_type == 'umt5',
      'vocab_size': _int_field(config, 'vocab_size'),
      'd_model': _int_field(config, 'd_model'),
      'd_ff': _int_field(config, 'd_ff'),
      'num_heads': heads,
      'head_dim': head_dim,
      'attention_dim': heads * head_dim,
      'num_encoder_layers': num_layers,
      'num_decoder_layers': _int_field(config, 'num_decoder_layers', num_layers),
      # transformers' defaults, for configs written before these fields existed.
      'relative_attention_num_buckets': _int_field(config, 'relative_attention_num_buckets', 32),
      'relative_attention_max_distance': _int_field(config, 'relative_attention_max_distance', 128),
  }


def _fields(model_cfg) -> dict:
  """MODEL_FIELDS of a ModelConfig, a ConfigDict or a dict (LATER_FIELDS may be absent: a config
  saved before they existed), plus 'activation', the MLP's resolved activation."""

  def get(key):
    if hasattr(model_cfg, 'keys'):
      return model_cfg[key] if key in model_cfg or key not in LATER_FIELDS else LATER_FIELDS[key]
    return getattr(model_cfg, key)

  out = {k: get(k) for k in MODEL_FIELDS if k != 'attention_dim'}
  out['attention_dim'] = out['num_heads'] * out['head_dim']
  try:
    architecture = get('architecture')
  except (KeyError, AttributeError):
    architecture = 'encoder_decoder'
  if architecture != 'encoder_decoder':
    raise HFConversionError(f'model.architecture={architecture!r}: HF T5ForConditionalGeneration '
                            'is an encoder-decoder; only encoder_decoder models convert')
  if out['variant'] not in presets.VARIANTS:
    raise HFConversionError(f'model.variant={out["variant"]!r}: want v1_0 or v1_1')
  out['activation'] = out['mlp_activation'] or presets.VARIANT_ACTIVATION[out['variant']]
  if out['activation'] not in presets.MLP_ACTIVATIONS:
    raise HFConversionError(f'model.mlp_activation={out["mlp_activation"]!r}: want one of '
                            f'{", ".join(presets.MLP_ACTIVATION_CHOICES)}')
  return out


def hf_config_from_model_config(model_cfg, dropout_rate: float = 0.0) -> dict:
  """config.json for T5ForConditionalGeneration (UMT5ForConditionalGeneration with
  relpos_per_layer), read the same by transformers 4.x and 5.x."""
  c = _fields(model_cfg)
  v1_0 = c['variant'] == 'v1_0'
  gated = c['activation'].startswith('gated-')
  act = c['activation'].split('-')[-1]
  umt5 = bool(c['relpos_per_layer'])
  return {
      'architectures': ['UMT5ForConditionalGeneration' if umt5 else 'T5ForConditionalGeneration'],
      'model_type': 'umt5' if umt5 else 't5',
      'vocab_size': c['vocab_size'],
      'd_model': c['d_model'],
      'd_kv': c['head_dim'],
      'd_ff': c['d_ff'],
      'num_layers': c['num_encoder_layers'],
      'num_decoder_layers': c['num_decoder_layers'],
      'num_heads': c['num_heads'],
      'relative_attention_num_buckets': c['relative_attention_num_buckets'],
      'relative_attention_max_distance': c['relative_attention_max_distance'],
      'dropout_rate': dropout_rate,
      'layer_norm_epsilon': LAYER_NORM_EPSILON,
      'initializer_factor': 1.0,
      'feed_forward_proj': c['activation'],
      # T5Config's derivation, written out: gated-gelu means the tanh approximation.
      'dense_act_fn': 'gelu_new' if act == 'gelu' else act,
      'is_gated_act': gated,
      # 4.x: ties (and rescales) iff True; 5.x: rescales iff True, ties iff no separate lm_head.
      'tie_word_embeddings': v1_0,
      'is_encoder_decoder': True,
      'use_cache': True,
      # seqio/t5lite ids: pad 0 (also the decoder's start token), eos 1.
      'pad_token_id': 0,
      'eos_token_id': 1,
      'decoder_start_token_id': 0,
  }


def config_mismatches(path: str, model_config) -> list[str]:
  """'model.FIELD=x but PATH/config.json gives y' for each field that differs (config.json only,
  no tensors read): checkpoint.init_from=hf:PATH is validated with it before any compute."""
  want = model_config_from_hf(read_config(path))
  have = {k: model_config[k] for k in MODEL_FIELDS}
  architecture = model_config['architecture'] if 'architecture' in model_config else None
  if architecture not in (None, 'encoder_decoder'):
    return [f'model.architecture={architecture!r} but a HF T5 is an encoder_decoder']
  # The MLP is compared as computed: '' and the variant's own activation are the same MLP.
  resolve = lambda c: c['mlp_activation'] or presets.VARIANT_ACTIVATION.get(c['variant'])
  problems = []
  for k in MODEL_FIELDS:
    if k == 'mlp_activation':
      if resolve(have) != resolve(want):
        said = f'{want[k]!r}' + ('' if want[k] else f' (the variant\'s {resolve(want)})')
        problems.append(f'model.{k}={have[k]!r} but {path}/config.json gives {said}')
    elif have[k] != want[k]:
      problems.append(f'model.{k}={have[k]!r} but {path}/config.json gives {want[k]!r}')
  return problems


# ---------------------------------------------------------------------------------------------
# Weights


def weight_map(model_cfg) -> list[tuple[str, str, str, tuple, tuple]]:
  """(HF name, t5lite name with layers_<i>, kind, HF shape, t5lite shape) for every tensor.

  kind: 'qkv' ([h*k, d] <-> [d, h, k]), 'out' ([d, h*k] <-> [h, k, d]), 'dense' (transpose),
  'copy' (same array).
  """
  c = _fields(model_cfg)
  d, f, h, k = c['d_model'], c['d_ff'], c['num_heads'], c['head_dim']
  shapes = {
      'qkv': ((h * k, d), (d, h, k)), 'out': ((d, h * k), (h, k, d)), 'wi': ((f, d), (d, f)),
      'wo': ((d, f), (f, d)), 'norm': ((d,), (d,))
  }
  entries = []

  def add(hf_name, name, kind, shape_key):
    hf_shape, shape = shapes[shape_key]
    entries.append((hf_name, name, kind, hf_shape, shape))

  def attention(hf, name):
    for a, b in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      add(f'{hf}.{a}.weight', f'{name}/{b}/kernel', 'qkv', 'qkv')
    add(f'{hf}.o.weight', f'{name}/out/kernel', 'out', 'out')

  def mlp(hf, name):
    for wi in (('wi_0', 'wi_1') if c['activation'].startswith('gated-') else ('wi',)):
      add(f'{hf}.DenseReluDense.{wi}.weight', f'{name}/{wi}/kernel', 'dense', 'wi')
    add(f'{hf}.DenseReluDense.wo.weight', f'{name}/wo/kernel', 'dense', 'wo')

  def relpos(hf, name):
    shape = (c['relative_attention_num_buckets'], h)
    entries.append((f'{hf}.0.SelfAttention.relative_attention_bias.weight',
                    f'{name}/relpos_bias/rel_embedding', 'copy', shape, shape))

  for stack, n in (('encoder', c['num_encoder_layers']), ('decoder', c['num_decoder_layers'])):
    if not c['relpos_per_layer']:  # T5 / mT5: block 0's table, shared by the stack
      relpos(f'{stack}.block.0.layer', stack)
    for i in range(n):
      hf, t5 = f'{stack}.block.{i}.layer', f'{stack}/layers_{i}'
      if c['relpos_per_layer']:  # UMT5: every block's self-attention has its own table
        relpos(hf, t5)
      if stack == 'encoder':
        attention(f'{hf}.0.SelfAttention', f'{t5}/attention')
        add(f'{hf}.0.layer_norm.weight', f'{t5}/pre_attention_norm/scale', 'copy', 'norm')
        mlp(f'{hf}.1', f'{t5}/mlp')
        add(f'{hf}.1.layer_norm.weight', f'{t5}/pre_mlp_norm/scale', 'copy', 'norm')
      else:
        attention(f'{hf}.0.SelfAttention', f'{t5}/self_attention')
        add(f'{hf}.0.layer_norm.weight', f'{t5}/pre_self_attention_norm/scale', 'copy', 'norm')
        attention(f'{hf}.1.EncDecAttention', f'{t5}/encoder_decoder_attention')
        add(f'{hf}.1.layer_norm.weight', f'{t5}/pre_cross_attention_norm/scale', 'copy', 'norm')
        mlp(f'{hf}.2', f'{t5}/mlp')
        add(f'{hf}.2.layer_norm.weight', f'{t5}/pre_mlp_norm/scale', 'copy', 'norm')
    add(f'{stack}.final_layer_norm.weight', f'{stack}/final_norm/scale', 'copy', 'norm')
  vocab = (c['vocab_size'], d)
  entries.append(('shared.weight', 'token_embedder/embedding', 'copy', vocab, vocab))
  if c['variant'] == 'v1_1':
    entries.append(('lm_head.weight', 'logits_dense/kernel', 'dense', vocab, (d, c['vocab_size'])))
  return entries


def _to_t5lite(kind: str, w: np.ndarray, shape: tuple) -> np.ndarray:
  if kind == 'copy':
    return w
  return np.ascontiguousarray(w.T.reshape(shape))  # qkv, out, dense: transpose then split heads


def _to_hf(kind: str, w: np.ndarray, hf_shape: tuple) -> np.ndarray:
  if kind == 'copy':
    return np.ascontiguousarray(w)
  # Inverse of _to_t5lite: merge heads back (row-major, as HF's view) then transpose.
  return np.ascontiguousarray(w.reshape(hf_shape[::-1]).T)


def _listing(title: str, items: list[str], first: int = 5) -> str:
  more = f'\n    ... and {len(items) - first} more' if len(items) > first else ''
  return f'\n  {len(items)} {title}:\n    ' + '\n    '.join(items[:first]) + more


def hf_to_t5lite_flat(tensors: Mapping[str, np.ndarray], model_cfg, scan_layers: bool = False,
                      source: str = 'the HF checkpoint') -> dict[str, np.ndarray]:
  """{t5lite '/'-joined param name: float32 array} from HF tensors; every HF tensor must be used
  (or be one of the known redundant ones) and have the shape the config implies."""
  entries = weight_map(model_cfg)
  expected = {e[0] for e in entries}
  missing, shapes, extra = [], [], []
  for hf_name, _, _, hf_shape, _ in entries:
    if hf_name not in tensors:
      missing.append(f'{hf_name} (expected shape {hf_shape})')
    elif tuple(tensors[hf_name].shape) != hf_shape:
      shapes.append(f'{hf_name}: {tuple(tensors[hf_name].shape)}, expected {hf_shape}')
  shared = tensors.get('shared.weight')
  for name in sorted(set(tensors) - expected):
    if name in IGNORED:
      continue
    if name in EMBEDDING_COPIES + ('lm_head.weight',) and shared is not None and np.array_equal(
        tensors[name], shared):
      continue  # a stored copy of the tied embedding (v1_0 lm_head, old embed_tokens copies)
    if re.fullmatch(
        r'(en|de)coder\.block\.[1-9]\d*\.layer\.0\.SelfAttention\.'
        r'relative_attention_bias\.weight', name):
      extra.append(f'{name}: a per-layer relative attention bias (as in UMT5) in a checkpoint '
                   'whose config.json says one per stack (model_type t5 / mt5)')
    elif name in EMBEDDING_COPIES:
      extra.append(f'{name}: differs from shared.weight; t5lite shares one embedding')
    else:
      extra.append(f'{name} {tuple(tensors[name].shape)}')
  if missing or shapes or extra:
    message = f'{source} does not fit its config.json:'
    if missing:
      message += _listing('missing tensors', missing)
    if shapes:
      message += _listing('tensors with the wrong shape', shapes)
    if extra:
      message += _listing('tensors t5lite has no place for', extra)
    raise HFConversionError(message)
  flat = {
      name: _to_t5lite(kind,
                       np.asarray(tensors[hf_name]).astype(np.float32),
                       shape) for hf_name, name, kind, _, shape in entries
  }
  return stack_layers(flat) if scan_layers else flat


def stack_layers(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """layers_<i>/... -> layers/... stacked on a leading axis (t5lite's scan_layers=True layout)."""
  groups: dict[str, dict[int, np.ndarray]] = {}
  out = {}
  for name, x in flat.items():
    m = re.fullmatch(r'(encoder|decoder)/layers_(\d+)/(.*)', name)
    if m:
      groups.setdefault(f'{m[1]}/layers/{m[3]}', {})[int(m[2])] = x
    else:
      out[name] = x
  for name, per_layer in groups.items():
    out[name] = np.stack([per_layer[i] for i in range(len(per_layer))])
  return out


def unstack_layers(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of stack_layers; names without a stacked `layers/` pass through."""
  out = {}
  for name, x in flat.items():
    m = re.fullmatch(r'(encoder|decoder)/layers/(.*)', name)
    if m:
      for i in range(x.shape[0]):
        out[f'{m[1]}/layers_{i}/{m[2]}'] = x[i]
    else:
      out[name] = x
  return out


def flatten(params: Mapping) -> dict[str, Any]:
  out = {}
  for key, value in params.items():
    if isinstance(value, Mapping):
      out.update({f'{key}/{k}': v for k, v in flatten(value).items()})
    else:
      out[str(key)] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def t5lite_to_hf(params: Mapping, model_cfg, dtype=np.float32) -> dict[str, np.ndarray]:
  """HF tensors from a t5lite param tree (either layout); names and shapes must fit model_cfg."""
  flat = flatten(params)
  scanned = any(re.match(r'(encoder|decoder)/layers/', n) for n in flat)
  flat = unstack_layers({n: np.asarray(x) for n, x in flat.items()}) if scanned else flat
  entries = weight_map(model_cfg)
  wanted = {name: shape for _, name, _, _, shape in entries}
  missing = sorted(f'{n} (expected {s})' for n, s in wanted.items() if n not in flat)
  extra = sorted(f'{n} {np.shape(flat[n])}' for n in flat if n not in wanted)
  shapes = sorted(f'{n}: {np.shape(flat[n])}, expected {s}' for n, s in wanted.items()
                  if n in flat and tuple(np.shape(flat[n])) != s)
  if missing or extra or shapes:
    message = 'the t5lite params do not fit the model config:'
    if missing:
      message += _listing('params missing', missing)
    if shapes:
      message += _listing('params with the wrong shape', shapes)
    if extra:
      message += _listing('params HF T5 has no place for', extra)
    raise HFConversionError(message)
  return {
      hf_name: _to_hf(kind, np.asarray(flat[name]), hf_shape).astype(dtype)
      for hf_name, name, kind, hf_shape, _ in entries
  }


# ---------------------------------------------------------------------------------------------
# Directory-level entry points


def load_hf(path: str, scan_layers: bool = False) -> tuple[dict, dict]:
  """(t5lite config.model fields, nested float32 numpy params) of a HF model directory."""
  config = read_config(path)
  model_fields = model_config_from_hf(config)  # config errors first: they say more
  tensors = read_tensors(path)
  model_fields = model_config_from_hf(config, tensors)
  flat = hf_to_t5lite_flat(tensors, model_fields, scan_layers, source=model_dir(path))
  return model_fields, unflatten(flat)


def save_hf(params: Mapping, model_cfg, out_dir: str, dtype: str = 'float32',
            dropout_rate: float = 0.0) -> list[str]:
  """Writes model.safetensors, config.json and generation_config.json under `out_dir` (local or a
  URL), loadable by T5ForConditionalGeneration.from_pretrained. Returns the written file names."""
  tensors = t5lite_to_hf(params, model_cfg, numpy_dtype(dtype))
  config = hf_config_from_model_config(model_cfg, dropout_rate)
  # generate() reads these; without decoder_start_token_id transformers 5.x cannot start decoding.
  generation = {'decoder_start_token_id': 0, 'eos_token_id': 1, 'pad_token_id': 0}
  return write_model_dir(out_dir, tensors, config, generation)


def load_flat_for_init(path: str, scan_layers: bool) -> dict[str, np.ndarray]:
  """{'/'-joined t5lite param name: float32 array} for checkpoint.init_from=hf:PATH; PATH local
  or a URL (gs://...: the weights are read into memory, nothing is written locally)."""
  _, params = load_hf(path, scan_layers)
  return flatten(params)
