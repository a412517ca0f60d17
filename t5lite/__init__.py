"""t5lite: pretrain, fine-tune and evaluate T5-family models in JAX (see README.md)."""
from t5lite import logs as _logs

__version__ = '0.1.0'
_logs.install()
