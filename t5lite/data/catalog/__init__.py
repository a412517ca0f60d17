"""The built-in tasks and mixtures: importing this package registers them all.

The registry (t5lite.data.tasks) never imports its catalog, as seqio's does not: the jobs, the
data tools and the tests import `t5lite.data.catalog` (a user's own task module is imported the
same way). Its modules:

  pretraining  embedded_span_corruption, embedded_prefix_lm, embedded_causal_lm, embedded_ul2,
               embedded_pretraining_mix over the embedded offline corpus; c4_span_corruption,
               c4_ul2 over TFDS c4/en
  downstream   docstring_kind, docstring_module, fill_word, downstream_mix: offline fine-tuning
               tasks over the embedded corpus, with postprocessing and metrics
  public       squad_v010_allanswers, cnn_dailymail_v002, wmt14_ende_v003, wmt14_enfr_v003,
               wmt16_enro_v003 over TFDS
  glue         glue_<config>_v002, super_glue_<config>_v102, glue_v002_proportional,
               super_glue_v102_proportional over TFDS (docs/evaluation.md lists them all)
  common       what they share: the embedded corpus's held-out split (VALIDATION_EVERY), T5's
               vocabulary (T5_SPM_PATH), TFDS record and label helpers

Each module imports only common.py and the layers below (tasks, sources, preprocessors, vocab,
metrics), never another task module, so any of them may be imported first.
"""
from t5lite.data.catalog import common, pretraining, downstream, public, glue  # noqa: F401
from t5lite.data.catalog.common import T5_SPM_PATH, VALIDATION_EVERY
from t5lite.data.tasks import get, names

__all__ = [
    'T5_SPM_PATH', 'VALIDATION_EVERY', 'common', 'downstream', 'get', 'glue', 'names',
    'pretraining', 'public'
]
