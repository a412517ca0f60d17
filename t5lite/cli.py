"""What the command-line jobs (train, eval, infer) share: known errors become one clear line on
stderr and an exit code, instead of a traceback.

Exit code 2: the command or its input is wrong (fix it and run again); 1: the run itself failed.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from t5lite import checkpoints
from t5lite import config as config_lib

ErrorKind = tuple[type, str, int]  # (exception class, message prefix, exit code)
COMMON_ERRORS: tuple[ErrorKind, ...] = (
    (config_lib.ConfigError, 'config error', 2),
    (checkpoints.CheckpointError, 'checkpoint error', 1),
)


def run_main(body: Callable[[], object], errors: Sequence[ErrorKind] = ()) -> int:
  """Runs `body()`; returns 0, or the exit code of the first matching error kind (the job's own
  `errors` first, then COMMON_ERRORS) after printing `prefix: message`."""
  kinds = tuple(errors) + COMMON_ERRORS
  try:
    body()
  except tuple(cls for cls, _, _ in kinds) as e:
    prefix, code = next((p, c) for cls, p, c in kinds if isinstance(e, cls))
    print(f'{prefix}: {e}', file=sys.stderr)
    return code
  return 0
