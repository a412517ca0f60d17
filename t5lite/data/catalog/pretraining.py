"""Registered tasks: pretraining objectives over the embedded offline corpus and C4.

  embedded_span_corruption  T5 span corruption (0.15, mean span 3), chunks that fill 'inputs'
                            exactly (the quickstart's task)
  embedded_prefix_lm        prefix LM, split point uniform among those that fit
  embedded_causal_lm        plain language modelling ('targets' only; decoder-only converter)
  embedded_ul2              UL2 mixture of denoisers (R, X, S with [NLU]/[NLG]/[S2S])
  embedded_pretraining_mix  a mixture of the span corruption, prefix LM and UL2 tasks
  docstring_kind, docstring_module, fill_word, downstream_mix
                            offline fine-tuning tasks with metrics (t5lite/data/downstream.py,
                            registered at the end of this module)
  c4_span_corruption        T5 span corruption over TFDS c4/en (array_record), per-document
                            random chunks (T5's select_random_chunk) packed together
  c4_ul2                    the UL2 mixture of denoisers over the same
  glue_<config>_v002, super_glue_<config>_v102, glue_v002_proportional,
  super_glue_v102_proportional
                            GLUE (all tasks and AX) and SuperGLUE (the 8 scored tasks) over
                            TFDS, in T5's text-to-text formats with its postprocessing and
                            metrics (t5lite/data/glue.py)
  squad_v010_allanswers, cnn_dailymail_v002, wmt14_ende_v003, wmt14_enfr_v003, wmt16_enro_v003
                            SQuAD v1.1, CNN/DailyMail, WMT over TFDS, the same way
                            (t5lite/data/public_tasks.py); docs/evaluation.md lists them all

Imported by `tasks.get`/`tasks.names` on first use. The embedded tasks' vocabulary is the
embedded SentencePiece model (trained once and cached; see vocab.embedded_vocabulary); the C4
and public downstream tasks declare T5's (read from gs:// on first use only).
"""

from __future__ import annotations

import functools

from t5lite.data import embedded, pipeline
from t5lite.data import preprocessors as P
from t5lite.data.sources import FunctionSource, TfdsSource
from t5lite.data.tasks import Feature, add_mixture, add_task
from t5lite.data.vocab import SentencePieceVocabulary, embedded_vocabulary


# Every 20th document (~3% of the text, ~8k tokens) is held out as the 'validation' split, for
# the validation loss of in-training evaluation. The SentencePiece model is trained on all of it.
VALIDATION_EVERY = 20


def _in_split(index: int, split: str) -> bool:
  held_out = index % VALIDATION_EVERY == VALIDATION_EVERY - 1
  return held_out if split == 'validation' else not held_out


def _corpus(split: str):
  return [{'text': d, 'doc': i} for i, d in enumerate(embedded.corpus_documents())
          if _in_split(i, split)]


class EmbeddedTokens:
  """Dataset-level step: the embedded corpus tokenized with the task's vocabulary.

  Shares `pipeline._tokenized_corpus`'s per-process cache, so several embedded tasks and
  splits tokenize the corpus once.
  """
  dataset_level = True

  def __call__(self, examples, ctx):
    v = ctx.output_features['targets'].vocabulary
    tokens = pipeline._tokenized_corpus(v.path, v.extra_ids)  # pylint: disable=protected-access
    return [{'targets': tokens[e['doc']]} for e in examples]  # this split's documents


def embedded_source() -> FunctionSource:
  return FunctionSource(_corpus, splits=('train', 'validation'))


def _features(inputs: bool = True):
  f = Feature(embedded_vocabulary)
  return {'inputs': f, 'targets': f} if inputs else {'targets': f}


add_task('embedded_span_corruption', embedded_source(), [
    EmbeddedTokens(),
    P.ConcatAndSplit(P.span_corruption_raw_length),
    functools.partial(P.span_corruption_step, noise_density=0.15, mean_noise_span_length=3.0),
], _features())

add_task('embedded_prefix_lm', embedded_source(), [
    EmbeddedTokens(), P.ConcatAndSplit(P.prefix_lm_raw_length), P.prefix_lm,
], _features())

add_task('embedded_causal_lm', embedded_source(), [
    EmbeddedTokens(), P.ConcatAndSplit(P.causal_lm_raw_length), P.causal_lm,
], _features(inputs=False))

add_task('embedded_ul2', embedded_source(), [
    EmbeddedTokens(), P.ConcatAndSplit(P.ul2_raw_length), P.ul2_denoise,
], _features())

# --- C4 (TFDS c4/en, array_record: prepare it once with TFDS, or point TFDS_DATA_DIR at a copy)
# T5's vocabulary: 32000 SentencePiece pieces + 100 sentinels (model.vocab_size 32128). Loaded on
# first use only, so registering needs no network; train with --config.data.vocabulary=task.
T5_SPM_PATH = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
C4_TFDS_NAME = 'c4/en:3.1.0'


def _c4_features():
  f = Feature(functools.partial(SentencePieceVocabulary, T5_SPM_PATH))
  return {'inputs': f, 'targets': f}


def _c4_steps(length_fn, objective):
  # Per document, lazily: text -> tokens -> a random chunk of the raw length -> the objective.
  return [functools.partial(P.rekey, key_map={'targets': 'text'}), P.tokenize,
          P.RandomChunk(length_fn), objective]


add_task('c4_span_corruption', TfdsSource(C4_TFDS_NAME, splits=('train', 'validation')),
         _c4_steps(P.span_corruption_raw_length,
                   functools.partial(P.span_corruption_step, noise_density=0.15,
                                     mean_noise_span_length=3.0)),
         _c4_features())

add_task('c4_ul2', TfdsSource(C4_TFDS_NAME, splits=('train', 'validation')),
         _c4_steps(P.ul2_raw_length, P.ul2_denoise), _c4_features())

add_mixture('embedded_pretraining_mix', [
    ('embedded_span_corruption', 1.0), ('embedded_prefix_lm', 1.0), ('embedded_ul2', 1.0)])

# Downstream (fine-tuning) tasks over the same corpus, with postprocessing and metrics.
from t5lite.data import downstream  # pylint: disable=wrong-import-position,unused-import  # noqa: E402,F401

# Public downstream tasks over TFDS (GLUE, SuperGLUE, SQuAD, CNN/DailyMail, WMT).
# pylint: disable-next=wrong-import-position,unused-import
from t5lite.data import glue, public_tasks  # noqa: E402,F401
