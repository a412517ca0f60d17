"""Metric functions: `fn(targets, predictions) -> {name: score}`, the T5/seqio convention.

Every function takes the postprocessed targets and the model's postprocessed predictions (two
equal-length sequences) and returns a dict of named floats, so an evaluator can merge the dicts of
all of a task's metrics. Scores are in percent (0-100) wherever T5/seqio report percent, which is
every metric here; each docstring says its scale. Score-based metrics (fed log-likelihoods from
`t5lite.evaluation.scoring` instead of decoded text) take `(targets, scores)`: the second parameter
is named `scores`, which is how seqio tells the two kinds apart (see `takes_scores`).

Tasks may name metrics by string: `METRICS['squad']`, `get_metric('bleu')`, `resolve(['accuracy',
my_fn])`. An unknown name raises `UnknownMetricError` listing the closest registered names.

Libraries: BLEU is sacrebleu, ROUGE is Google's rouge-score (the implementations T5 used, so scores
compare with published ones), correlations are scipy.stats. sklearn is not a dependency: accuracy,
F1 and Matthews correlation are a few lines of counting each, written out here. sacrebleu and
rouge-score are the `.[metrics]` extra and are imported only when their metric runs.

`glue_average` / `superglue_average` combine per-task results the way the benchmark leaderboards do.
"""
from __future__ import annotations

import collections
import difflib
import functools
import inspect
import math
import re
import string
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

MetricFn = Callable[[Sequence[Any], Sequence[Any]], dict]


def _import(module: str, package: str):
  try:
    return __import__(module, fromlist=['_'])
  except ImportError as e:
    raise ImportError(f'this metric needs {package!r}: pip install {package} '
                      "(or pip install -e '.[metrics]')") from e


def _check(targets: Sequence, predictions: Sequence) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions.')
  if len(targets) == 0:
    raise ValueError('no examples to score.')


# --- classification ------------------------------------------------------------------------------


def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """Percent (0-100) of examples whose prediction equals the target (labels: str, int, ...)."""
  _check(targets, predictions)
  return {'accuracy': 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def sequence_accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """Percent (0-100) of examples whose whole prediction equals the target exactly.

  Strings compare with `==` (no normalisation: case and spaces count); token sequences compare
  element-wise, so [5, 6] == np.array([5, 6]).
  """
  _check(targets, predictions)

  def same(t, p):
    if isinstance(t, str) or isinstance(p, str):
      return t == p
    return bool(np.array_equal(np.asarray(t), np.asarray(p)))

  return {
      'sequence_accuracy': 100.0
                           * float(np.mean([same(t, p) for t, p in zip(targets, predictions)]))
  }


def _confusion(targets: Sequence, predictions: Sequence) -> np.ndarray:
  """Confusion matrix C[i, j] = #(target is label i, prediction is label j).

  The labels are the union of targets and predictions, so an invalid prediction (e.g. -1 from a
  postprocessor that could not parse the output) becomes a class of its own and counts as wrong.
  """
  labels = sorted(set(targets) | set(predictions), key=lambda x: (str(type(x)), x))
  index = {label: i for i, label in enumerate(labels)}
  matrix = np.zeros((len(labels), len(labels)), np.int64)
  for t, p in zip(targets, predictions):
    matrix[index[t], index[p]] += 1
  return matrix


def matthews_corrcoef(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """Matthews correlation coefficient x 100 (-100..100): CoLA's metric.

  Binary case (Matthews 1975): (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
  Written through the confusion matrix C in the multi-class form (Gorodkin 2004), which reduces to
  the binary formula for two classes and is what sklearn computes:
      MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))
  with c = trace(C), s = total, t_k / p_k the true / predicted counts of class k. When a
  denominator factor is 0 (all targets or all predictions one class) MCC is 0, as in sklearn.
  Predictions that are not a target label form their own class (they count as wrong).
  """
  _check(targets, predictions)
  matrix = _confusion(targets, predictions).astype(np.float64)
  t, p = matrix.sum(axis=1), matrix.sum(axis=0)
  c, s = np.trace(matrix), matrix.sum()
  denominator = (s * s - np.dot(p, p)) * (s * s - np.dot(t, t))
  mcc = 0.0 if denominator == 0 else (c * s - np.dot(p, t)) / math.sqrt(denominator)
  return {'matthews_corrcoef': 100.0 * float(mcc)}


def f1(targets: Sequence, predictions: Sequence, positive: Any = 1) -> dict[str, float]:
  """Binary F1 of the `positive` class x 100 (0-100): MRPC, QQP, MultiRC's F1a.

  F1 = 2TP / (2TP + FP + FN) (the harmonic mean of precision and recall; 0 when TP = 0). A
  prediction that is neither `positive` nor one of the target labels (an unparseable output)
  counts as wrong whatever the target: a false negative on a positive example, a false positive on
  a negative one, as T5's `f1_score_with_invalid` does.
  """
  _check(targets, predictions)
  valid = set(targets) | {positive}
  tp = fp = fn = 0
  for t, p in zip(targets, predictions):
    if t == positive:
      tp += p == positive
      fn += p != positive
    else:
      fp += p == positive or p not in valid
  return {'f1': 100.0 * (2 * tp / (2 * tp + fp + fn) if tp else 0.0)}


def macro_f1(targets: Sequence, predictions: Sequence,
             labels: Iterable | None = None) -> dict[str, float]:
  """Unweighted mean over classes of the per-class F1 x 100 (0-100): CB's "mean 3-class F1".

  Each class k is scored one-vs-rest, F1_k = 2TP / (2TP + FP + FN), and the F1s are averaged with
  equal weight (sklearn's average='macro'). `labels` fixes the classes (T5 uses range(3) for CB);
  a prediction outside them is a false negative for the target's class and a false positive for
  none. By default the classes are every label seen in targets or predictions. A class with no
  targets and no predictions scores 0 (sklearn's zero_division default).
  """
  _check(targets, predictions)
  if labels is None:
    labels = sorted(set(targets) | set(predictions), key=lambda x: (str(type(x)), x))
  scores = []
  for k in labels:
    tp = sum(t == k and p == k for t, p in zip(targets, predictions))
    fp = sum(t != k and p == k for t, p in zip(targets, predictions))
    fn = sum(t == k and p != k for t, p in zip(targets, predictions))
    scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
  return {'macro_f1': 100.0 * float(np.mean(scores))}


def rank_accuracy(targets: Sequence, scores: Sequence[Sequence[float]]) -> dict[str, float]:
  """Percent (0-100) of examples whose highest-scoring option is a correct one.

  Score-based: `scores[i]` holds example i's per-option scores (e.g. the log-likelihoods from
  `scoring.rank_classification`, any number of options per example); `targets[i]` is the correct
  option's index, or a collection of indices when several are correct (seqio counts a prediction
  matching any of them as right). Ties go to the first option, like np.argmax.
  """
  _check(targets, scores)
  right = []
  for t, s in zip(targets, scores):
    choice = int(np.argmax(np.asarray(s)))
    correct = {int(x) for x in t} if isinstance(t, Iterable) else {int(t)}
    right.append(choice in correct)
  return {'accuracy': 100.0 * float(np.mean(right))}


# --- regression (STS-B) --------------------------------------------------------------------------


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
  """Pearson correlation x 100 (-100..100), via scipy.stats.pearsonr. NaN if either side is
  constant (the correlation is undefined; scipy warns)."""
  _check(targets, predictions)
  stats = _import('scipy.stats', 'scipy')
  t, p = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
  if np.ptp(t) == 0 or np.ptp(p) == 0:
    return {'pearson_corrcoef': float('nan')}
  return {'pearson_corrcoef': 100.0 * float(stats.pearsonr(t, p)[0])}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
  """Spearman rank correlation x 100 (-100..100), via scipy.stats.spearmanr: the Pearson
  correlation of the ranks, ties sharing their average rank. NaN if either side is constant."""
  _check(targets, predictions)
  stats = _import('scipy.stats', 'scipy')
  t, p = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
  if np.ptp(t) == 0 or np.ptp(p) == 0:
    return {'spearman_corrcoef': float('nan')}
  return {'spearman_corrcoef': 100.0 * float(stats.spearmanr(t, p)[0])}


# --- question answering (SQuAD, ReCoRD) ----------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)


def normalize_squad(text: str) -> str:
  """The SQuAD v1.1 evaluation script's `normalize_answer` (Rajpurkar et al. 2016), in its order:
  lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
  text = ''.join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def _squad_f1(target: str, prediction: str) -> float:
  """Token-overlap F1 of normalised strings (SQuAD script); overlap counts repeated tokens at most
  as often as they occur in both. Both empty scores 1 (the SQuAD v2.0 script's rule; v1.1 would
  give 0 while its EM gives 1)."""
  t, p = normalize_squad(target).split(), normalize_squad(prediction).split()
  if not t or not p:
    return float(t == p)
  same = sum((collections.Counter(t) & collections.Counter(p)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(t)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """SQuAD exact match and token F1, each in percent (0-100): keys 'em' and 'f1'.

  `targets[i]` is one reference answer or a list of them; each example scores its best reference
  (max over references, as the SQuAD script does), then the scores are averaged over examples.
  Both compare `normalize_squad` forms.
  """
  _check(targets, predictions)
  em, f1s = [], []
  for refs, pred in zip(targets, predictions):
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
      raise ValueError('squad: an example has no reference answers.')
    em.append(max(float(normalize_squad(r) == normalize_squad(pred)) for r in refs))
    f1s.append(max(_squad_f1(r, pred) for r in refs))
  return {'em': 100.0 * float(np.mean(em)), 'f1': 100.0 * float(np.mean(f1s))}


# --- generation (translation, summarisation) -----------------------------------------------------


def bleu(targets: Sequence[str | Sequence[str]], predictions: Sequence[str],
         tokenize: str = 'intl') -> dict[str, float]:
  """Corpus BLEU (0-100) from sacrebleu with T5's settings.

  sacrebleu.corpus_bleu(smooth_method='exp', smooth_value=0.0, force=False, lowercase=False,
  tokenize='intl', use_effective_order=False), as T5's `metrics.bleu` calls it: n-gram counts are
  summed over the corpus before the geometric mean and the brevity penalty (Papineni et al.
  2002), so it is not the mean of sentence BLEUs. `targets[i]` is one reference or a list of
  references (any number per example; sacrebleu takes a missing one as None).
  """
  _check(targets, predictions)
  sacrebleu = _import('sacrebleu', 'sacrebleu')
  refs = [[t] if isinstance(t, str) else list(t) for t in targets]
  n = max(len(r) for r in refs)
  # sacrebleu wants reference *streams*: streams[j][i] is example i's j-th reference.
  streams = [[r[j] if j < len(r) else None for r in refs] for j in range(n)]
  result = sacrebleu.corpus_bleu(list(predictions), streams, smooth_method='exp', smooth_value=0.0,
                                 force=False, lowercase=False, tokenize=tokenize,
                                 use_effective_order=False)
  return {'bleu': float(result.score)}


ROUGE_KEYS = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')


def _prepare_summary(text: str) -> str:
  # rougeLsum splits summaries into sentences at newlines. T5 marks sentence ends in
  # CNN/DailyMail-style text (" . ") with one; nltk's sentence splitter would need the punkt
  # data, which an offline machine may lack, so we do what T5 does.
  return text.replace(' . ', ' .\n')


def rouge(targets: Sequence[str | Sequence[str]], predictions: Sequence[str],
          score_keys: Sequence[str] = ROUGE_KEYS) -> dict[str, float]:
  """ROUGE F-measures in percent (0-100) from Google's rouge-score, T5's settings.

  rouge1/rouge2: unigram/bigram overlap; rougeL: longest common subsequence of the whole text;
  rougeLsum: summary-level LCS over sentences (Lin 2004), sentences split at newlines after the
  " . " -> " .\\n" rewrite T5 applies. No stemming; rouge-score's tokenizer lowercases and keeps
  only [a-z0-9] runs (so non-Latin text scores 0, as in T5).

  Aggregation (a deliberate, deterministic choice): the plain mean over examples of each
  example's F-measure. T5 reports the `mid` of rouge-score's BootstrapAggregator, the median of
  1000 resampled means with an unseeded RNG, so it jitters between runs around this same mean.
  A list of references per example scores the best one per key (rouge-score's score_multi).
  """
  _check(targets, predictions)
  rouge_scorer = _import('rouge_score.rouge_scorer', 'rouge-score')
  scorer = rouge_scorer.RougeScorer(list(score_keys), use_stemmer=False)
  totals = {k: 0.0 for k in score_keys}
  for target, prediction in zip(targets, predictions):
    prediction = _prepare_summary(prediction)
    if isinstance(target, str):
      scores = scorer.score(target=_prepare_summary(target), prediction=prediction)
    else:
      scores = scorer.score_multi([_prepare_summary(t) for t in target], prediction)
    for k in score_keys:
      totals[k] += scores[k].fmeasure
  return {k: 100.0 * v / len(targets) for k, v in totals.items()}


# --- grouped metrics (MultiRC) ------------------------------------------------------------------
# MultiRC asks several true/false questions about each answer candidate of a question; its
# postprocessor (t5lite.data.catalog.glue.multirc_postprocess) turns each answer into
# {'value': 0/1/-1} and each target into {'value': ..., 'group': its question}. As T5's metrics
# of the same names.


def all_match(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """100 if every prediction equals its target, else 0 (one group's exact match)."""
  _check(targets, predictions)
  return {'exact_match': 100.0 * float(all(t == p for t, p in zip(targets, predictions)))}


def mean_group_metric(metric_fn: MetricFn, group_key: str = 'group',
                      value_key: str = 'value') -> MetricFn:
  """`metric_fn` applied to each group's values, averaged (unweighted) over the groups.

  Targets are dicts holding the group (`targets[i][group_key]`) and the value; predictions dicts
  holding the value. MultiRC's question-level exact match is mean_group_metric(all_match): the
  percent of questions whose answers are all classified right.
  """

  def grouped(targets: Sequence[Mapping], predictions: Sequence[Mapping]) -> dict[str, float]:
    _check(targets, predictions)
    groups: dict[Any, tuple[list, list]] = {}
    for t, p in zip(targets, predictions):
      g = groups.setdefault(t[group_key], ([], []))
      g[0].append(t[value_key])
      g[1].append(p[value_key])
    scores = collections.defaultdict(list)
    for group_targets, group_predictions in groups.values():
      for name, value in metric_fn(group_targets, group_predictions).items():
        scores[name].append(value)
    return {name: float(np.mean(values)) for name, values in scores.items()}

  return grouped


def multirc_f1_over_all_answers(targets: Sequence[Mapping],
                                predictions: Sequence[Mapping]) -> dict[str, float]:
  """MultiRC's F1a: binary `f1` of the 'value's of all answers together (invalid counts wrong)."""
  return f1([t['value'] for t in targets], [p['value'] for p in predictions])


# --- benchmark averages --------------------------------------------------------------------------

# group name -> the (task, metric key) pairs averaged into that group's score. Tasks are the keys
# of the results dict; metric keys are those the functions above return.
GLUE_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    'cola': (('cola', 'matthews_corrcoef'),),
    'sst2': (('sst2', 'accuracy'),),
    'mrpc': (('mrpc', 'f1'), ('mrpc', 'accuracy')),
    'stsb': (('stsb', 'pearson_corrcoef'), ('stsb', 'spearman_corrcoef')),
    'qqp': (('qqp', 'f1'), ('qqp', 'accuracy')),
    'mnli': (('mnli_matched', 'accuracy'), ('mnli_mismatched', 'accuracy')),
    'qnli': (('qnli', 'accuracy'),),
    'rte': (('rte', 'accuracy'),),
    'wnli': (('wnli', 'accuracy'),),
}
SUPERGLUE_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    'boolq': (('boolq', 'accuracy'),),
    'cb': (('cb', 'macro_f1'), ('cb', 'accuracy')),
    'copa': (('copa', 'accuracy'),),
    'multirc': (('multirc', 'f1'), ('multirc', 'exact_match')),
    'record': (('record', 'f1'), ('record', 'em')),
    'rte': (('rte', 'accuracy'),),
    'wic': (('wic', 'accuracy'),),
    'wsc': (('wsc', 'accuracy'),),
}


def _benchmark_average(name: str, results: Mapping[str, Mapping[str, float]],
                       groups: Mapping[str, tuple[tuple[str, str], ...]]) -> dict[str, float]:
  missing = [
      f'{task}/{key}' for pairs in groups.values() for task, key in pairs
      if key not in results.get(task, {})
  ]
  if missing:
    raise ValueError(f'{name}: results lack {", ".join(missing)} (need every task of the '
                     f'benchmark; have tasks {sorted(results)}).')
  out = {
      group: float(np.mean([results[task][key] for task, key in pairs]))
      for group, pairs in groups.items()
  }
  out[name] = float(np.mean(list(out.values())))
  return out


def glue_average(results: Mapping[str, Mapping[str, float]],
                 include_wnli: bool = True) -> dict[str, float]:
  """The GLUE score (0-100) and each task's score, as the GLUE leaderboard computes them.

  `results` maps a task (cola, sst2, mrpc, stsb, qqp, mnli_matched, mnli_mismatched, qnli, rte,
  wnli) to its metrics dict. A task with two metrics scores their mean (MRPC and QQP: F1 and
  accuracy; STS-B: Pearson and Spearman); MNLI is one task scoring the mean of its matched and
  mismatched accuracies; the GLUE score is the unweighted mean of the 9 task scores (Wang et al.
  2018). The diagnostic set (AX) is not part of it. `include_wnli=False` averages the other 8, as
  T5's own `eval_utils.compute_avg_glue` does (T5 did not train on WNLI). Returns the per-task
  scores and 'glue_average'.
  """
  groups = dict(GLUE_GROUPS)
  if not include_wnli:
    del groups['wnli']
  return _benchmark_average('glue_average', results, groups)


def superglue_average(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """The SuperGLUE score (0-100) and each task's score, as the SuperGLUE leaderboard computes them.

  Tasks: boolq (accuracy), cb (mean of macro_f1 and accuracy), copa (accuracy), multirc (mean of
  F1a over all answers 'f1' and question-level 'exact_match'), record (mean of 'f1' and 'em'), rte,
  wic, wsc (accuracy); the score is the unweighted mean of the 8 task scores (Wang et al. 2019).
  The diagnostics AX-b / AX-g are not part of it. Returns the per-task scores and
  'superglue_average'.
  """
  return _benchmark_average('superglue_average', results, SUPERGLUE_GROUPS)


# --- registry ------------------------------------------------------------------------------------


class UnknownMetricError(KeyError):
  """No metric of that name; the message lists the closest registered names."""

  def __str__(self):
    return str(self.args[0])


class _Registry(dict):
  """name -> metric function; a missing name raises UnknownMetricError with suggestions."""

  def __missing__(self, name):
    close = difflib.get_close_matches(str(name), list(self), n=3, cutoff=0.5)
    hint = f' Did you mean {" or ".join(repr(c) for c in close)}?' if close else ''
    raise UnknownMetricError(f'unknown metric {name!r}.{hint} '
                             f'Registered: {", ".join(sorted(self))}.')


METRICS: dict[str, MetricFn] = _Registry({
    'accuracy': accuracy,
    'sequence_accuracy': sequence_accuracy,
    'matthews_corrcoef': matthews_corrcoef,
    'f1': f1,
    'macro_f1': macro_f1,
    'mean_3class_f1': functools.partial(macro_f1, labels=(0, 1, 2)),  # CB, as T5 (labels 0..2)
    'pearson_corrcoef': pearson_corrcoef,
    'spearman_corrcoef': spearman_corrcoef,
    'squad': squad,
    'bleu': bleu,
    'rouge': rouge,
    'rank_accuracy': rank_accuracy,
    'all_match': all_match,
    'multirc_f1_over_all_answers': multirc_f1_over_all_answers,
    'multirc_exact_match': mean_group_metric(all_match),  # MultiRC's question-level EM
})


def register_metric(name: str, fn: MetricFn) -> MetricFn:
  """Adds `fn` under `name` (an existing name is an error: metrics are looked up by name)."""
  if name in METRICS:
    raise ValueError(f'metric {name!r} is already registered.')
  METRICS[name] = fn
  return fn


def get_metric(name: str) -> MetricFn:
  return METRICS[name]


def resolve(metrics: Sequence[str | MetricFn]) -> list[MetricFn]:
  """Names -> registered functions; functions pass through (a Task's `metric_fns` may mix them)."""
  return [METRICS[m] if isinstance(m, str) else m for m in metrics]


def takes_scores(fn: MetricFn) -> bool:
  """True for a score-based metric: its second parameter is named `scores` (seqio's rule)."""
  params = list(inspect.signature(fn).parameters)
  return len(params) >= 2 and params[1] == 'scores'
