"""In-training evaluation (eval/loss, eval/accuracy every eval.every_steps) and keep-best
checkpoints (checkpoint.keep_best_metric), on the quickstart's task with its held-out split."""
import json
import os

import jax
import numpy as np
import pytest

from t5lite import checkpoints, train
from t5lite import config as config_lib
from t5lite import config_files
from t5lite.data import pipeline
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model


def eval_config(steps, **checkpoint):
  c = config_files.load_config_file(
      os.path.join(os.path.dirname(__file__), '..', 'configs', 'quickstart.py'))
  c.model.dtype = 'float32'
  c.train.update(steps=steps, batch_size=8, log_every=100)
  c.schedule.warmup_steps = 2
  c.reporting.update(tensorboard=False, peak_flops_per_device=1e11)
  c.eval.update(every_steps=2, batch_size=16)
  c.checkpoint.update(every_steps=2, async_save=False, **checkpoint)
  return c


def numpy_validation_loss(config, params):
  """The held-out split's cross-entropy per target token, recomputed batch by batch with numpy's
  log-softmax over the model's logits (independent of the jitted eval step and its sharding)."""
  model = make_model(ModelConfig.from_config(config.model))
  iterator, vocabulary = train.build_data(config)
  del iterator
  lengths = {'inputs': config.data.inputs_length, 'targets': 29}
  it = pipeline.make_task_iterator(config.data.task, feature_lengths=lengths, global_batch_size=16,
                                   seed=config.train.seed, split='validation', shuffle=False,
                                   repeat=False, vocabulary=vocabulary)
  total, weight, correct = 0.0, 0.0, 0.0
  for batch in it:
    inputs = {k: v for k, v in batch.items() if k != 'decoder_loss_weights'}
    logits = np.asarray(model.apply({'params': params}, **inputs), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets, w = batch['decoder_target_tokens'], batch['decoder_loss_weights']
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    total += float(-(picked * w).sum())
    weight += float(w.sum())
    correct += float(((logits.argmax(-1) == targets) * w).sum())
  return total / weight, correct / weight, weight


def test_eval_loss_is_the_held_out_cross_entropy(tmp_path):
  config = eval_config(4)
  history = train.run(config, str(tmp_path))
  logged = {r['step']: r for r in history}
  assert sorted(s for s in logged if 'eval/loss' in logged[s]) == [2, 4]
  _, restored = checkpoints.restore_as_numpy(str(tmp_path), 4)
  loss, accuracy, weight = numpy_validation_loss(config, restored['params'])
  assert logged[4]['eval/target_tokens'] == weight > 500  # the whole split, padding excluded
  np.testing.assert_allclose(logged[4]['eval/loss'], loss, rtol=2e-5)
  np.testing.assert_allclose(logged[4]['eval/accuracy'], accuracy, rtol=1e-6)
  # metrics.jsonl has them on the step's one line.
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [2, 4] and 'loss' in lines[0] and 'eval/loss' in lines[0]


def test_keep_best_survives_retention_and_restarts(tmp_path):
  """keep=1 plus the best by eval/loss in 'max' mode: the worst (highest) loss is the one kept,
  which is not the newest, so retention alone would have deleted it. The kept step must be the
  argmax of the logged eval/loss, and stay kept after a restart that trains further."""
  config = eval_config(6, keep=1, keep_best_metric='eval/loss', keep_best_mode='max')
  history = train.run(config, str(tmp_path))
  evals = {r['step']: r['eval/loss'] for r in history if 'eval/loss' in r}
  assert sorted(evals) == [2, 4, 6]
  worst = max(evals, key=evals.get)
  assert worst != 6, evals  # the test needs the best to be an old one

  def kept():
    return sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())

  assert kept() == sorted({worst, 6})

  config = eval_config(10, keep=1, keep_best_metric='eval/loss', keep_best_mode='max')
  history = train.run(config, str(tmp_path))
  evals.update({r['step']: r['eval/loss'] for r in history if 'eval/loss' in r})
  worst = max(evals, key=evals.get)
  assert kept() == sorted({worst, 10}), evals


@pytest.mark.parametrize('override, message', [
    ({'eval.every_steps': 0, 'checkpoint.keep_best_metric': 'eval/loss'
     }, 'needs evaluation: set eval.every_steps'),
    ({
        'eval.every_steps': 3, 'checkpoint.every_steps': 10,
        'checkpoint.keep_best_metric': 'eval/loss'
    }, 'is not a multiple of eval.every_steps=3'),
    ({'eval.every_steps': 5, 'checkpoint.keep_best_metric': 'eval/los'
     }, "did you mean 'eval/loss'"),
    ({'eval.every_steps': 5, 'eval.task': 'embeded_span_corruption'}, 'config.eval.task='),
    ({'eval.every_steps': 5, 'eval.batch_size': 12}, 'config.eval.batch_size=12'),
])
def test_eval_config_errors(override, message):
  config = eval_config(4)
  config.checkpoint.every_steps = 10
  for key, value in override.items():
    config_files.set_override(config, key, repr(value))
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, 8)
