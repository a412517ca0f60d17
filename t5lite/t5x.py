"""T5X checkpoints -> t5lite: read both on-disk formats, map the names, infer the model config.

    python -m t5lite.convert t5x-to-t5lite --checkpoint T5X_DIR/checkpoint_N --out WORKDIR
    --config.checkpoint.init_from=t5x:T5X_DIR/checkpoint_N        (converted in memory)

Formats (T5X's t5x/checkpoints.py; both hold the same tree: `target/<params>`, `state/step` and
Adafactor's `state/param_states/<param path>/{m, v, v_row, v_col}`):
  - orbax (what T5X's train.py writes by default): `state/_METADATA` lists the leaves; each is a
    zarr array (v2, or v3 when `use_zarr3`) under the key `<dot.joined.path>/` of one OCDBT
    key-value store in `state/` (or a folder of that name when `use_ocdbt` is false);
  - legacy (`use_orbax=False`, and Google's released checkpoints under gs://t5-data): a flax
    msgpack file `checkpoint` ({'version', 'optimizer': {'target', 'state'}}) whose small leaves
    are inline ndarrays and whose large ones are tensorstore specs of zarr folders
    `<dot.joined.path>/` relative to the checkpoint directory.
Both are read with tensorstore (local paths or gs:// URLs) and flax's msgpack reader: no pickle.

Networks: `t5x.examples.t5.network` (unscanned): v1.0 (`wi`, ReLU, logits tied to the embedding
and scaled by emb_dim**-0.5) -> variant v1_0; T5.1.1 / Flan-T5 / mT5 / ByT5 / UL2 (`wi_0`,
`wi_1`, own `decoder/logits_dense`) -> variant v1_1. A checkpoint does not record the MLP's
activation, only that it is gated (`wi_0`, `wi_1`): gated is taken as gated-GELU (T5.1.1's
('gelu', 'linear')) unless `mlp_activation` says otherwise, e.g. 'gated-silu' for UL2 (T5X gin
`mlp_activations = ('silu', 'linear')`). relative_attention_max_distance is not stored either:
T5X's network fixes it at 128 (as t5lite's default).

Layouts (T5X's network.py vs t5lite/models/layers.py): T5X attention kernels are joined over
heads, query/key/value [emb, heads*head_dim] and out [heads*head_dim, emb], head-major, so a
reshape gives t5lite's [emb, heads, head_dim] / [heads, head_dim, emb]; the relative position
table is [heads, buckets] in T5X and [buckets, heads] in t5lite (a transpose); everything else
is the same array under another name (`*_layer_norm` -> `*_norm`, `encoder_norm` /
`decoder_norm` -> `final_norm`, `decoder/logits_dense` -> `logits_dense`). Neither scales
attention logits by 1/sqrt(head_dim) nor the input embedding by sqrt(emb_dim).

Optimizer state: `adafactor_stats` maps T5X's Adafactor second moments onto optax's Adafactor
state (init_from=t5x: with optimizer.name='adafactor', t5lite/init_from.py). t5lite's attention
kernels are 3-D, so optax may factor (or not) where T5X did not (or did); the statistics then go
through the full second moment that Adafactor divides by. T5X's first moment `m` (beta1) has no
counterpart: t5lite's Adafactor keeps none.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from typing import Iterable

import numpy as np

from t5lite import files

GATED_DEFAULT = 'gated-gelu'  # T5.1.1's ('gelu', 'linear'): a gated checkpoint's default


class T5XError(ValueError):
  """Not a T5X checkpoint, one t5lite cannot represent, or one that does not fit: says why."""


# ---------------------------------------------------------------------------------------------
# Finding and reading a checkpoint


def _url(path: str) -> str:
  """A tensorstore kvstore URL for a local path or a gs:// URL."""
  return path if files.is_url(path) else 'file://' + os.fspath(files.to_path(path))


def checkpoint_dir(path: str) -> str:
  """The T5X checkpoint directory that `path` names: DIR/checkpoint_N itself, or DIR whose
  highest checkpoint_N is taken. Absolute (a URL as it is); T5XError when there is none."""
  path = os.fspath(files.to_path(path))
  folder = files.to_path(path)
  if not folder.is_dir():
    raise T5XError(f'{path}: no such directory (want a T5X checkpoint directory, '
                   'T5X_DIR/checkpoint_N)')
  if _format(path) is not None:
    return path
  steps = sorted((int(m[1]), e.name) for e in folder.iterdir()
                 if (m := re.fullmatch(r'checkpoint_(\d+)', e.name)) and _format(str(e)))
  if steps:
    return files.join(path, steps[-1][1])
  raise T5XError(f'{path}: not a T5X checkpoint (want T5X_DIR/checkpoint_N holding state/_METADATA '
                 '(orbax, what T5X writes by default) or a msgpack file `checkpoint` (the legacy '
                 'format of the released checkpoints))')


def _format(path: str) -> str | None:
  folder = files.to_path(path)
  if (folder / 'state' / '_METADATA').is_file():
    return 'orbax'
  if (folder / 'checkpoint').is_file():
    return 'legacy'
  return None


class Checkpoint:
  """One T5X checkpoint: `shapes` ('/'-joined leaf name -> shape) without reading any array;
  `read(names)` -> {name: numpy array}."""

  def __init__(self, path: str):
    self.path = checkpoint_dir(path)
    self.format = _format(self.path)
    self._specs: dict[str, dict] = {}  # name -> tensorstore spec
    self._inline: dict[str, np.ndarray] = {}  # legacy: arrays stored in the msgpack file
    if self.format == 'orbax':
      self._index_orbax()
    else:
      self._index_legacy()
    self._shapes: dict[str, tuple] | None = None
    self._param_map: dict[str, tuple[str, str]] | None = None

  def _index_orbax(self) -> None:
    state = files.join(self.path, 'state')
    try:
      metadata = json.loads(files.read_text(files.join(state, '_METADATA')))
      tree = metadata['tree_metadata']
    except (ValueError, KeyError, TypeError) as e:
      raise T5XError(
          f'{state}/_METADATA: not orbax tree metadata ({type(e).__name__}: {e})') from None
    driver = 'zarr3' if metadata.get('use_zarr3') else 'zarr'
    ocdbt = metadata.get('use_ocdbt', files.to_path(files.join(state, 'manifest.ocdbt')).exists())
    for entry in tree.values():
      keys = [str(k['key']) for k in entry['key_metadata']]
      key = '.'.join(keys) + '/'
      # OCDBT (orbax's default since 2023) leaves a manifest; per-array zarr folders do not.
      if ocdbt:
        kvstore = {'driver': 'ocdbt', 'base': _url(state) + '/', 'path': key}
      else:
        kvstore = _url(files.join(state, key)) + '/'
      self._specs['/'.join(keys)] = {'driver': driver, 'kvstore': kvstore}

  def _index_legacy(self) -> None:
    from flax import serialization  # pylint: disable=import-outside-toplevel  (ships with t5lite)
    file = files.join(self.path, 'checkpoint')
    try:
      tree = serialization.msgpack_restore(files.read_bytes(file))
      tree = tree['optimizer']
    except Exception as e:  # pylint: disable=broad-except  (msgpack's own error types)
      raise T5XError(f'{file}: not a T5X msgpack checkpoint ({type(e).__name__}: {e})') from None

    def walk(node, prefix):
      if isinstance(node, dict) and node.get('driver') in ('zarr', 'zarr3'):  # a spec
        self._specs[prefix] = self._legacy_spec(node)
      elif isinstance(node, dict):
        for k, v in node.items():
          walk(v, f'{prefix}/{k}' if prefix else str(k))
      elif node is not None:
        self._inline[prefix] = np.asarray(node)

    walk(tree, '')

  def _legacy_spec(self, spec: dict) -> dict:
    """The stored spec with its relative path made absolute (T5X writes it relative to the
    checkpoint directory; older tensorstore specs put `path` beside a driver string)."""
    kvstore = spec.get('kvstore', {})
    if isinstance(kvstore, str):
      kvstore = {'path': kvstore}
    rel = kvstore.get('path', spec.get('path'))
    if rel is None:
      raise T5XError(f'{self.path}/checkpoint: a tensorstore spec without a path: {spec}')
    where = rel if files.is_url(rel) or os.path.isabs(rel) else files.join(self.path, rel)
    return {'driver': spec['driver'], 'kvstore': _url(where.rstrip('/')) + '/'}

  def _open(self, name: str):
    import tensorstore as ts  # pylint: disable=import-outside-toplevel  (ships with orbax)
    try:
      return ts.open(self._specs[name], open=True).result()
    except Exception as e:  # pylint: disable=broad-except  (tensorstore's errors)
      raise T5XError(f'{self.path}: cannot read the array {name} ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:300]})') from None

  @property
  def shapes(self) -> dict[str, tuple]:
    if self._shapes is None:
      shapes = {n: tuple(x.shape) for n, x in self._inline.items()}
      shapes.update({n: tuple(self._open(n).shape) for n in self._specs})  # metadata only
      self._shapes = shapes
    return self._shapes

  def param_map(self) -> dict[str, tuple[str, str]]:
    """t5x.param_map of this checkpoint, computed once."""
    if self._param_map is None:
      self._param_map = param_map(self.shapes)
    return self._param_map

  def read(self, names: Iterable[str]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
      if name in self._inline:
        out[name] = self._inline[name]
      elif name in self._specs:
        out[name] = np.asarray(self._open(name).read().result())
      else:
        raise T5XError(f'{self.path}: no array {name}')
    return out


# ---------------------------------------------------------------------------------------------
# Names and config (T5X's t5x.examples.t5.network names)

_RENAMES = (  # (T5X name under target/, t5lite name); i = layer index
    (r'token_embedder/embedding', 'token_embedder/embedding'),
    (r'(encoder|decoder)/relpos_bias/rel_embedding', r'\1/relpos_bias/rel_embedding'),
    (r'encoder/encoder_norm/scale', 'encoder/final_norm/scale'),
    (r'decoder/decoder_norm/scale', 'decoder/final_norm/scale'),
    (r'decoder/logits_dense/kernel', 'logits_dense/kernel'),
    (r'(encoder/layers_\d+)/(pre_attention|pre_mlp)_layer_norm/scale', r'\1/\2_norm/scale'),
    (r'(decoder/layers_\d+)/(pre_self_attention|pre_cross_attention|pre_mlp)_layer_norm/scale',
     r'\1/\2_norm/scale'),
    (r'(encoder/layers_\d+/attention|decoder/layers_\d+/(?:self_attention|'
     r'encoder_decoder_attention))/(query|key|value|out)/kernel', r'\1/\2/kernel'),
    (r'((?:en|de)coder/layers_\d+)/mlp/(wi|wi_0|wi_1|wo)/kernel', r'\1/mlp/\2/kernel'),
)


def t5lite_name(name: str) -> str | None:
  """The t5lite param name of a T5X param name (without `target/`); None if it has none."""
  for pattern, replacement in _RENAMES:
    if re.fullmatch(pattern, name):
      return re.sub(pattern, replacement, name)
  return None


def _kind(name: str) -> str:
  if name.endswith('rel_embedding'):
    return 'transpose'  # [heads, buckets] -> [buckets, heads]
  if re.search(r'/(query|key|value)/kernel$', name):
    return 'split_out'  # [emb, heads*head_dim] -> [emb, heads, head_dim]
  if name.endswith('/out/kernel'):
    return 'split_in'  # [heads*head_dim, emb] -> [heads, head_dim, emb]
  return 'copy'


def to_t5lite_array(kind: str, x: np.ndarray, heads: int) -> np.ndarray:
  """A T5X array (a param, or a full second-moment `v` of the same shape) in t5lite's layout."""
  if kind == 'transpose':
    return np.ascontiguousarray(x.T)
  if kind == 'split_out':
    return x.reshape(x.shape[0], heads, x.shape[1] // heads)
  if kind == 'split_in':
    return x.reshape(heads, x.shape[0] // heads, x.shape[1])
  return x


def _params(shapes: dict[str, tuple]) -> dict[str, tuple]:
  return {n[len('target/'):]: s for n, s in shapes.items() if n.startswith('target/')}


def model_fields(shapes: dict[str, tuple], mlp_activation: str = '',
                 source: str = 'the T5X checkpoint') -> dict:
  """The t5lite config.model fields of a T5X checkpoint, from its param shapes alone."""
  params = _params(shapes)
  if not params:
    raise T5XError(f'{source}: no target/ params (not a T5X TrainState)')
  unknown = sorted(n for n in params if t5lite_name(n) is None)
  if unknown:
    scanned = any(re.search(r'/layers/|(en|de)coder/(en|de)coder/', n) for n in unknown)
    hint = ' (layers stacked by T5X\'s scan_layers=True: not read)' if scanned else ''
    raise T5XError(f'{source}: params outside t5x.examples.t5.network\'s layout{hint}: '
                   + ', '.join(unknown[:5])
                   + (f' ... and {len(unknown) - 5} more' if len(unknown) > 5 else ''))

  def need(name):
    if name not in params:
      raise T5XError(f'{source}: no target/{name}, so not a t5x.examples.t5.network T5')
    return params[name]

  vocab, d_model = need('token_embedder/embedding')
  heads, buckets = need('encoder/relpos_bias/rel_embedding')
  attention_dim = need('encoder/layers_0/attention/query/kernel')[1]
  if attention_dim % heads:
    raise T5XError(f'{source}: query kernel width {attention_dim} is not a multiple of the '
                   f'{heads} heads of relpos_bias')
  layers = {
      stack: len({m[1] for n in params if (m := re.match(rf'{stack}/layers_(\d+)/', n))})
      for stack in ('encoder', 'decoder')
  }
  gated = 'encoder/layers_0/mlp/wi_0/kernel' in params
  tied = 'decoder/logits_dense/kernel' not in params
  if gated == tied:
    raise T5XError(
        f'{source}: a {"gated" if gated else "ReLU (wi)"} MLP with '
        f'{"tied" if tied else "untied (logits_dense)"} logits; t5lite has v1_0 (wi, tied) and '
        'v1_1 (wi_0/wi_1, untied) only')
  if gated:
    activation = mlp_activation or GATED_DEFAULT
    if not activation.startswith('gated-'):
      raise T5XError(f'mlp_activation={mlp_activation!r}, but {source} has a gated MLP (wi_0, '
                     'wi_1): want gated-gelu, gated-silu or gated-relu')
  else:
    activation = mlp_activation or 'relu'
    if activation != 'relu':
      raise T5XError(f'mlp_activation={mlp_activation!r}, but {source} has a one-matrix MLP '
                     '(wi): T5 v1.0\'s ReLU is the only one t5lite has')
  fields = {
      'variant': 'v1_1' if gated else 'v1_0',
      'vocab_size': vocab,
      'd_model': d_model,
      'd_ff': need('encoder/layers_0/mlp/wo/kernel')[0],
      'num_heads': heads,
      'head_dim': attention_dim // heads,
      'attention_dim': attention_dim,
      'num_encoder_layers': layers['encoder'],
      'num_decoder_layers': layers['decoder'],
      'relative_attention_num_buckets': buckets,
      'relative_attention_max_distance': 128,  # fixed in T5X's network.py
      'mlp_activation': activation,
      'relpos_per_layer': False,  # T5X's network shares one table per stack
  }
  return fields


def param_map(shapes: dict[str, tuple]) -> dict[str, tuple[str, str]]:
  """{t5lite name: (T5X name under target/, kind)} for every param."""
  return {t5lite_name(n): (n, _kind(n)) for n in _params(shapes)}


def flat_params(ckpt: Checkpoint, fields: dict, scan_layers: bool = False) -> dict[str, np.ndarray]:
  """{t5lite '/'-joined name: float32 array} of a T5X checkpoint's params."""
  from t5lite import hf  # pylint: disable=import-outside-toplevel  (stack_layers)
  mapping = param_map(ckpt.shapes)
  values = ckpt.read('target/' + old for old, _ in mapping.values())
  flat = {
      new: to_t5lite_array(kind, values['target/' + old].astype(np.float32), fields['num_heads'])
      for new, (old, kind) in mapping.items()
  }
  return hf.stack_layers(flat) if scan_layers else flat


def step(ckpt: Checkpoint) -> int:
  if 'state/step' not in ckpt.shapes:
    raise T5XError(f'{ckpt.path}: no state/step')
  return int(ckpt.read(['state/step'])['state/step'])


def load(path: str, scan_layers: bool = False, mlp_activation: str = '') -> tuple[dict, dict]:
  """(t5lite config.model fields, {t5lite name: float32 array}) of the T5X checkpoint `path`."""
  ckpt = Checkpoint(path)
  fields = model_fields(ckpt.shapes, mlp_activation, ckpt.path)
  return fields, flat_params(ckpt, fields, scan_layers)


def config_mismatches(path: str, model_config) -> list[str]:
  """'model.FIELD=x but PATH gives y' for each config.model field the T5X checkpoint at `path`
  determines and the config sets otherwise; reads shapes only (checkpoint.init_from=t5x:).
  A gated checkpoint takes the config's gated activation (T5X does not record which)."""
  from t5lite.models import presets  # pylint: disable=import-outside-toplevel
  get = lambda k, default=None: model_config[k] if k in model_config else default
  ckpt = Checkpoint(path)
  config_activation = get('mlp_activation') or presets.VARIANT_ACTIVATION.get(get('variant'), '')
  want = model_fields(ckpt.shapes, '', ckpt.path)
  if want['mlp_activation'].startswith('gated-') and config_activation.startswith('gated-'):
    want['mlp_activation'] = config_activation
  problems = []
  for k, v in want.items():
    have = config_activation if k == 'mlp_activation' else get(k)
    if k == 'attention_dim' and have is None:
      have = get('num_heads') * get('head_dim')
    if k == 'relpos_per_layer':
      have = bool(have)
    if have != v:
      problems.append(f'model.{k}={have!r} but {ckpt.path} gives {v!r}')
  return problems


# ---------------------------------------------------------------------------------------------
# Adafactor's second moments (T5X's t5x/adafactor.py and optax.scale_by_factored_rms keep the
# same statistics: `v` for an unfactored param; for a factored one, with d0 its largest and d1
# its second-largest dim, `v_row` = the mean of g^2 over d0 and `v_col` = the mean over d1).


def _factored_axes(shape: tuple, row_shape: tuple, col_shape: tuple) -> tuple[int, int]:
  """(d1, d0) such that shape minus d0 is `row_shape` and shape minus d1 is `col_shape`; the
  size rule of both optimizers (np.argsort, stable) decides between equal dims."""
  order = [int(i) for i in np.argsort(shape)]
  d1, d0 = order[-2], order[-1]
  drop = lambda d: tuple(s for i, s in enumerate(shape) if i != d)
  if drop(d0) == tuple(row_shape) and drop(d1) == tuple(col_shape):
    return d1, d0
  for a in range(len(shape)):
    for b in range(len(shape)):
      if a != b and drop(b) == tuple(row_shape) and drop(a) == tuple(col_shape):
        return a, b
  raise T5XError(f'factored statistics {tuple(row_shape)} / {tuple(col_shape)} do not fit a '
                 f'param of shape {tuple(shape)}')


def _full_v(shape: tuple, v: np.ndarray, v_row: np.ndarray, v_col: np.ndarray) -> np.ndarray:
  """The second moment Adafactor divides by, as a full array of the param's shape: `v` itself,
  or the factored estimate v_row (normalised by its mean) times v_col, as both compute it."""
  if tuple(v.shape) == tuple(shape):
    return v
  d1, d0 = _factored_axes(shape, v_row.shape, v_col.shape)
  reduced_d1 = d1 - 1 if d1 > d0 else d1
  row = v_row / np.mean(v_row, axis=reduced_d1, keepdims=True)
  return np.expand_dims(row, d0) * np.expand_dims(v_col, d1)


def _t5x_names(ckpt: Checkpoint, name: str) -> list[tuple[str, str]]:
  """[(T5X param name, kind)] behind a t5lite name: one, or one per layer for a stacked one."""
  mapping = ckpt.param_map()
  m = re.fullmatch(r'(encoder|decoder)/layers/(.*)', name)
  if not m:
    return [mapping[name]]
  count = len({x[1] for k in mapping if (x := re.match(rf'{m[1]}/layers_(\d+)/', k))})
  return [mapping[f'{m[1]}/layers_{i}/{m[2]}'] for i in range(count)]


def adafactor_stats(ckpt: Checkpoint, name: str, heads: int,
                    shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
  """{'v_row', 'v_col', 'v'} for the t5lite param `name` in the shapes optax's Adafactor state
  gives them (`shapes`: the param's own under 'param', and the three statistics'), from the T5X
  statistics of the param(s) behind it. Copied as they are where both factor the same array the
  same way or neither factors it; otherwise through the full second moment (`_full_v`), reduced
  to optax's rows and columns by the same means Adafactor takes."""
  sources = _t5x_names(ckpt, name)
  stats = []
  for t5x_name, kind in sources:
    base = f'state/param_states/{t5x_name}/'
    values = ckpt.read(base + s for s in ('v', 'v_row', 'v_col'))
    stats.append((ckpt.shapes['target/' + t5x_name], kind,
                  {s: values[base + s].astype(np.float32) for s in ('v', 'v_row', 'v_col')}))
  param_shape = tuple(shapes['param'])
  factored = tuple(shapes['v']) != param_shape
  if len(sources) == 1 and stats[0][1] == 'copy' and tuple(stats[0][0]) == param_shape:
    same = stats[0][2]
    t5x_factored = tuple(same['v'].shape) != param_shape
    if factored == t5x_factored and all(
        tuple(same[s].shape) == tuple(shapes[s]) for s in ('v', 'v_row', 'v_col')):
      return same
  full = [to_t5lite_array(kind, _full_v(shape, **s), heads) for shape, kind, s in stats]
  full = full[0] if len(full) == 1 else np.stack(full)
  if full.shape != param_shape:
    raise T5XError(f'{name}: the T5X statistics give shape {full.shape}, the param is '
                   f'{param_shape}')
  one = np.zeros((1,), np.float32)
  if not factored:
    return {'v': full, 'v_row': one, 'v_col': one}
  d1, d0 = _factored_axes(param_shape, shapes['v_row'], shapes['v_col'])
  return {'v': one, 'v_row': np.mean(full, axis=d0), 'v_col': np.mean(full, axis=d1)}


def first_moment_used(ckpt: Checkpoint) -> bool:
  """Whether T5X kept a first moment `m` (beta1 set): t5lite's Adafactor has none to carry it."""
  return any(
      n.startswith('state/param_states/') and n.endswith('/m') and s != (1,)
      for n, s in ckpt.shapes.items())


# ---------------------------------------------------------------------------------------------
# t5x-to-t5lite: a t5lite workdir, written as convert.hf_to_t5lite writes one


def model_config(fields: dict, scan_layers: bool = False) -> dict:
  """The whole t5lite config.model block of a converted checkpoint's fields."""
  from t5lite.models import presets  # pylint: disable=import-outside-toplevel
  model = presets.model_config('tiny', fields['variant']).to_dict()
  model.update(fields)
  model.update(size='custom', scan_layers=bool(scan_layers))
  return model


def config_overrides(model: dict) -> list[str]:
  """The --config.model.* flags that build a converted checkpoint's model."""
  keys = ('variant', 'vocab_size', 'd_model', 'd_ff', 'num_heads', 'head_dim', 'attention_dim',
          'num_encoder_layers', 'num_decoder_layers', 'mlp_activation',
          'relative_attention_num_buckets', 'relative_attention_max_distance', 'scan_layers')
  return [f'--config.model.{k}={shlex.quote(str(model[k]))}' for k in keys]  # '' survives a shell


def to_t5lite_workdir(checkpoint: str, out: str, scan_layers: bool = False,
                      mlp_activation: str = '') -> dict:
  """Converts the T5X checkpoint `checkpoint` into a t5lite checkpoint WORKDIR `out`
  (checkpoints/0 holding the params, model_config.json); returns its config.model block.
  Params only: a run continuing with Adafactor gets T5X's optimizer state through
  checkpoint.init_from=t5x:... instead."""
  from t5lite import checkpoints  # pylint: disable=import-outside-toplevel  (JAX, orbax)
  out = os.fspath(files.to_path(out))
  held = files.to_path(out) / 'checkpoints'
  if held.is_dir() and any(held.iterdir()):
    raise T5XError(f'--out {out}: it already holds checkpoints; choose an empty directory')
  ckpt = Checkpoint(checkpoint)
  fields = model_fields(ckpt.shapes, mlp_activation, ckpt.path)  # all checks before any write
  flat = flat_params(ckpt, fields, scan_layers)
  from t5lite import hf  # pylint: disable=import-outside-toplevel
  model = model_config(fields, scan_layers)
  source = {'t5x_checkpoint': ckpt.path, 'format': ckpt.format, 'step': step(ckpt)}
  ckpt_out = checkpoints.Checkpointer(out, async_save=False)
  try:
    ckpt_out.save(0, {'params': hf.unflatten(flat)}, {}, {'model': model, 'converted_from': source})
  finally:
    ckpt_out.close()
  overrides = config_overrides(model)
  files.write_text(
      files.join(out, 'model_config.json'),
      json.dumps({'model': model, 'overrides': overrides, 'converted_from': source}, indent=2))
  return model
