"""The declarations of the config sections of evaluation and inference: `eval` (in-training
evaluation and `python -m t5lite.eval`), `decode` (how they and infer decode) and `infer`
(`python -m t5lite.infer`). Declared like every section (t5lite/fields.py); `t5lite.config` lists
them in `RunConfig` and re-exports them."""
from __future__ import annotations

import dataclasses

from t5lite.fields import field


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """In-training evaluation (docs/evaluation.md): every `every_steps` steps and at the last step,
  one ordered pass over eval.split of eval.task gives eval/loss (cross-entropy per target token,
  without z-loss or label smoothing) and eval/accuracy; and metric evaluation of eval.tasks
  (t5lite/evaluation/evaluator.py), also run by `python -m t5lite.eval`."""
  every_steps: int = field(
      0, 'Evaluation period in steps; 0: off. Costs one forward pass per '
      'eval batch.')
  task: str = field('', "The task of eval/loss; '' = data.task.")
  split: str = field('validation', 'The split evaluated.')
  batch_size: int = field(0, '0 = train.batch_size; must divide by the data-parallel size like it.')
  max_batches: int = field(0, '0: the whole split; N: its first N batches.')
  tasks: tuple = field((), 'Metric evaluation: decode / score every example of eval.split of these '
                       "tasks, postprocess, apply each task's metric_fns; results in "
                       'WORKDIR/eval/<task>/step_<N>.json and TensorBoard under WORKDIR/eval. '
                       "() = none; e.g. ('docstring_kind', 'fill_word').")
  num_examples_to_save: int = field(5, 'Example predictions kept in each step_<N>.json.')
  max_inputs_length: int = field(
      1024, "Metric evaluation reads each task's own lengths from its data (the longest example, "
      'rounded up to a multiple of 8), capped here; longer examples are truncated and counted.')
  max_targets_length: int = field(512, 'The same cap for the targets (and the decode length).')
  length_normalize: bool = field(
      False, 'Rank classification (score-mode tasks): rank the choices by their mean log-'
      'likelihood per target token instead of the sum, so longer answers are not penalised.')


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """Decoding for metric evaluation and `python -m t5lite.infer` (t5lite/models/decoding.py)."""
  method: str = field('greedy', 'The decoding method.', choices=('greedy', 'sample', 'beam'))
  max_decode_length: int = field(0, 'Generated tokens (EOS included); 0 = the targets length.')
  temperature: float = field(1.0, 'sample: logits / temperature; 0 = argmax.')
  top_k: int = field(0, 'sample: keep the k most likely tokens; 0 = off.')
  top_p: float = field(1.0, 'sample: nucleus probability mass; 1 = off.')
  num_beams: int = field(4, 'beam: more beams search wider; the cost grows linearly.')
  length_penalty_alpha: float = field(0.6, 'beam: score = log p / ((5 + len) / 6) ** alpha.')
  seed: int = field(0, 'sample: PRNG seed (per batch: fold_in(seed, batch)).')


@dataclasses.dataclass(frozen=True)
class InferConfig:
  """Batch inference (`python -m t5lite.infer`): JSONL in, JSONL out, resumable."""
  batch_size: int = field(0, '0 = eval.batch_size, else train.batch_size.')
  mode: str = field(
      'decode', 'decode: generate targets for each input; score: the log-likelihood of each '
      "line's given target (target_key) under the model, per example.", choices=('decode', 'score'))
  length_normalize: bool = field(
      False, 'score: also divide each log-likelihood by its target token count (the mean per '
      'token).')
  input_key: str = field('inputs', 'The JSONL field holding the input text.')
  target_key: str = field('targets', 'Copied to the output when present.')
  on_too_long: str = field(
      'truncate', 'An input longer than data.inputs_length tokens (EOS '
      'included): truncate (a counted warning) or error. infer.mode=score never cuts a target: '
      'one longer than data.targets_length is an error.', choices=('truncate', 'error'))
  on_bad_line: str = field(
      'error', 'A line that is not JSON, or has no input_key string: error '
      '(names the line) or skip (counted).', choices=('error', 'skip'))
