"""Pretraining tasks: objectives over the embedded offline corpus and over C4.

  embedded_span_corruption  T5 span corruption (0.15, mean span 3), chunks that fill 'inputs'
                            exactly (the quickstart's task)
  embedded_prefix_lm        prefix LM, split point uniform among those that fit
  embedded_causal_lm        plain language modelling ('targets' only; decoder-only converter)
  embedded_ul2              UL2 mixture of denoisers (R, X, S with [NLU]/[NLG]/[S2S])
  embedded_pretraining_mix  a mixture of the span corruption, prefix LM and UL2 tasks
  c4_span_corruption        T5 span corruption over TFDS c4/en (array_record), per-document
                            random chunks (T5's select_random_chunk) packed together
  c4_ul2                    the UL2 mixture of denoisers over the same

The embedded tasks' vocabulary is the embedded SentencePiece model (trained once and cached; see
vocab.embedded_vocabulary); the C4 tasks declare T5's (read from gs:// on first use only).
Registered when `t5lite.data.catalog` is imported.
"""
from __future__ import annotations

import functools

from t5lite.data import embedded, pipeline
from t5lite.data import preprocessors as P
from t5lite.data.catalog.common import embedded_features, in_split, t5_features
from t5lite.data.sources import FunctionSource, TfdsSource
from t5lite.data.tasks import add_mixture, add_task


def _corpus(split: str):
  return [{'text': d, 'doc': i} for i, d in enumerate(embedded.corpus_documents())
          if in_split(i, split)]


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


add_task('embedded_span_corruption', embedded_source(), [
    EmbeddedTokens(),
    P.ConcatAndSplit(P.span_corruption_raw_length),
    functools.partial(P.span_corruption_step, noise_density=0.15, mean_noise_span_length=3.0),
], embedded_features())

add_task('embedded_prefix_lm', embedded_source(), [
    EmbeddedTokens(),
    P.ConcatAndSplit(P.prefix_lm_raw_length),
    P.prefix_lm,
], embedded_features())

add_task('embedded_causal_lm', embedded_source(), [
    EmbeddedTokens(),
    P.ConcatAndSplit(P.causal_lm_raw_length),
    P.causal_lm,
], embedded_features(inputs=False))

add_task('embedded_ul2', embedded_source(), [
    EmbeddedTokens(),
    P.ConcatAndSplit(P.ul2_raw_length),
    P.ul2_denoise,
], embedded_features())

# --- C4 (TFDS c4/en, array_record: prepare it once with TFDS, or point TFDS_DATA_DIR at a copy),
# in T5's vocabulary (common.T5_SPM_PATH).
C4_TFDS_NAME = 'c4/en:3.1.0'


def _c4_steps(length_fn, objective):
  # Per document, lazily: text -> tokens -> a random chunk of the raw length -> the objective.
  return [
      functools.partial(P.rekey, key_map={'targets': 'text'}), P.tokenize,
      P.RandomChunk(length_fn), objective
  ]


add_task(
    'c4_span_corruption', TfdsSource(C4_TFDS_NAME, splits=('train', 'validation')),
    _c4_steps(
        P.span_corruption_raw_length,
        functools.partial(P.span_corruption_step, noise_density=0.15, mean_noise_span_length=3.0)),
    t5_features())

add_task('c4_ul2', TfdsSource(C4_TFDS_NAME, splits=('train', 'validation')),
         _c4_steps(P.ul2_raw_length, P.ul2_denoise), t5_features())

add_mixture('embedded_pretraining_mix', [('embedded_span_corruption', 1.0),
                                         ('embedded_prefix_lm', 1.0), ('embedded_ul2', 1.0)])
