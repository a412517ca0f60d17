"""t5lite: pretrain, fine-tune and evaluate T5-family models in JAX (see README.md)."""
import os as _os
import signal as _signal
import sys as _sys

from t5lite import logs as _logs

__version__ = '0.1.0'
_logs.install()


def _stop_during_start_up(signum, frame):
  del signum, frame
  print('stopped by SIGTERM during start-up: nothing to save yet', file=_sys.stderr, flush=True)
  # Not sys.exit: the signal may land inside a callback (e.g. a gc hook of JAX's) that swallows
  # SystemExit. Nothing has been written yet, so there is nothing to clean up.
  _sys.stdout.flush()
  _os._exit(0)


# `python -m t5lite.<job>`: Python sets sys.argv[0] to '-m' only while it locates the module, i.e.
# while this package loads. Importing the job's modules (JAX, flax, orbax) takes seconds before
# cli.main installs its own SIGTERM handling; a scheduler's SIGTERM then should read as a clean
# stop (exit 0 and a message), not a silent 143. cli.main replaces this handler.
if _sys.argv[:1] == ['-m']:
  _signal.signal(_signal.SIGTERM, _stop_during_start_up)
