"""Public downstream tasks over TFDS, text-to-text as in T5: SQuAD, CNN/DailyMail and WMT.

GLUE and SuperGLUE are in glue.py; both use the helpers of common.py (T5's vocabulary, TFDS
record decoding, label and number postprocessors) and are registered when `t5lite.data.catalog`
is imported. Task names are T5's (t5/data/tasks.py), so a T5 user's task names carry over:

  squad_v010_allanswers  squad/v1.1:3.0.0        'question: <q> context: <c>' -> the first answer,
                                                  punctuation padded with spaces as T5 does;
                                                  metric `squad` (EM, F1) against *every* answer
  cnn_dailymail_v002     cnn_dailymail:3.4.0     'summarize: <article>' -> the highlights; `rouge`
  wmt14_ende_v003        wmt14_translate/de-en:1.0.0  'translate English to German: <en>' -> <de>
  wmt14_enfr_v003        wmt14_translate/fr-en:1.0.0  'translate English to French: <en>' -> <fr>
  wmt16_enro_v003        wmt16_translate/ro-en:1.0.0  'translate English to Romanian: <en>' -> <ro>;
                                                  the three WMT tasks: `bleu` (sacrebleu, T5's
                                                  settings)

The formats follow T5's preprocessors (`squad`, `summarize`, `translate`; Raffel et al. 2020,
appendix D), re-implemented here in plain Python on the decoded TFDS records. TFDS versions are
T5's except CNN/DailyMail: T5 read 3.1.0, which current TFDS can no longer build; 3.4.0 has the
same stories; its highlights end in '.' instead of ' .' (ROUGE drops punctuation).

Data: each dataset must be prepared with TFDS as array_record (read without TensorFlow), e.g.
`tfds build squad/v1.1 --file_format=array_record`, or read through tf.data with the `tf` extra
(see sources.TfdsSource); TFDS_DATA_DIR (or the TFDS default) says where. The vocabulary is T5's
SentencePiece model from gs://, loaded on first use only (registering touches no network); with
--config.data.vocabulary=task training and evaluation use it.
"""
from __future__ import annotations

import functools
import re

from t5lite.data import preprocessors as P
from t5lite.data.catalog.common import t5_features, text, texts
from t5lite.data.sources import TfdsSource
from t5lite.data.tasks import add_task

# --- SQuAD v1.1 ----------------------------------------------------------------------------------

# T5 pads with the regexes `([[:punct:]])` -> ' \1 ' and `\s+` -> ' ' (RE2 classes, ASCII only).
_PUNCTUATION = re.compile(r'([!-/:-@\[-`{-~])')
_WHITESPACE = re.compile(r'[\t\n\f\r ]+')


def pad_punctuation(value: str) -> str:
  """T5's `_pad_punctuation`: a space each side of every ASCII punctuation mark, runs of
  whitespace squashed to one space; also stripped (T5 may leave a space at either end, which
  SentencePiece drops anyway)."""
  return _WHITESPACE.sub(' ', _PUNCTUATION.sub(r' \1 ', value)).strip()


def _join(*parts: str) -> str:
  """T5's `_string_join`: joined with spaces, whitespace runs squashed (and stripped)."""
  return _WHITESPACE.sub(' ', ' '.join(parts)).strip()


SQUAD_TFDS_NAME = 'squad/v1.1:3.0.0'


def squad_format(example, ctx=None) -> dict:
  """T5's `preprocessors.squad`: 'question: <q> context: <c>' -> the first answer, question,
  context and answer with their punctuation padded (T5 trains on that form; the SQuAD metric
  drops punctuation before comparing, so scores are unaffected)."""
  del ctx
  answers = [pad_punctuation(a) for a in texts(example['answers']['text'])]
  return {
      'inputs': _join('question:', pad_punctuation(text(example['question'])), 'context:',
                      pad_punctuation(text(example['context']))),
      'targets': answers[0] if answers else ''
  }


def squad_postprocess(answer: str, example=None, is_target: bool = False):
  """T5's `postprocessors.qa`: a target becomes the list of all the example's answers (padded as
  the target is), so `squad` takes the best one; a prediction stays text. Without the example
  (a caller that has none) the target's own answer is the only reference."""
  if is_target and example is not None:
    refs = [pad_punctuation(a) for a in texts(example['answers']['text'])]
    return refs or [answer]
  return [answer] if is_target else answer


add_task('squad_v010_allanswers',
         TfdsSource(SQUAD_TFDS_NAME, splits=('train', 'validation')), [squad_format, P.tokenize],
         t5_features(), postprocess_fn=squad_postprocess, metric_fns=['squad'])

# --- CNN/DailyMail -------------------------------------------------------------------------------

CNN_DAILYMAIL_TFDS_NAME = 'cnn_dailymail:3.4.0'


def summarize_format(example, ctx=None, article_key: str = 'article',
                     summary_key: str = 'highlights') -> dict:
  """T5's `preprocessors.summarize`: 'summarize: <article>' -> the summary."""
  del ctx
  return {
      'inputs': 'summarize: ' + text(example[article_key]), 'targets': text(example[summary_key])
  }


add_task('cnn_dailymail_v002',
         TfdsSource(CNN_DAILYMAIL_TFDS_NAME, splits=('train', 'validation', 'test')),
         [summarize_format, P.tokenize], t5_features(), metric_fns=['rouge'])

# --- WMT -----------------------------------------------------------------------------------------

# English names as T5 takes them from babel.Locale(code).english_name.
LANGUAGE_NAMES = {'en': 'English', 'de': 'German', 'fr': 'French', 'ro': 'Romanian'}


def translate_format(example, ctx=None, source_language: str = 'en',
                     target_language: str = 'de') -> dict:
  """T5's `preprocessors.translate`: 'translate English to German: <en>' -> <de>. TFDS
  translation records hold one text per language code."""
  del ctx
  return {
      'inputs': (f'translate {LANGUAGE_NAMES[source_language]} to '
                 f'{LANGUAGE_NAMES[target_language]}: ' + text(example[source_language])),
      'targets': text(example[target_language])
  }


# (task, TFDS name, source language, target language), as T5's `wmt%s_%s%s_v003` tasks.
WMT_TASKS = (
    ('wmt14_ende_v003', 'wmt14_translate/de-en:1.0.0', 'en', 'de'),
    ('wmt14_enfr_v003', 'wmt14_translate/fr-en:1.0.0', 'en', 'fr'),
    ('wmt16_enro_v003', 'wmt16_translate/ro-en:1.0.0', 'en', 'ro'),
)

for _name, _tfds_name, _source, _target in WMT_TASKS:
  add_task(_name, TfdsSource(_tfds_name, splits=('train', 'validation', 'test')), [
      functools.partial(translate_format, source_language=_source, target_language=_target),
      P.tokenize
  ], t5_features(), metric_fns=['bleu'])
