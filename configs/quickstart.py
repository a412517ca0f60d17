"""Offline quickstart: pretrain a tiny T5 v1.1 with span corruption on text that ships with Python.

    python -m t5lite.train --config configs/quickstart.py --workdir /tmp/quickstart

No download: the corpus is the standard library's pydoc topics and module docstrings
(t5lite/data/embedded.py); a 2048-id SentencePiece vocabulary (1948 pieces + 100 sentinels) is
trained on it on first use and cached in ~/.cache/t5lite. Expected on a 2-core CPU: a few
minutes, with the loss of the last logged steps well under 70% of the first ones (metrics.jsonl).

The optional argument picks the model size: configs/quickstart.py:small trains T5.1.1-small's
shape on the same data (much slower on a CPU).
"""
from t5lite.config import base_config
from t5lite.models.presets import model_config


def get_config(arg=None):
  c = base_config()
  c.model = model_config(arg or 'tiny', variant='v1_1', vocab_size=2048)
  c.model.dtype = 'bfloat16'
  c.data.inputs_length = 128        # -> raw chunks of 142 tokens, targets of 32 (T5's helper)
  c.train.steps = 600
  c.train.batch_size = 32
  c.train.log_every = 10
  c.schedule.name = 'rsqrt'
  c.schedule.warmup_steps = 100     # lr = 1/sqrt(max(step, 100)): 0.1 falling to 0.04
  c.optimizer.name = 'adafactor'
  c.optimizer.learning_rate = 1.0
  return c
