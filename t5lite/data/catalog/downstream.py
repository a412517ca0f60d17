"""Offline downstream tasks over the embedded corpus: classification and short-answer generation.

All are text-to-text, as in T5 (a task prefix, then the text; the answer is text, decoded and
compared as a string), with train and validation splits made by *document*, so no validation
window has a neighbour in training; validation windows that repeat a training window word for
word are dropped (the corpus repeats a few docstrings).

  docstring_kind    'docstring kind: <24 words>' -> 'reference' | 'library'. Is the snippet from
                    the Python language reference (the pydoc topics behind help()) or from a
                    standard-library docstring? The `module.name:` prefix of library docstrings is
                    removed, and each split is balanced by dropping, deterministically, windows of
                    the larger class: the majority-class baseline is 50% accuracy, 33.3 macro F1.
                    Metrics: accuracy and macro F1 over the two labels (an invalid answer counts as
                    wrong) of the decoded answer, and rank accuracy (the more likely of the two
                    labels under the model; the task's `rank_options`).
  docstring_module  'which module: <24 words of a library docstring>' -> its module's dotted name
                    ('json', 'email.message', 'xml.etree.ElementTree': 105 modules), generated
                    token by token; exact-match accuracy. Baseline: always the most frequent
                    training answer ('logging'), 3.5%.
  fill_word         'fill blank: <16 words, one replaced by <extra_id_0>>' -> the word, one of the
                    FILL_CHOICES most frequent words. The blank is the first sentinel, as in span
                    corruption. Exact match of the first span; baseline 'the', 17.3%. Too hard for
                    the tiny quickstart model: fine-tuned with docstring_kind for 600 steps it
                    stayed at 17.3%, the baseline, so it is registered (for larger models) but is
                    not in the mix.
  downstream_mix    docstring_kind + docstring_module at equal rates (what
                    configs/quickstart_finetune.py trains on).

Splits: docstring_kind and docstring_module hold out every KIND_VALIDATION_EVERY-th document
(the pretraining held-out documents alone give only 66 balanced docstring_kind windows); the
quickstart saw some of that text unlabelled (span corruption), never the answers. fill_word holds
out exactly the pretraining validation documents (common.VALIDATION_EVERY), so a blanked word
cannot be recalled from pretraining. `baselines()` computes the trivial baselines.

Windows are consecutive, non-overlapping runs of words of each document (a document's last,
shorter window is kept when it has at least MIN_WORDS words). Registered when
`t5lite.data.catalog` is imported.
"""
from __future__ import annotations

import collections
import functools
from typing import Sequence

import numpy as np

from t5lite import metrics
from t5lite.data import embedded
from t5lite.data.catalog.common import VALIDATION_EVERY, embedded_features, held_out
from t5lite.data.sources import FunctionSource
from t5lite.data.tasks import add_mixture, add_task
from t5lite.data.vocab import SENTINEL_TEXT, encode_with_sentinels

KIND_WORDS = 24
FILL_WORDS = 16
MIN_WORDS = 8
FILL_CHOICES = 50
LABELS = ('reference', 'library')
BLANK = '<extra_id_0>'  # written as text; tokenize_with_sentinels makes it the sentinel id
SENTINEL = SENTINEL_TEXT
# Score-mode options per task: the evaluator ranks them by log-likelihood (rank classification).
# Each task carries its own as `task.rank_options`; this table is what registration passes.
RANK_OPTIONS = {'docstring_kind': LABELS}

KIND_VALIDATION_EVERY = 5
KIND_MAX_VALIDATION_PER_CLASS = 250  # keeps one evaluation pass short on a CPU


def _held_out(index: int, every: int | None = None) -> bool:
  return held_out(index, VALIDATION_EVERY if every is None else every)


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[tuple[int, str, str, str], ...]:
  """(document index, label, module, text without the library `name:` prefix); module is the
  embedded.MODULES entry a library docstring belongs to ('' for the reference)."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  n_reference = sum(
      len(embedded.normalize_whitespace(t)) >= embedded.MIN_DOCUMENT_CHARS for t in topics.values())
  modules = sorted(embedded.MODULES, key=len, reverse=True)  # the longest prefix wins
  out = []
  for i, doc in enumerate(embedded.corpus_documents()):
    label, module = (LABELS[0] if i < n_reference else LABELS[1]), ''
    if label == 'library':
      name, sep, rest = doc.partition(': ')
      doc = rest if sep and ' ' not in name else doc
      module = next((m for m in modules if name == m or name.startswith(m + '.')), '')
    out.append((i, label, module, doc))
  return tuple(out)


@functools.lru_cache(maxsize=8)
def _windows(split: str, size: int, every: int | None = None) -> tuple[tuple[str, list[str]], ...]:
  """(label, module, words) for every window of `size` words of this split's documents, in order.
  Validation windows whose text also occurs in training (the corpus repeats a few docstrings
  word for word, e.g. in ipaddress) are left out."""
  out = []
  for i, label, module, text in _documents():
    if _held_out(i, every) != (split == 'validation'):
      continue
    words = text.split()
    for start in range(0, len(words), size):
      chunk = words[start:start + size]
      if len(chunk) >= MIN_WORDS:
        out.append((label, module, chunk))
  if split == 'validation':
    seen = {' '.join(w) for _, _, w in _windows('train', size, every)}
    out = [x for x in out if ' '.join(x[2]) not in seen]
  return tuple(out)


def docstring_kind_examples(split: str) -> list[dict]:
  windows = _windows(split, KIND_WORDS, KIND_VALIDATION_EVERY)
  by_label = {l: [w for w in windows if w[0] == l] for l in LABELS}
  keep = min(len(v) for v in by_label.values())
  if split == 'validation':
    keep = min(keep, KIND_MAX_VALIDATION_PER_CLASS)
  rng = np.random.default_rng([7, split == 'validation'])
  kept = set()
  for label, items in by_label.items():
    chosen = sorted(rng.choice(len(items), keep, replace=False)) if len(items) > keep else (range(
        len(items)))
    kept.update((label, int(j)) for j in chosen)
  out, seen = [], collections.Counter()
  for label, _, words in windows:  # document order, the two classes interleaved as they come
    j = seen[label]
    seen[label] += 1
    if (label, j) in kept:
      out.append({'inputs': 'docstring kind: ' + ' '.join(words), 'targets': label})
  return out


@functools.lru_cache(maxsize=1)
def fill_vocabulary() -> frozenset:
  """The FILL_CHOICES most frequent words of the training windows: the words that may be blanked
  (a cloze over frequent words: learnable from context by a small model, and not a lookup of
  rare terms that it could only memorise)."""
  counts = collections.Counter(w for _, _, words in _windows('train', FILL_WORDS) for w in words
                               if w.isalpha() and w.isascii())
  return frozenset(w for w, _ in counts.most_common(FILL_CHOICES))


def fill_word_examples(split: str) -> list[dict]:
  choices = fill_vocabulary()
  out = []
  for n, (_, _, words) in enumerate(_windows(split, FILL_WORDS)):
    candidates = [j for j, w in enumerate(words) if w in choices]
    if not candidates:
      continue
    j = candidates[int(np.random.default_rng([11, n]).integers(len(candidates)))]
    text = ' '.join(words[:j] + [BLANK] + words[j + 1:])
    out.append({'inputs': 'fill blank: ' + text, 'targets': words[j]})
  return out


def docstring_module_examples(split: str) -> list[dict]:
  return [{'inputs': 'which module: ' + ' '.join(words), 'targets': module}
          for label, module, words in _windows(split, KIND_WORDS, KIND_VALIDATION_EVERY)
          if label == 'library' and module]


def tokenize_with_sentinels(example, ctx):
  """`preprocessors.tokenize` that reads `<extra_id_N>` in the text as sentinel ids."""
  out = dict(example)
  for key, feature in ctx.output_features.items():
    if isinstance(example.get(key), str):
      out[key] = np.asarray(encode_with_sentinels(feature.vocabulary, example[key]), np.int32)
  return out


def first_span(text: str, example=None, is_target: bool = False) -> str:
  """Postprocess for fill_word: the answer before any further sentinel, a leading
  `<extra_id_0>` (span-corruption style output) dropped."""
  del example, is_target
  text = text.strip()
  if text.startswith(BLANK):
    text = text[len(BLANK):]
  return SENTINEL.split(text, maxsplit=1)[0].strip()


def strip_text(text: str, example=None, is_target: bool = False) -> str:
  """Postprocess: the answer without surrounding spaces (both tasks compare exact strings)."""
  del example, is_target
  return text.strip()


def rank_accuracy(targets: Sequence, scores: Sequence) -> dict[str, float]:
  """`metrics.rank_accuracy` under its own key, so it does not overwrite the decoded accuracy."""
  return {'rank_accuracy': metrics.rank_accuracy(targets, scores)['accuracy']}


def baselines(split: str = 'validation') -> dict[str, dict[str, float]]:
  """The trivial baselines on `split`, computed with the tasks' own metric functions:
  docstring_kind: always the most frequent training label (a tie: the first); fill_word: always
  the most frequent training answer, and copying the input."""
  out = {}
  kind_train = collections.Counter(e['targets'] for e in docstring_kind_examples('train'))
  kind = docstring_kind_examples(split)
  majority = [kind_train.most_common(1)[0][0]] * len(kind)
  targets = [e['targets'] for e in kind]
  out['docstring_kind/majority'] = {
      **metrics.accuracy(targets, majority), **metrics.macro_f1(targets, majority)
  }
  fill_train = collections.Counter(e['targets'] for e in fill_word_examples('train'))
  fill = fill_word_examples(split)
  targets = [e['targets'] for e in fill]
  out['fill_word/most_frequent_word'] = metrics.accuracy(targets, [fill_train.most_common(1)[0][0]]
                                                         * len(fill))
  out['fill_word/copy_input'] = metrics.accuracy(targets, [e['inputs'] for e in fill])
  module_train = collections.Counter(e['targets'] for e in docstring_module_examples('train'))
  module = docstring_module_examples(split)
  out['docstring_module/majority'] = metrics.accuracy(
      [e['targets'] for e in module], [module_train.most_common(1)[0][0]] * len(module))
  return out


_STEPS = [tokenize_with_sentinels]

add_task('docstring_kind', FunctionSource(docstring_kind_examples, ('train', 'validation')), _STEPS,
         embedded_features(), postprocess_fn=strip_text,
         metric_fns=['accuracy',
                     functools.partial(metrics.macro_f1, labels=LABELS),
                     rank_accuracy], rank_options=RANK_OPTIONS['docstring_kind'])
add_task('fill_word', FunctionSource(fill_word_examples, ('train', 'validation')), _STEPS,
         embedded_features(), postprocess_fn=first_span, metric_fns=['accuracy'])
add_task('docstring_module', FunctionSource(docstring_module_examples, ('train', 'validation')),
         _STEPS, embedded_features(), postprocess_fn=strip_text, metric_fns=['accuracy'])
add_mixture('downstream_mix', [('docstring_kind', 1.0), ('docstring_module', 1.0)])
