"""Vocabulary expansion: `checkpoint.init_from` into a model whose vocabulary extends the one the
checkpoint was trained with (checkpoint.init_new_rows; docs/adaptation.md).

The rows of tokens both vocabularies share are copied, matched by what they are, not by row
index: a SentencePiece piece by its text, a byte by its value, pad / eos / unk by their fixed ids,
and sentinel `<extra_id_k>` by k. T5's sentinels sit at the top of the vocabulary and count down
(t5lite/data/vocab.py: `<extra_id_0>` is vocab_size - 1), so a vocabulary with more pieces moves
every sentinel up; copying by index would hand the old sentinels' rows to the new pieces. Rows
past an old vocabulary's last id (T5's padding to a multiple of 128) are no token and are not
carried. Every other row of the new model is new and starts as:
  'mean': the mean of the old vocabulary's rows (Hewitt 2021, "Initializing new word embeddings
    for pretrained language models");
  'mean_noise:STD': that mean plus N(0, STD^2) noise per value (seeded by train.seed);
  'pieces': the mean of the old rows of the pieces the old vocabulary splits the new piece's text
    into ('\u2581' read as a space; SentencePiece splits any text as from a word start), a byte's
    the old row of that byte; a row with no text (a new sentinel, a padding row) takes the
    'mean'.
The token embedding (rows) and the untied output layer `logits_dense/kernel` (columns) both grow
this way, so at step 0 the logits of old tokens over old tokens are the old model's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import sentencepiece as spm

from t5lite import files
from t5lite.fields import ConfigError
from t5lite.data import vocab as vocab_lib

# t5lite param name -> its vocabulary axis (t5lite/models/t5.py _make_embedder_and_head).
VOCAB_AXIS = {'token_embedder/embedding': 0, 'logits_dense/kernel': 1}
KINDS = ('mean', 'mean_noise:STD', 'pieces')
T5X_PREFIX = 't5x:'  # as checkpoints.T5X_PREFIX (a layer up: not imported)


class VocabExpansionError(ValueError):
  """The checkpoint's vocabulary cannot be carried onto the new one."""


def parse_new_rows(spec: str) -> tuple[str, float]:
  """('mean' | 'pieces', noise std) of a checkpoint.init_new_rows value; ValueError if bad."""
  if spec in ('mean', 'pieces'):
    return spec, 0.0
  if spec.startswith('mean_noise:'):
    try:
      std = float(spec[len('mean_noise:'):])
    except ValueError:
      std = -1.0
    if std > 0:
      return 'mean', std
  raise ValueError(f'checkpoint.init_new_rows={spec!r}: expected one of {", ".join(KINDS)} '
                   "(STD a positive number, e.g. 'mean_noise:0.02'), or '' for no expansion")


@dataclasses.dataclass(frozen=True)
class Expansion:
  """What train.py knows: the run's vocabulary, checkpoint.init_new_rows, the old vocabulary's
  data.vocabulary spec ('' = the one the checkpoint recorded) and the noise seed."""
  new_vocabulary: Any
  new_rows: str
  old_vocabulary: str = ''
  seed: int = 0


def _pieces(vocabulary) -> list:
  """A key per ordinary id (below the sentinels) that names the token whatever its id."""
  if isinstance(vocabulary, vocab_lib.ByteVocabulary):
    return ['<pad>', '</s>', '<unk>'] + [bytes([b]) for b in range(256)]
  if isinstance(vocabulary, vocab_lib.SentencePieceVocabulary):
    sp = spm.SentencePieceProcessor(model_proto=files.read_bytes(vocabulary.path))
    return [sp.id_to_piece(i) for i in range(vocabulary.sp_vocab_size)]
  raise VocabExpansionError(
      f'vocabulary expansion reads SentencePiece and byte vocabularies, not {vocabulary!r}')


def old_vocabulary(step_dir: str, spec: str):
  """The vocabulary the checkpoint at `step_dir` was trained with: `spec` (a data.vocabulary
  value) when given, else the one its run recorded (a t5lite checkpoint's saved data.vocabulary,
  an hf:DIR's tokenizer)."""
  from t5lite.data import hf_vocab  # pylint: disable=import-outside-toplevel
  where = 'checkpoint.init_vocabulary'
  if not spec and step_dir.startswith(vocab_lib.HF_PREFIX):
    directory = step_dir[len(vocab_lib.HF_PREFIX):]
    if vocab_lib.has_hf_tokenizer(directory):
      return vocab_lib.load_hf_tokenizer(directory)
  elif not spec and not step_dir.startswith(T5X_PREFIX):
    data = hf_vocab.read_saved_config(step_dir).get('data') or {}
    spec, where = data.get('vocabulary', ''), f'the data.vocabulary {step_dir} recorded'
    sp_size = int(data.get('sp_vocab_size', vocab_lib.DEFAULT_SP_VOCAB_SIZE))
    if spec and spec != 'task':
      return vocab_lib.get_vocabulary(spec, sp_size)
  if not spec or spec == 'task':
    raise VocabExpansionError(
        f'checkpoint.init_new_rows: the vocabulary {step_dir} was trained with is not recorded; '
        'name it with checkpoint.init_vocabulary (a SentencePiece .model path, hf:DIR, byte or '
        'embedded)')
  try:
    return vocab_lib.get_vocabulary(spec)
  except FileNotFoundError as e:
    raise VocabExpansionError(f'{where}: {e}') from None


def id_map(old, new, old_rows: int, new_rows: int) -> np.ndarray:
  """[old.vocab_size] new id of each old id: pieces by their text, sentinel k to sentinel k.
  VocabExpansionError when the new vocabulary lacks an old token or either model is too small
  for its vocabulary."""
  for v, rows, which in ((old, old_rows, 'checkpoint'), (new, new_rows, 'new model')):
    if v.vocab_size > rows:
      raise VocabExpansionError(f'the {which} has {rows} vocabulary rows, fewer than the '
                                f'{v.vocab_size} ids of {v!r}')
  old_pieces, new_pieces = _pieces(old), _pieces(new)
  new_ids = {p: i for i, p in enumerate(new_pieces)}
  lost = [p for p in old_pieces if p not in new_ids]
  if lost or new.extra_ids < old.extra_ids:
    raise VocabExpansionError(
        f'the new vocabulary {new!r} does not extend the old one {old!r}: '
        f'{len(lost)} of its pieces are missing (e.g. {lost[:5]}), and it has {new.extra_ids} '
        f'sentinels for the old {old.extra_ids}; vocabulary expansion only adds tokens')
  mapping = [new_ids[p] for p in old_pieces]
  mapping += [
      new.sentinel_id(old.vocab_size - 1 - i) for i in range(old.sp_vocab_size, old.vocab_size)
  ]
  return np.asarray(mapping, np.int64)


def new_rows_table(old_table: np.ndarray, old, new, mapping: np.ndarray, new_rows: int, rule: str,
                   seed: int = 0) -> np.ndarray:
  """[new_rows, ...] from the [old rows, ...] `old_table` (vocabulary on axis 0): copied rows where
  `mapping` sends them, the rule's rows (module doc) everywhere else."""
  kind, std = parse_new_rows(rule)
  table = old_table.astype(np.float32)
  known = table[:old.vocab_size]
  mean = known.mean(axis=0)
  out = np.broadcast_to(mean, (new_rows,) + mean.shape).copy()
  fresh = np.ones(new_rows, bool)
  fresh[mapping] = False
  if kind == 'pieces':
    new_pieces = _pieces(new)
    for j in np.flatnonzero(fresh[:len(new_pieces)]):
      piece = new_pieces[j]
      text = (piece.decode('utf-8', 'replace') if isinstance(piece, bytes) else piece.replace(
          '\u2581', ' '))
      ids = [i for i in old.encode(text) if i < old.vocab_size]
      if ids:
        out[j] = known[ids].mean(axis=0)
  if std:
    noise = np.random.default_rng(seed).normal(0.0, std, out.shape).astype(np.float32)
    out[fresh] += noise[fresh]
  out[mapping] = known
  return out


def expand_params(flat: dict[str, np.ndarray], old, new, new_rows: int, rule: str,
                  seed: int = 0) -> dict[str, np.ndarray]:
  """`flat` ({t5lite param name: array}) with the vocabulary params grown to `new_rows` ids (the
  others as they are), in their dtypes."""
  present = [n for n in VOCAB_AXIS if n in flat]
  if not present:
    raise VocabExpansionError('checkpoint.init_new_rows: the checkpoint has no '
                              f'{" or ".join(VOCAB_AXIS)} to expand')
  old_rows = flat[present[0]].shape[VOCAB_AXIS[present[0]]]
  mapping = id_map(old, new, old_rows, new_rows)
  out = dict(flat)
  for i, name in enumerate(present):
    axis = VOCAB_AXIS[name]
    x = np.moveaxis(np.asarray(flat[name]), axis, 0)
    grown = new_rows_table(x, old, new, mapping, new_rows, rule, seed + i)
    out[name] = np.moveaxis(grown, 0, axis).astype(np.asarray(flat[name]).dtype)
  return out


def of_config(cfg, vocabulary) -> Expansion | None:
  """The Expansion a resolved config asks for (checkpoint.init_new_rows), or None when off.
  `vocabulary`: the run's (train.build_data's)."""
  k = cfg.checkpoint
  if not k.init_new_rows or not k.init_from:
    return None
  if vocabulary is None:
    raise ConfigError("config.checkpoint.init_new_rows needs one data.vocabulary (not 'task'): "
                      'the new rows are laid out by it')
  return Expansion(vocabulary, k.init_new_rows, k.init_vocabulary, int(cfg.train.seed))
