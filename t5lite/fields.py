"""Config fields declared once, with their documentation.

Every config section is a frozen dataclass whose fields are made with `field(default, doc)`: the
default, the one-line documentation and (optionally) the valid choices live where the field is
declared. `config.base_config()` builds the ConfigDict from these dataclasses, `config.validate`
checks the choices, and docs/configs.md is generated from `describe()` (a test keeps it in step),
so a field cannot be documented in one place and declared in another.

A leaf module: the model's `ModelConfig` (models/) and the config sections (config.py) both use it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

DOC = 'doc'
CHOICES = 'choices'


class ConfigError(ValueError):
  """A config or command-line problem, with a message that names the field and the valid choices.

  Declared here, in a leaf, so that low layers (distributed start-up, data) can raise it; entry
  points turn it into one line on stderr and exit code 2. `t5lite.config.ConfigError` is this class.
  """


def field(default: Any, doc: str, choices: Sequence[Any] = ()) -> Any:
  """A dataclass field with its documentation and, when given, the values it may take."""
  return dataclasses.field(default=default, metadata={DOC: doc, CHOICES: tuple(choices)})


@dataclasses.dataclass(frozen=True)
class FieldDoc:
  name: str
  default: Any
  doc: str
  choices: tuple


def describe(cls) -> list[FieldDoc]:
  """The documented fields of a dataclass made with `field`, in declaration order."""
  out = []
  for f in dataclasses.fields(cls):
    default = f.default if f.default is not dataclasses.MISSING else None
    out.append(FieldDoc(f.name, default, f.metadata.get(DOC, ''), f.metadata.get(CHOICES, ())))
  return out
