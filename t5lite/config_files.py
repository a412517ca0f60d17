"""Config files and overrides: `configs/x.py[:arg]` loaded, `--config.a.b=value` applied, and the
resolved config written to a workdir.

Every problem is a `ConfigError` whose message names the file (and the line that sets a wrong key,
or raised) or the override, and what would be valid; keys are checked against the declarations in
t5lite/config.py (`check_keys`).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os

import ml_collections

from t5lite import files
from t5lite.config import ConfigError, _unknown_key, check_keys


def _assignment_line(path: str, key: str) -> int | None:
  """The first line of the config file at `path` that sets `key` (`x.key = ...`, `x['key'] = ...`
  or `x.update(key=...)`), to point at a typo; None when none does it that plainly."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  lines = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr == key:
      lines.append(node.lineno)
    elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)
          and isinstance(node.slice, ast.Constant) and node.slice.value == key):
      lines.append(node.lineno)
    elif isinstance(node, ast.keyword) and node.arg == key:
      lines.append(node.lineno)
  return min(lines, default=None)


def _raised_at(error: BaseException, path: str) -> str:
  """' line N' of the deepest traceback frame in the file at `path` ('' when none is)."""
  line, tb = '', error.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
      line = f' line {tb.tb_lineno}'
    tb = tb.tb_next
  return line


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/file.py[:arg]` -> get_config(arg), its keys checked against the declarations.

  Every problem is a ConfigError naming the file (and the line where it can): a syntax error, an
  exception in the file or in get_config, a result that is not a ConfigDict, an undeclared key
  (the error's note says where the file sets it; cli prints it before the message)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'--config: no config file at {path!r}; pass a path such as '
                      'configs/quickstart.py')
  try:
    module_spec = importlib.util.spec_from_file_location('t5lite_user_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
      raise ConfigError(f'--config: {path} defines no get_config(arg=None) function')
    config = module.get_config(arg or None)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the user's code: any error is theirs)
    if isinstance(e, SyntaxError) and os.path.abspath(e.filename or '') == os.path.abspath(path):
      where, what = f' line {e.lineno}', e.msg
    else:
      where, what = _raised_at(e, path), f'{type(e).__name__}: {" ".join(str(e).split())}'
    raise ConfigError(f'--config: {path}{where}: {what}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'--config: {path}: get_config returned a {type(config).__name__}, not an '
                      'ml_collections.ConfigDict (start from t5lite.config.base_config())')
  try:
    check_keys(config)
  except ConfigError as e:
    line = _assignment_line(path, e.key)
    e.add_note(f'--config: {path}' + (f' line {line}' if line else ''))
    raise
  return config


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
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      siblings = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise _unknown_key(parts, depth, siblings)
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
    raise ConfigError(f'config.{dotted}: expected {_type_name(old)} (like {old!r}), got '
                      f'{_type_name(value)} {raw!r}')
  node[key] = value


def save_config(config, workdir: str) -> str:
  """Writes the config (a ConfigDict or a RunConfig) as JSON, and the readable repr, to workdir
  (a local folder or a gs:// URL)."""
  path = files.join(workdir, 'config.json')
  files.write_text(path, json.dumps(config.to_dict(), indent=2, default=str))
  text = config if isinstance(config, ml_collections.ConfigDict) else config.as_config_dict()
  files.write_text(files.join(workdir, 'config.txt'), str(text))
  return path
