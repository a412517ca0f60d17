"""Logging for every module: `log = logging.getLogger(__name__)`, then `log.info(...)`.

`install()` (run when `t5lite` is imported) gives the package's logger one handler that writes
timestamped lines to the current `sys.stdout` (looked up at each line, so notebooks and pytest's
capture see them), and a filter that keeps only warnings and errors on every process but the first
of a multi-process run, so a pod prints one copy of the progress. Nothing here starts JAX: the
process index is read only once `jax.distributed` is initialised.
"""
from __future__ import annotations

import logging
import sys

ROOT = 't5lite'
FORMAT = '%(asctime)s %(message)s'
DATE_FORMAT = '%Y-%m-%d %H:%M:%S'


class _CurrentStdout(logging.StreamHandler):
  """A StreamHandler on whatever sys.stdout is when a line is written."""

  @property
  def stream(self):
    return sys.stdout

  @stream.setter
  def stream(self, value):  # StreamHandler.__init__ assigns it; the property ignores it
    del value


def process_index() -> int:
  """This process's index, 0 until a multi-process run has initialised jax.distributed."""
  jax = sys.modules.get('jax')
  if jax is None or not jax.distributed.is_initialized():
    return 0
  return jax.process_index()


class _FirstProcessOnly(logging.Filter):
  """Info lines from process 0 only; warnings and errors from every process."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or process_index() == 0


def install(level: int = logging.INFO) -> logging.Logger:
  """Sets up the package logger once (idempotent) and returns it."""
  logger = logging.getLogger(ROOT)
  if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
    handler = _CurrentStdout()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(_FirstProcessOnly())
    logger.addHandler(handler)
    logger.propagate = False  # one copy of each line, whatever the root logger does
  logger.setLevel(level)
  return logger
