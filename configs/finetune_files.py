"""Fine-tune on your own files, with no Python: data.source names them (docs/data.md).

    python -m t5lite.train --config configs/finetune_files.py --workdir /tmp/t5lite_files \
        --config.data.source=jsonl:data/{split}.jsonl \
        --config.data.source_fields=inputs=question,targets=answer

data/train.jsonl (and data/validation.jsonl, read for the validation loss every eval.every_steps)
hold one JSON object per line, e.g. {"question": "...", "answer": "..."}. Other formats:
tsv:PATTERN (a header line naming the columns), text:PATTERN (one text per line, column 'text'),
parquet:PATTERN, arrayrecord:PATTERN (JSON records) and hf:FOLDER (HuggingFace `datasets`);
patterns may be globs and gs:// URLs. data.objective=span_corruption or prefix_lm trains on the
`inputs` column's texts instead (e.g. --config.data.source=text:corpus/*.txt
--config.data.source_fields=inputs=text --config.data.objective=span_corruption).

The model is the quickstart's, started from its checkpoint when the config argument or
--config.checkpoint.init_from names one (`configs/finetune_files.py:/tmp/t5lite_quickstart`);
from scratch otherwise. Nothing is read until data.source is set: its default, 'jsonl:', names no
files, and the run stops at once saying so.
"""
from t5lite.config import base_config
from t5lite.models.presets import model_config


def get_config(arg=None):
  c = base_config()
  c.model = model_config('tiny', variant='v1_1', vocab_size=2048)  # the quickstart's
  c.model.dtype = 'bfloat16'
  c.checkpoint.init_from = arg or ''
  c.checkpoint.every_steps = 250

  c.data.source = 'jsonl:'  # set it: --config.data.source=jsonl:data/{split}.jsonl
  c.data.source_fields = 'inputs=inputs,targets=targets'
  c.data.objective = 'supervised'
  c.data.inputs_length = 128  # longer inputs are cut to this many tokens (EOS included)
  c.data.targets_length = 32
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.log_every = 20
  c.train.max_grad_norm = 1.0
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.b2 = 0.98
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 50
  c.eval.every_steps = 0  # with {split} in data.source: 250 adds the validation loss
  return c
