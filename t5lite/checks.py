"""Checks of config values, each `check(value, 'section.field')`: returns, or raises ConfigError
naming the field and what would be valid. config.py's table (`config.CHECKS`) says which field
gets which; these know nothing of the config's declarations.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

from t5lite.fields import ConfigError

Check = Callable[[Any, str], None]  # (value, 'section.field'): returns, or raises ConfigError


def finite(value, field_name: str) -> None:
  """Rejects a float inf, -inf or nan (e.g. `--config.optimizer.learning_rate=1e999`, which
  parses as inf); anything else passes, for the other checks to judge. Each numeric check below
  runs it first: inf would pass `> 0`, and nan fails every comparison with a misleading message."""
  if isinstance(value, float) and not math.isfinite(value):
    raise ConfigError(f'config.{field_name}={value!r} is not a finite number')


def _number(value, field_name: str, allow_zero: bool) -> None:
  finite(value, field_name)
  if isinstance(value, bool) or not isinstance(value,
                                               (int, float)) or value < 0 or (value == 0
                                                                              and not allow_zero):
    need = 'a number >= 0' if allow_zero else 'a positive number'
    raise ConfigError(f'config.{field_name}={value!r}: must be {need}')


def positive(value, field_name: str) -> None:
  _number(value, field_name, allow_zero=False)


def non_negative(value, field_name: str) -> None:
  _number(value, field_name, allow_zero=True)


def in_range(lo, hi, *, lo_open: bool = False, hi_open: bool = False, note: str = '') -> Check:
  """A number between lo and hi; an open end excludes its bound."""
  shown = f'{"(" if lo_open else "["}{lo}, {hi}{")" if hi_open else "]"}{note}'

  def check(value, field_name: str) -> None:
    finite(value, field_name)
    number = isinstance(value, (int, float))
    if not (number and (lo < value if lo_open else lo <= value) and
            (value < hi if hi_open else value <= hi)):
      raise ConfigError(f'config.{field_name}={value!r}: must be in {shown}')

  return check


def count(what: str) -> Check:
  """An int >= 0; `what` says what it counts."""

  def check(value, field_name: str) -> None:
    finite(value, field_name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigError(f'config.{field_name}={value!r}: must be an int >= 0 ({what})')

  return check


def boolean(value, field_name: str) -> None:
  if not isinstance(value, bool):
    raise ConfigError(f'config.{field_name}={value!r}: must be True or False')


def string(what: str) -> Check:

  def check(value, field_name: str) -> None:
    if not isinstance(value, str):
      raise ConfigError(f'config.{field_name}={value!r}: must be {what}')

  return check


def _compiles(regexes: Sequence[str], field_name: str) -> None:
  for regex in regexes:
    try:
      re.compile(regex)
    except re.error as e:
      raise ConfigError(f'config.{field_name}: {regex!r} is not a valid regex ({e})')


def regex_pairs(value, field_name: str) -> None:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p)
      for p in value):
    raise ConfigError(f'config.{field_name}={value!r}: must be a tuple of (regex, replacement) '
                      "string pairs, e.g. (('^encoder/', 'enc/'),)")
  _compiles([p[0] for p in value], field_name)


def new_rows(value, field_name: str) -> None:
  """checkpoint.init_new_rows: '' or a rule t5lite/vocab_expansion.py knows."""
  from t5lite import vocab_expansion  # pylint: disable=import-outside-toplevel  (sentencepiece)
  if not isinstance(value, str):
    raise ConfigError(f'config.{field_name}={value!r}: must be a string')
  if value:
    try:
      vocab_expansion.parse_new_rows(value)
    except ValueError as e:
      raise ConfigError(f'config.{e}') from None


def regexes(value, field_name: str) -> None:
  if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) for p in value):
    raise ConfigError(f'config.{field_name}={value!r}: must be a tuple of regex strings, e.g. '
                      "('^decoder/logits_dense/',)")
  _compiles(value, field_name)


def task(name, field_name: str) -> None:
  """A registered task or mixture. The registry holds what has been imported: the jobs (and tests)
  import t5lite.data.catalog for the built-in tasks."""
  from t5lite.data import tasks  # the registry imports the data stack: only when validating
  try:
    tasks.get(name)
  except tasks.UnknownNameError as e:
    raise ConfigError(f'config.{field_name}={name!r}: {e.args[0]}') from None


def stage_list(value, field_name: str) -> None:
  """data.stages: its form ('START:SPEC' strings, starts from 0 and increasing); the names are
  looked up by the rule that knows data.task (config_rules)."""
  if isinstance(value, tuple) and not value:
    return  # off: no need to import the data stack
  from t5lite.data import stages  # pylint: disable=import-outside-toplevel  (the data stack)
  stages.parse(value, field_name)


def task_names(value, field_name: str) -> None:
  if not isinstance(value, (tuple, list)) or not all(isinstance(t, str) for t in value):
    raise ConfigError(f'config.{field_name}={value!r}: must be a tuple of task names, e.g. '
                      "('docstring_kind',), or () for none")
  from t5lite.data import tasks  # pylint: disable=import-outside-toplevel
  for name in value:
    task(name, field_name)
    if isinstance(tasks.get(name), tasks.Mixture):  # metrics are per task: list its tasks
      raise ConfigError(f'config.{field_name}: {name!r} is a mixture, not a task; list its '
                        'tasks instead')


def logical_rules(value, field_name: str) -> None:
  from t5lite.partitioning import MESH_AXES  # pylint: disable=import-outside-toplevel  (JAX)
  for rule in value:
    if len(rule) != 2:
      raise ConfigError(f'config.{field_name}: each rule is (logical_name, mesh_axes), '
                        f'got {rule!r}')
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for axis in axes:
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f'config.{field_name}: {rule!r} names mesh axis {axis!r}; valid '
                          f'mesh axes: {", ".join(MESH_AXES)}')
