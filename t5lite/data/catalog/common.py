"""What the catalog's task modules share: the held-out split of the embedded corpus, the two
vocabularies tasks declare (the embedded one and T5's), and helpers for TFDS records and for the
labels and numbers of classification and regression tasks (GLUE, SuperGLUE)."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from t5lite.data.tasks import Feature
from t5lite.data.vocab import SentencePieceVocabulary, embedded_vocabulary

# --- the embedded corpus -------------------------------------------------------------------------

# Every 20th document (~3% of the text, ~8k tokens) is held out as the 'validation' split, for
# the validation loss of in-training evaluation. The SentencePiece model is trained on all of it.
VALIDATION_EVERY = 20


def held_out(index: int, every: int = VALIDATION_EVERY) -> bool:
  """Whether document `index` is in the validation split when every `every`-th one is."""
  return index % every == every - 1


def in_split(index: int, split: str) -> bool:
  """Whether embedded document `index` belongs to `split` ('validation' or 'train')."""
  return held_out(index) if split == 'validation' else not held_out(index)


def embedded_features(inputs: bool = True) -> dict[str, Feature]:
  """targets (and inputs) in the embedded vocabulary, trained on first use."""
  f = Feature(embedded_vocabulary)
  return {'inputs': f, 'targets': f} if inputs else {'targets': f}


# --- T5's vocabulary -----------------------------------------------------------------------------

# 32000 SentencePiece pieces + 100 sentinels (model.vocab_size 32128). Loaded on first use only,
# so registering needs no network; train with --config.data.vocabulary=task.
T5_SPM_PATH = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'


def t5_features() -> dict[str, Feature]:
  """inputs/targets in T5's vocabulary (32000 pieces + 100 sentinels), loaded lazily."""
  f = Feature(functools.partial(SentencePieceVocabulary, T5_SPM_PATH))
  return {'inputs': f, 'targets': f}


# --- TFDS records, labels and numbers ------------------------------------------------------------

UNKNOWN_LABEL = '<unk>'  # T5's target for an unlabelled (test) example


def text(value: Any) -> str:
  """A TFDS text value as str. TfdsSource decodes top-level text features only; nested ones (a
  Sequence of Text, a dict of them) come back as bytes."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode('utf-8')
  return str(value)


def texts(values: Any) -> list[str]:
  return [text(v) for v in (values if values is not None else [])]


def string_label_to_class_id(label: str, example=None, is_target: bool = False,
                             label_classes: Sequence[str] = ()) -> int:
  """Postprocess for classification (T5's `string_label_to_class_id`): the label's index in
  `label_classes`, -1 for anything else (the metrics count -1 as wrong)."""
  del example, is_target
  label = label.strip()
  return label_classes.index(label) if label in label_classes else -1


def string_to_float(value: str, example=None, is_target: bool = False,
                    default: float = -1.0) -> float:
  """Postprocess for STS-B (T5's `string_to_float`): the number, `default` if it is none."""
  del example, is_target
  try:
    return float(value)
  except ValueError:
    return default
