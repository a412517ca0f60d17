"""t5lite: pretrain, fine-tune and evaluate T5-family models in JAX (see README.md)."""

__version__ = '0.1.0'
