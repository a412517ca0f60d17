"""In-training validation: the loss and token accuracy of one ordered pass over a task's split.

`build_validation(...)` returns `evaluate(params) -> {'eval/loss', 'eval/accuracy',
'eval/target_tokens'}`: eval.split of eval.task (data.task by default) at the training lengths.
The last batch is zero-padded by the pipeline and padding carries no loss weight, so every
example counts once. With several processes each reads its slice and `multihost.lockstep` keeps
them running the same steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from t5lite import multihost, partitioning, trainer
from t5lite.data import pipeline


def build_validation(data_cfg, eval_cfg, batch_size: int, seed: int, lengths: dict[str, int],
                     vocabulary, model, param_shardings, mesh, rules):
  """fn(params) -> validation values; `batch_size` and `seed` as in training (eval.batch_size
  0 means train.batch_size: the caller resolves it)."""
  task = eval_cfg.task or data_cfg.task
  eval_step = trainer.make_eval_step(model, param_shardings, mesh, rules)
  batch_sharding = partitioning.batch_sharding(mesh, rules)

  def evaluate(params) -> dict[str, float]:
    iterator = pipeline.make_task_iterator(task, feature_lengths=lengths,
                                           global_batch_size=batch_size, seed=seed,
                                           pack=data_cfg.pack, converter=data_cfg.converter,
                                           vocabulary=vocabulary, split=eval_cfg.split,
                                           shuffle=False, repeat=False)
    totals = None
    for batch in multihost.lockstep(iterator, limit=eval_cfg.max_batches):
      sums = eval_step(params, partitioning.host_to_global(batch, batch_sharding))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    iterator.close()
    if totals is None:
      raise ValueError(f'eval: task {task!r} split {eval_cfg.split!r} gave no batches')
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    weight = max(totals['weight_sum'], 1.0)
    return {
        'eval/loss': totals['loss_sum'] / weight, 'eval/accuracy': totals['correct_sum'] / weight,
        'eval/target_tokens': totals['weight_sum']
    }

  return evaluate
