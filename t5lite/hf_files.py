"""HuggingFace model directories on disk: finding, reading and writing their files.

A HF model directory (local, or a URL such as gs://...) holds config.json and the weights:
model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin (+ index), read
with torch.load(weights_only=True), which refuses pickled code. Only numpy, safetensors and (for
.bin only) torch are needed; transformers is not imported here. Tensors come and go by their HF
names, in their stored dtypes: what they mean (the config and weight mapping) is t5lite/hf.py's.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from t5lite import files


class HFConversionError(ValueError):
  """The HF checkpoint/config (or the t5lite params) cannot be converted; the message says why."""


class HFFileError(HFConversionError):
  """A weights file that cannot be read (truncated, corrupt): the message names the file."""


def _read_weights(loader, file: str) -> dict[str, np.ndarray]:
  """loader(file), with any failure to read it (safetensors' and torch's own errors included) as
  one HFFileError naming the file."""
  try:
    return loader(file)
  except HFConversionError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (each loader has its own error types)
    raise HFFileError(f'{file}: cannot read the weights ({type(e).__name__}: '
                      f'{" ".join(str(e).split())}); is the file complete?') from None


# ---------------------------------------------------------------------------------------------
# Reading HF files


def model_dir(path: str) -> str:
  """`path` as t5lite names a HF model directory: a local path made absolute (~ expanded), a URL
  (gs://...) kept as it is. Every function here takes either."""
  return os.fspath(files.to_path(path))


def is_model_dir(path: str) -> bool:
  """Whether `path` (local or a URL) holds a config.json, i.e. looks like a HF model directory;
  checkpoint.init_from=hf:PATH is checked with it before anything is computed."""
  return files.to_path(path).joinpath('config.json').is_file()


def _require_dir(path: str) -> str:
  path = model_dir(path)
  if not files.to_path(path).is_dir():
    raise HFConversionError(f'{path}: no such directory (want a HuggingFace model directory with '
                            'config.json and model.safetensors or pytorch_model.bin)')
  return path


def _exists(path: str, *parts: str) -> bool:
  return files.to_path(path).joinpath(*parts).exists()


def read_config(path: str) -> dict:
  """config.json of the HF model directory `path`."""
  path = _require_dir(path)
  file = files.join(path, 'config.json')
  if not _exists(file):
    raise HFConversionError(f'{path}: no config.json, so not a HuggingFace model directory')
  try:
    config = json.loads(files.read_text(file))
  except ValueError as e:
    raise HFConversionError(f'{file}: not valid JSON ({e})') from None
  if not isinstance(config, dict):
    raise HFConversionError(f'{file}: not a JSON object')
  return config


def _load_torch(file) -> dict[str, np.ndarray]:
  """A .bin state dict; `file` a local path or a file object (a URL's bytes)."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel  (ships with jax)
  import torch  # pylint: disable=import-outside-toplevel  (only .bin checkpoints need it)
  # weights_only=True: tensors and plain containers only; refuses to run pickled code.
  state = torch.load(file, map_location='cpu', weights_only=True)
  out = {}
  for name, t in state.items():
    if not isinstance(t, torch.Tensor):
      raise HFConversionError(f'{file}: entry {name!r} is a {type(t).__name__}, not a tensor '
                              '(want a plain state dict)')
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the bits, view as ml_dtypes'
      out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[name] = t.numpy()
  return out


def _loaders(url: bool):
  """(safetensors loader, torch loader), each fn(file name) -> tensors. A local file is read in
  place (safetensors maps it); a URL's file is downloaded into memory first, as neither library
  reads gs:// itself."""
  from safetensors import numpy as st  # pylint: disable=import-outside-toplevel
  if not url:
    return st.load_file, _load_torch
  return (lambda f: st.load(files.read_bytes(f)),
          lambda f: _load_torch(io.BytesIO(files.read_bytes(f))))


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of the HF model directory `path` (local or a URL), by HF name, in their stored
  dtypes."""
  path = _require_dir(path)
  load_safetensors, load_torch = _loaders(files.is_url(path))
  for index_name, loader in (('model.safetensors.index.json', load_safetensors),
                             ('pytorch_model.bin.index.json', load_torch)):
    index_file = files.join(path, index_name)
    if _exists(index_file):
      try:
        shards = sorted(set(json.loads(files.read_text(index_file))['weight_map'].values()))
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HFFileError(f'{index_file}: not an index with a weight_map ({type(e).__name__}: '
                          f'{e})') from None
      tensors = {}
      for shard in shards:
        if not _exists(path, shard):
          raise HFConversionError(f'{index_file} lists the shard {shard}, which is not there')
        tensors.update(_read_weights(loader, files.join(path, shard)))
      return tensors
  if _exists(path, 'model.safetensors'):
    return _read_weights(load_safetensors, files.join(path, 'model.safetensors'))
  if _exists(path, 'pytorch_model.bin'):
    return _read_weights(load_torch, files.join(path, 'pytorch_model.bin'))
  raise HFConversionError(f'{path}: no model.safetensors, pytorch_model.bin or a sharded index of '
                          'either (TensorFlow/Flax-only checkpoints are not read)')


# ---------------------------------------------------------------------------------------------
# Writing HF files

DTYPES = ('float32', 'bfloat16')


def numpy_dtype(dtype: str):
  """The numpy dtype of a saved weights' `dtype` name (bfloat16: ml_dtypes', as jax has it)."""
  if dtype == 'bfloat16':
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (ships with jax)
    return ml_dtypes.bfloat16
  if dtype == 'float32':
    return np.float32
  raise HFConversionError(f'dtype={dtype!r}: want {" or ".join(DTYPES)}')


def write_model_dir(out_dir: str, tensors: dict[str, np.ndarray], config: dict,
                    generation: dict) -> list[str]:
  """Writes model.safetensors, config.json and generation_config.json under `out_dir` (local or
  a URL). Returns the written file names."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  # safetensors writes local files only: a URL's files are written locally, then uploaded.
  with files.local_output(out_dir) as local:
    os.makedirs(local, exist_ok=True)
    # metadata format=pt: transformers refuses safetensors files without a known format tag.
    save_file(tensors, os.path.join(local, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(local, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(local, 'generation_config.json'), 'w') as f:
      json.dump(generation, f, indent=2, sort_keys=True)
  return ['model.safetensors', 'config.json', 'generation_config.json']
