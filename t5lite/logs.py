"""Logging for every module: `log = logging.getLogger(__name__)`, then `log.info(...)`.

`install()` (run when `t5lite` is imported) gives the package's logger one handler that writes
lines with a timestamp and a level to the current `sys.stdout` (looked up at each line, so notebooks and pytest's
capture see them), and a filter that keeps only warnings and errors on every process but the first
of a multi-process run, so a pod prints one copy of the progress. Nothing here starts JAX: the
process index is read only once `jax.distributed` is initialised.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterator

ROOT = 't5lite'
FORMAT = '%(asctime)s %(levelname)s %(message)s'
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
  _format_absl_like_ours()
  return logger


def _format_absl_like_ours() -> None:
  """orbax and other libraries log through absl's Python logger, which (outside absl.app) falls
  through to whatever the root logger prints ('WARNING:absl:...' after some library's
  basicConfig). Their lines go to stderr with the same timestamp and level layout as t5lite's."""
  absl_logger = logging.getLogger('absl')
  if not any(getattr(h, 't5lite', False) for h in absl_logger.handlers):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.t5lite = True
    absl_logger.addHandler(handler)
    absl_logger.propagate = False


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f'{minutes}m{seconds:02d}s'
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m'


class Progress:
  """Progress lines of a long job: 'WHAT: DONE/TOTAL UNIT (P%), R UNIT/s, ETA T'.

  `update(n)` after each piece of work; a line is logged at most every `every_s` seconds (and the
  first one as soon as the first piece is done, so a user sees the rate early); `finish()` logs
  the total and the time taken. Without a known total, lines say how many are done and the rate.
  Info lines, so only process 0 of a multi-process run prints them."""

  def __init__(self, what: str, total: int | None = None, unit: str = 'examples',
               every_s: float = 10.0, logger: logging.Logger | None = None):
    self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
    self.log = logger or logging.getLogger(ROOT)
    self.done = 0
    self.start = time.monotonic()
    self._last_line = None

  def _line(self) -> str:
    elapsed = max(time.monotonic() - self.start, 1e-9)
    rate = self.done / elapsed
    text = f'{self.what}: {self.done}'
    if self.total:
      text += f'/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)'
    else:
      text += f' {self.unit}'
    text += f', {rate:.3g} {self.unit}/s'
    if self.total and rate > 0 and self.done < self.total:
      text += f', ETA {_duration((self.total - self.done) / rate)}'
    return text

  def update(self, n: int = 1) -> None:
    self.done += n
    now = time.monotonic()
    if self._last_line is None or now - self._last_line >= self.every_s:
      self._last_line = now
      self.log.info(self._line())

  def finish(self) -> None:
    self.log.info('%s: %d %s in %s', self.what, self.done, self.unit,
                  _duration(time.monotonic() - self.start))


@contextlib.contextmanager
def compiling(what: str, logger: logging.Logger | None = None) -> Iterator[None]:
  """'compiling WHAT ...' before a first (slow) compile, and 'compiled WHAT in T' after it, so
  that the minutes of a large model's first compile are not silent."""
  log = logger or logging.getLogger(ROOT)
  log.info('compiling %s ...', what)
  start = time.monotonic()
  yield
  log.info('compiled %s in %.1fs', what, time.monotonic() - start)
