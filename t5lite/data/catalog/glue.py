"""GLUE and SuperGLUE over TFDS, text-to-text as in T5, with T5's postprocessing and metrics.

Formats are T5's (`t5.data.preprocessors.glue` and friends; Raffel et al. 2020, appendix D),
re-implemented here in plain Python on the decoded TFDS records: the benchmark name, then each
text feature as '<feature name>: <text>' (in sorted name order unless T5 fixes one), and the
label's name as the target ('<unk>' for an unlabelled test example), e.g.

  glue_sst2_v002     'sst2 sentence: it is a charming film' -> 'positive'
  glue_mnli_v002     'mnli hypothesis: <h> premise: <p>' -> 'entailment' | 'neutral' | ...
  glue_stsb_v002     'stsb sentence1: <s1> sentence2: <s2>' -> '3.8' (the score rounded to the
                     nearest 0.2, half to even as tf.round, one decimal)
  super_glue_wsc_v102  'wsc text: * The city councilmen * refused ... because # they # feared
                     violence .' -> 'True' (T5's `wsc` format: the noun between '*', the pronoun
                     between '#'; T5's paper trained on the `wsc_simple` variant instead)
  super_glue_record_v102  'record query: <q> entities: <e1>, <e2> passage: <p>' -> an answer

Task names are T5's (glue_<config>_v002, super_glue_<config>_v102). Sources are
TfdsSource('glue/<config>:2.0.0') (T5 pinned 1.0.0; current TFDS builds either with the same
code and downloads, and 2.0.0 is what `tfds build glue/<config>` makes) and
'super_glue/<config>:1.0.2' (T5's).
MNLI: `glue_mnli_v002` trains (its splits are train, validation_matched, ...);
`glue_mnli_matched_v002` / `glue_mnli_mismatched_v002` evaluate on glue/mnli_matched and
glue/mnli_mismatched, whose split is called 'validation', so eval.split='validation' covers every
task. `glue_ax_v002` (the diagnostic, test split only, no labels) has no metrics.

Postprocessing as T5's: label text -> class id (-1 if it is no label), STS-B text -> float (-1.0
if it is no number), MultiRC -> {'value': class id, 'group': its question}, a ReCoRD target ->
every reference answer (both from the example the evaluator passes to postprocess_fn).
ReCoRD's training split has one example per (query, answer), as T5's `record`; its validation
split one per query, scored against all answers (T5 expands it too and deduplicates in the
metric: the same numbers).

`glue_scores(results)` / `superglue_scores(results)` map these task names to
`metrics.glue_average` / `superglue_average`. The mixtures `glue_v002_proportional` and
`super_glue_v102_proportional` weight the training tasks by their example counts, as T5's.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Sequence

import numpy as np

from t5lite import metrics
from t5lite.data import preprocessors as P
from t5lite.data.catalog.common import (UNKNOWN_LABEL, string_label_to_class_id, string_to_float,
                                        t5_features, text, texts)
from t5lite.data.sources import Source, TfdsSource
from t5lite.data.tasks import add_mixture, add_task

GLUE_VERSION = '2.0.0'
SUPER_GLUE_VERSION = '1.0.2'
SPLITS = ('train', 'validation', 'test')
MNLI_LABELS = ('entailment', 'neutral', 'contradiction')
BOOL_LABELS = ('False', 'True')  # SuperGLUE's boolean ClassLabel names


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One GLUE/SuperGLUE config: its task, TFDS name, format and metrics."""
  task: str  # registered task name
  tfds_name: str  # 'glue/cola:2.0.0'
  prefix: str  # first word of the inputs (T5's benchmark_name)
  features: tuple  # text features, in the order they are written
  labels: tuple | None  # ClassLabel names; None for STS-B's float score
  metric_fns: tuple
  splits: tuple = SPLITS
  key: str = ''  # the glue_average / superglue_average key; '' for none


def _glue(config, features, labels, metric_fns, prefix=None, splits=SPLITS, key=None):
  return Benchmark(f'glue_{config}_v002', f'glue/{config}:{GLUE_VERSION}', prefix or config,
                   tuple(features), labels and tuple(labels), tuple(metric_fns), splits,
                   config if key is None else key)


def _super_glue(config, features, labels, metric_fns, name=None):
  return Benchmark(f'super_glue_{name or config}_v102', f'super_glue/{config}:{SUPER_GLUE_VERSION}',
                   name or config, tuple(features), labels and tuple(labels), tuple(metric_fns),
                   SPLITS, name or config)


# Feature orders: T5 writes the text features in sorted name order unless it names an order
# (MultiRC, WiC). Metrics: T5's per task (t5/data/glue_utils.py), which are the benchmarks' own.
_BINARY = ('f1', 'accuracy')
GLUE = (
    _glue('cola', ['sentence'], ['unacceptable', 'acceptable'], ['matthews_corrcoef']),
    _glue('sst2', ['sentence'], ['negative', 'positive'], ['accuracy']),
    _glue('mrpc', ['sentence1', 'sentence2'], ['not_equivalent', 'equivalent'], _BINARY),
    _glue('qqp', ['question1', 'question2'], ['not_duplicate', 'duplicate'], _BINARY),
    _glue('stsb', ['sentence1', 'sentence2'], None, ['pearson_corrcoef', 'spearman_corrcoef']),
    _glue(
        'mnli', ['hypothesis', 'premise'], MNLI_LABELS, ['accuracy'], key='',
        splits=('train', 'validation_matched', 'validation_mismatched', 'test_matched',
                'test_mismatched')),
    _glue('mnli_matched', ['hypothesis', 'premise'], MNLI_LABELS, ['accuracy'], prefix='mnli',
          splits=('validation', 'test')),
    _glue('mnli_mismatched', ['hypothesis', 'premise'], MNLI_LABELS, ['accuracy'], prefix='mnli',
          splits=('validation', 'test')),
    _glue('qnli', ['question', 'sentence'], ['entailment', 'not_entailment'], ['accuracy']),
    _glue('rte', ['sentence1', 'sentence2'], ['entailment', 'not_entailment'], ['accuracy']),
    _glue('wnli', ['sentence1', 'sentence2'], ['not_entailment', 'entailment'], ['accuracy']),
    # The diagnostic set, cast as MNLI (as T5 does); test split only, unlabelled: no metrics.
    _glue('ax', ['hypothesis', 'premise'], MNLI_LABELS, [], prefix='mnli', splits=('test',),
          key=''),
)
SUPER_GLUE = (
    _super_glue('boolq', ['passage', 'question'], BOOL_LABELS, ['accuracy']),
    _super_glue('cb', ['hypothesis', 'premise'], ['entailment', 'contradiction', 'neutral'],
                ['mean_3class_f1', 'accuracy']),
    _super_glue('copa', ['choice1', 'choice2', 'premise', 'question'], ['choice1', 'choice2'],
                ['accuracy']),
    _super_glue('multirc', ['question', 'answer', 'paragraph'], BOOL_LABELS,
                ['multirc_f1_over_all_answers', 'multirc_exact_match']),
    _super_glue('record', ['query', 'entities', 'passage'], None, ['squad']),
    _super_glue('rte', ['hypothesis', 'premise'], ['entailment', 'not_entailment'], ['accuracy']),
    _super_glue('wic', ['sentence1', 'sentence2', 'word'], BOOL_LABELS, ['accuracy']),
    _super_glue('wsc.fixed', ['text'], BOOL_LABELS, ['accuracy'], name='wsc'),
)
BY_TASK = {b.task: b for b in GLUE + SUPER_GLUE}

# --- formats --------------------------------------------------------------------------------------


def _label_name(example, labels: Sequence[str]) -> str:
  label = int(example['label'])
  return UNKNOWN_LABEL if label == -1 else labels[label]


def glue_format(example, ctx=None, prefix: str = '', features: Sequence[str] = (),
                labels: Sequence[str] = ()) -> dict:
  """T5's `preprocessors.glue`: '<prefix> <f1>: <text> <f2>: <text>' -> the label's name."""
  del ctx
  parts = [prefix]
  for key in features:
    parts += [f'{key}:', text(example[key])]
  inputs = ' '.join(parts)
  if prefix == 'multirc':  # T5 strips the paragraphs' HTML markup (no whitespace squashing)
    inputs = re.sub('<(/)?b>', '', inputs.replace('<br>', ' '))
  return {'inputs': inputs, 'targets': _label_name(example, labels)}


def stsb_target(score: float) -> str:
  """T5's STS-B target: the score rounded to the nearest 0.2 in float32, as
  tf.as_string(tf.round(score * 5) / 5, precision=1); tf.round and np.round both round half to
  even, so 2.5 -> '2.4'."""
  five = np.float32(5)
  return f'{np.round(np.float32(score) * five) / five:.1f}'


def stsb_format(example, ctx=None) -> dict:
  """T5's `preprocessors.stsb`: 'stsb sentence1: <s1> sentence2: <s2>' -> e.g. '3.8'."""
  del ctx
  return {
      'inputs': ' '.join(
          ['stsb sentence1:',
           text(example['sentence1']), 'sentence2:',
           text(example['sentence2'])]), 'targets': stsb_target(float(example['label']))
  }


def _mark_span(value: str, span: str, index: int, mark: str) -> str:
  # T5's regex: the span after exactly `index` whitespace-separated words gets `mark` each side;
  # T5 puts the span text in the pattern unescaped, we escape it (same result for plain words).
  pattern = r'^((?:\S+\s){%d})(%s)' % (index, re.escape(span))
  return re.sub(pattern, lambda m: f'{m.group(1)}{mark} {m.group(2)} {mark}', value, count=1)


def wsc_format(example, ctx=None) -> dict:
  """T5's `preprocessors.wsc`: the candidate noun marked with '*', the pronoun with '#':
  'wsc text: * The city councilmen * refused ... because # they # feared violence .'."""
  del ctx
  span1, span2 = int(example['span1_index']), int(example['span2_index'])
  marked = _mark_span(text(example['text']), text(example['span1_text']), span1, '*')
  # Marking span 1 added two words before span 2 when span 2 comes after it.
  marked = _mark_span(marked, text(example['span2_text']), span2 + 2 * (span1 < span2), '#')
  return {'inputs': 'wsc text: ' + marked, 'targets': _label_name(example, BOOL_LABELS)}


def record_format(example, ctx=None) -> dict:
  """T5's `preprocessors.record`: 'record query: <q> entities: <e1>, <e2> passage: <p>' -> the
  answer numbered `answer_index` (the first one without it; '<unk>' when there is none). The
  passage's '@highlight' lines become sentences."""
  del ctx
  passage = re.sub(r'(\.|\?|\!|\"|\')\n@highlight\n', r'\1 ', text(example['passage']))
  passage = re.sub(r'\n@highlight\n', '. ', passage)
  answers = texts(example['answers'])
  inputs = ' '.join([
      'record query:',
      text(example['query']), 'entities:', ', '.join(texts(example['entities'])), 'passage:',
      passage
  ])
  target = answers[int(example.get('answer_index', 0))] if answers else UNKNOWN_LABEL
  return {'inputs': inputs, 'targets': target}


class _PerAnswer(Sequence):
  """Random access to (record, answer) pairs: element k is record i with 'answer_index' j."""

  def __init__(self, records, key: str):
    self._records = records
    # One pass over the split to count answers (records without any still give one example).
    self._pairs = [(i, j) for i in range(len(records)) for j in range(max(1, len(records[i][key])))]

  def __len__(self):
    return len(self._pairs)

  def __getitem__(self, k):
    if isinstance(k, slice):
      return [self[x] for x in range(*k.indices(len(self)))]
    i, j = self._pairs[k]
    return {**self._records[i], 'answer_index': j}


class PerAnswerSource(Source):
  """A source whose `expand` splits have one example per entry of `key` (ReCoRD's answers)."""

  def __init__(self, source: Source, expand: Sequence[str] = ('train',), key: str = 'answers'):
    self.source = source
    self.expand = tuple(expand)
    self.key = key
    self._cache: dict[str, Sequence] = {}

  @property
  def splits(self):
    return self.source.splits

  def get(self, split):
    if split not in self.expand:
      return self.source.get(split)
    if split not in self._cache:
      self._cache[split] = _PerAnswer(self.source.get(split), self.key)
    return self._cache[split]

  def __getstate__(self):
    return {**self.__dict__, '_cache': {}}


# --- postprocessing -------------------------------------------------------------------------------


def multirc_postprocess(label: str, example=None, is_target: bool = False) -> dict:
  """T5's `postprocessors.multirc`: {'value': class id}, and for a target the 'group' its
  question belongs to (for the question-level exact match). We group by (paragraph, question)
  index; T5 by the question index alone, the same where those are unique in a split."""
  value = string_label_to_class_id(label, label_classes=BOOL_LABELS)
  if not is_target:
    return {'value': value}
  if example is None:
    raise ValueError('MultiRC targets need their example (the question index) to be grouped; '
                     'evaluate with t5lite.evaluation.evaluator, which passes it.')
  return {
      'value': value, 'group': (int(example['idx']['paragraph']), int(example['idx']['question']))
  }


def record_postprocess(answer: str, example=None, is_target: bool = False):
  """T5's `postprocessors.record`: a target is every answer of the query (`squad` takes the
  best); a prediction stays text. Without the example the target's own answer is the reference."""
  if is_target:
    refs = texts(example['answers']) if example is not None else []
    return refs or [answer]
  return answer


# --- registration ---------------------------------------------------------------------------------


def _register(b: Benchmark):
  source: Source = TfdsSource(b.tfds_name, splits=b.splits)
  postprocess = (functools.partial(string_label_to_class_id, label_classes=b.labels)
                 if b.labels else None)
  if b.prefix == 'stsb':
    step, postprocess = stsb_format, string_to_float
  elif b.prefix == 'wsc':
    step = wsc_format
  elif b.prefix == 'record':
    step, postprocess = record_format, record_postprocess
    source = PerAnswerSource(source)
  else:
    step = functools.partial(glue_format, prefix=b.prefix, features=b.features, labels=b.labels)
    if b.prefix == 'multirc':
      postprocess = multirc_postprocess
  add_task(b.task, source, [step, P.tokenize], t5_features(), postprocess_fn=postprocess,
           metric_fns=list(b.metric_fns))


for _benchmark in GLUE + SUPER_GLUE:
  _register(_benchmark)

# T5's training mixtures, rates = training examples (t5/data/glue_utils.py). T5 leaves WNLI out
# of GLUE training (it trained on WSC/DPR instead); its SuperGLUE mixture had the simple-WSC and
# DPR tasks where we have super_glue_wsc_v102 (wsc.fixed's 554 training examples).
GLUE_RATES = {
    'glue_cola_v002': 8_551, 'glue_sst2_v002': 67_349, 'glue_mrpc_v002': 3_668,
    'glue_qqp_v002': 363_849, 'glue_stsb_v002': 5_749, 'glue_mnli_v002': 392_702,
    'glue_qnli_v002': 104_743, 'glue_rte_v002': 2_490
}
SUPER_GLUE_RATES = {
    'super_glue_boolq_v102': 9_427, 'super_glue_cb_v102': 250, 'super_glue_copa_v102': 400,
    'super_glue_multirc_v102': 27_243, 'super_glue_record_v102': 138_854,
    'super_glue_rte_v102': 2_490, 'super_glue_wic_v102': 5_428, 'super_glue_wsc_v102': 554
}
add_mixture('glue_v002_proportional', list(GLUE_RATES.items()))
add_mixture('super_glue_v102_proportional', list(SUPER_GLUE_RATES.items()))

# --- benchmark scores -----------------------------------------------------------------------------


def _by_key(results: Mapping[str, Any], benchmarks) -> dict[str, Mapping[str, float]]:
  keys = {b.task: b.key for b in benchmarks if b.key}
  return {keys[name]: getattr(r, 'metrics', r) for name, r in results.items() if name in keys}


def glue_scores(results: Mapping[str, Any], include_wnli: bool = True) -> dict[str, float]:
  """`metrics.glue_average` of {task name: metrics dict or evaluator TaskResult} of these tasks
  (glue_cola_v002, ..., glue_mnli_matched_v002, glue_mnli_mismatched_v002, ...)."""
  return metrics.glue_average(_by_key(results, GLUE), include_wnli=include_wnli)


def superglue_scores(results: Mapping[str, Any]) -> dict[str, float]:
  """`metrics.superglue_average` of {task name: metrics dict or TaskResult} of these tasks."""
  return metrics.superglue_average(_by_key(results, SUPER_GLUE))
