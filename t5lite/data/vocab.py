"""SentencePiece vocabulary with T5's id conventions, and an offline default.

Ids (as in T5/seqio): pad 0, eos 1, unk 2, no bos. `extra_ids` sentinel ids sit
above the SentencePiece pieces and count down from the top of the vocabulary:
`<extra_id_0>` is `vocab_size - 1`, `<extra_id_1>` is `vocab_size - 2`, ...

`load_hf_tokenizer(DIR)` (data.vocabulary='hf:DIR') reads a HuggingFace tokenizer directory:
its spiece.model through sentencepiece (what T5Tokenizer wraps, and what seqio read when T5 was
trained), a ByT5Tokenizer config as ByteVocabulary, or else its tokenizer.json through `tokenizers`
when that follows T5's id layout. t5lite/data/hf_vocab.py writes vocabularies the other way.

`embedded_vocabulary()` trains a small unigram model on the embedded stdlib
corpus on first use and caches it on disk, so the quickstart runs with no
network and no pre-built asset.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tempfile
from typing import Iterable, Sequence

import sentencepiece as spm

from t5lite import files
from t5lite.data import embedded

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
DEFAULT_EXTRA_IDS = 100
# 1948 pieces + 100 sentinels = 2048: a multiple of 128, friendly to TPU/GPU tiles.
DEFAULT_SP_VOCAB_SIZE = 1948
# A sentinel written as text, as HuggingFace's T5 tokenizer reads it: '<extra_id_N>'.
SENTINEL_TEXT = re.compile(r'<extra_id_(\d+)>')


def _read_bytes(path: str) -> bytes:
  """A local file or a URL (gs://..., with t5lite[gcp]): SentencePiece loads the model from
  these bytes, so it never needs a local copy."""
  return files.read_bytes(path)


class _T5Ids:
  """What every t5lite vocabulary shares: pad 0, eos 1, unk 2, and `extra_ids` sentinels
    above the `sp_vocab_size` ordinary ids, counting down from the top."""

  pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID
  _extra_ids: int

  @property
  def sp_vocab_size(self) -> int:
    raise NotImplementedError

  @property
  def extra_ids(self) -> int:
    return self._extra_ids

  @property
  def vocab_size(self) -> int:
    return self.sp_vocab_size + self._extra_ids

  def sentinel_id(self, i: int) -> int:
    """Id of `<extra_id_i>`; sentinels count down from the top."""
    if not 0 <= i < self._extra_ids:
      raise ValueError(f'sentinel index {i} out of range [0, {self._extra_ids}).')
    return self.vocab_size - 1 - i


class SentencePieceVocabulary(_T5Ids):
  """A SentencePiece model plus `extra_ids` sentinel ids on top of it. With extra_ids=0, the
  model's own top pieces named `<extra_id_N>` (or `\u2581<extra_id_N>`) at id size - 1 - N are
  its sentinels: mT5's model (mc4.250000.100extra, HF extra_ids=0) holds its 100 that way."""

  def __init__(self, path: str, extra_ids: int = DEFAULT_EXTRA_IDS):
    self._path = str(path)
    self._sp = spm.SentencePieceProcessor(model_proto=_read_bytes(self._path))
    self._inside = 0 if int(extra_ids) else self._sentinel_pieces()
    self._extra_ids = int(extra_ids) or self._inside
    # Our id conventions are baked into the model at training time; a model
    # trained otherwise would silently shift every id, so fail loudly.
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if got != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(f'{self._path}: SentencePiece model has (pad, eos, unk) ids {got}; '
                       f't5lite needs {(PAD_ID, EOS_ID, UNK_ID)}.')

  def _sentinel_pieces(self) -> int:
    """How many of the top pieces are `<extra_id_N>`, N counting up from the top."""
    size, n = self._sp.get_piece_size(), 0
    while n < size and self._sp.id_to_piece(size - 1 - n).lstrip('\u2581') == f'<extra_id_{n}>':
      n += 1
    return n

  def __repr__(self) -> str:
    return (f'SentencePieceVocabulary({self._path!r}, '
            f'extra_ids={self._extra_ids - self._inside}, vocab_size={self.vocab_size})')

  @property
  def sentinels_in_model(self) -> int:
    """How many sentinels are pieces of the model itself (mT5's layout; 0 for T5's)."""
    return self._inside

  @property
  def path(self) -> str:
    return self._path

  @property
  def sp_vocab_size(self) -> int:
    """Number of SentencePiece pieces below the sentinels."""
    return self._sp.get_piece_size() - self._inside

  def encode(self, text: str) -> list[int]:
    """Text -> ids. No EOS is appended (preprocessors add it, as in seqio)."""
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text: skips pad, stops at the first EOS, shows sentinels.

        Sentinel ids render as `<extra_id_N>` so span-corrupted examples can be
        read; any other id at or above the piece count decodes as unk.
        """
    pieces: list[str] = []
    run: list[int] = []  # consecutive ordinary ids, decoded together

    def flush():
      if run:
        text = self._sp.decode(run)
        # SentencePiece drops the word-boundary space at the start of
        # what it decodes; after a sentinel that space is real text.
        if pieces and self._sp.id_to_piece(run[0]).startswith('\u2581'):
          text = ' ' + text
        pieces.append(text)
        run.clear()

    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i == PAD_ID:
        continue
      if i >= self.sp_vocab_size:
        flush()
        if i < self.vocab_size:
          pieces.append(f'<extra_id_{self.vocab_size - 1 - i}>')
        else:
          pieces.append(self._sp.id_to_piece(UNK_ID))
        continue
      run.append(i)
    flush()
    return ''.join(pieces)


class ByteVocabulary(_T5Ids):
  """ByT5's vocabulary (Xue et al. 2022): pad 0, eos 1, unk 2, then the 256 UTF-8 byte values
    at ids 3..258, then `extra_ids` sentinels counting down from the top. ByT5 uses 125 extra ids,
    so 384 ids in all. No model file: `path` is a fixed name so caches keyed on it work.
    """

  OFFSET = 3  # pad, eos, unk come first

  def __init__(self, extra_ids: int = 125):
    self._extra_ids = int(extra_ids)

  def __repr__(self) -> str:
    return f'ByteVocabulary(extra_ids={self._extra_ids}, vocab_size={self.vocab_size})'

  @property
  def path(self) -> str:
    return 'byte'

  @property
  def sp_vocab_size(self) -> int:
    """Ids below the sentinels (named as for SentencePiece, so code can treat both alike)."""
    return self.OFFSET + 256

  def encode(self, text: str) -> list[int]:
    return [b + self.OFFSET for b in text.encode('utf-8')]

  def decode(self, ids: Iterable[int]) -> str:
    """Skips pad, stops at EOS, shows sentinels as <extra_id_N>; bytes that do not form valid
        UTF-8 (a cut-off character) are dropped, as ByT5 does."""
    pieces: list[str] = []
    run = bytearray()
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if self.OFFSET <= i < self.sp_vocab_size:
        run.append(i - self.OFFSET)
        continue
      pieces.append(run.decode('utf-8', errors='ignore'))
      run.clear()
      if self.sp_vocab_size <= i < self.vocab_size:
        pieces.append(f'<extra_id_{self.vocab_size - 1 - i}>')
      elif i != PAD_ID:
        pieces.append('\N{REPLACEMENT CHARACTER}')  # unk or out of range
    pieces.append(run.decode('utf-8', errors='ignore'))
    return ''.join(pieces)


# HuggingFace tokenizer directories (data.vocabulary='hf:DIR'): the files read, and T5's special
# tokens as T5Tokenizer names them, at t5lite's ids 0, 1, 2.
HF_PREFIX = 'hf:'
HF_SPIECE = 'spiece.model'
HF_TOKENIZER_JSON = 'tokenizer.json'
HF_TOKENIZER_CONFIG = 'tokenizer_config.json'
HF_SPECIAL = {'pad_token': '<pad>', 'eos_token': '</s>', 'unk_token': '<unk>'}


def _exists(directory: str, name: str) -> bool:
  return files.to_path(directory).joinpath(name).is_file()


def _tokenizer_config(directory: str) -> dict:
  if not _exists(directory, HF_TOKENIZER_CONFIG):
    return {}
  path = files.join(directory, HF_TOKENIZER_CONFIG)
  try:
    return json.loads(files.read_text(path))
  except ValueError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None


def has_hf_tokenizer(directory: str) -> bool:
  """Whether `directory` holds tokenizer files `load_hf_tokenizer` can read."""
  return (_exists(directory, HF_SPIECE) or _exists(directory, HF_TOKENIZER_JSON)
          or _tokenizer_config(directory).get('tokenizer_class') == 'ByT5Tokenizer')


def _extra_ids(config: dict, default: int) -> int:
  """tokenizer_config.json's `extra_ids` when positive, else the number of `<extra_id_N>` special
  tokens it lists, else 0 if it says `extra_ids: 0` (mT5: the sentinels are spiece.model pieces),
  else `default`."""
  if int(config.get('extra_ids') or 0) > 0:
    return int(config['extra_ids'])
  names = list(config.get('additional_special_tokens') or [])
  names += [t.get('content', '') for t in (config.get('added_tokens_decoder') or {}).values()]
  found = {int(m.group(1)) for m in map(SENTINEL_TEXT.fullmatch, names) if m}
  return len(found) or (0 if 'extra_ids' in config else default)


def _unreachable_specials(text: str) -> str:
  """tokenizer.json with its special pieces (pad, eos, unk, sentinels) scored out of reach of a
  Unigram model's search. transformers' T5 conversion keeps them in the piece table with score 0,
  so encoding '</s>' as text would give EOS; SentencePiece never matches such control pieces."""
  config = json.loads(text)
  model = config.get('model') or {}
  if model.get('type') != 'Unigram':
    return text
  special = {t['content'] for t in config.get('added_tokens') or () if t.get('special')}
  for piece in model.get('vocab') or ():
    if piece[0] in special:
      piece[1] = -1e9
  return json.dumps(config)


class TokenizersVocabulary(_T5Ids):
  """A `tokenizers` tokenizer.json with T5's id layout (pad 0, eos 1, unk 2, `<extra_id_N>` at
  vocab_size - 1 - N), as a t5lite vocabulary; any other layout is refused by name."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=import-outside-toplevel  (the optional [hf] extra)
    self._path = path
    self._tok = tokenizers.Tokenizer.from_str(_unreachable_specials(files.read_text(path)))
    # Special-token text ('</s>', '<extra_id_0>') is encoded as text, as SentencePiece does;
    # encode_with_sentinels reads '<extra_id_N>' itself.
    self._tok.encode_special_tokens = True
    size = self._tok.get_vocab_size(with_added_tokens=True)
    sentinels = {}
    for token, i in self._tok.get_vocab(with_added_tokens=True).items():
      match = SENTINEL_TEXT.fullmatch(token)
      if match:
        sentinels[int(match.group(1))] = i
    self._extra_ids = len(sentinels)
    specials = [self._tok.token_to_id(t) for t in HF_SPECIAL.values()]
    wrong = [
        f'{t}={i}' for t, i in zip(HF_SPECIAL.values(), specials)
        if i != {'<pad>': PAD_ID, '</s>': EOS_ID, '<unk>': UNK_ID}[t]
    ]
    wrong += [f'<extra_id_{n}>={i}' for n, i in sorted(sentinels.items()) if i != size - 1 - n]
    if wrong:
      raise ValueError(f'{path}: not T5\'s id layout (pad 0, eos 1, unk 2, <extra_id_N> = '
                       f'vocabulary size {size} - 1 - N): {", ".join(wrong[:4])}')
    self._size = size

  def __reduce__(self):
    # tokenizers' own pickling drops encode_special_tokens: workers rebuild from the file.
    return TokenizersVocabulary, (self._path,)

  def __repr__(self) -> str:
    return f'TokenizersVocabulary({self._path!r}, vocab_size={self.vocab_size})'

  @property
  def path(self) -> str:
    return self._path

  @property
  def sp_vocab_size(self) -> int:
    return self._size - self._extra_ids

  def encode(self, text: str) -> list[int]:
    """Text -> ids, no EOS (the tokenizer's post-processor, which appends it, is not run)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Skips pad, stops at the first EOS, shows sentinels as <extra_id_N>."""
    kept = []
    for i in map(int, ids):
      if i == EOS_ID:
        break
      if i != PAD_ID:
        kept.append(i if i < self._size else UNK_ID)
    return self._tok.decode(kept, skip_special_tokens=False)


def load_hf_tokenizer(directory: str):
  """The t5lite vocabulary of the HF tokenizer in `directory`; it reads spiece.model, else a
  ByT5Tokenizer config, else tokenizer.json (docs/hf.md, "Tokenizers")."""
  if not files.to_path(directory).is_dir():
    raise FileNotFoundError(f'{directory}: no such directory')
  config = _tokenizer_config(directory)
  if _exists(directory, HF_SPIECE):
    return SentencePieceVocabulary(files.join(directory, HF_SPIECE),
                                   _extra_ids(config, DEFAULT_EXTRA_IDS))
  if config.get('tokenizer_class') == 'ByT5Tokenizer':
    return ByteVocabulary(_extra_ids(config, 125))
  if _exists(directory, HF_TOKENIZER_JSON):
    return TokenizersVocabulary(files.join(directory, HF_TOKENIZER_JSON))
  raise FileNotFoundError(
      f'{directory}: no tokenizer there (want {HF_SPIECE}, {HF_TOKENIZER_JSON}, or '
      f'a {HF_TOKENIZER_CONFIG} naming ByT5Tokenizer)')


def encode_with_sentinels(vocabulary, text: str) -> list[int]:
  """Token ids of `text` with each `<extra_id_N>` written in it as sentinel N's id (as
    HuggingFace's T5 tokenizer reads them); vocabulary.encode alone would spell them out."""
  ids, start = [], 0
  for match in SENTINEL_TEXT.finditer(text):
    ids += vocabulary.encode(text[start:match.start()])
    ids.append(vocabulary.sentinel_id(int(match.group(1))))
    start = match.end()
  return ids + list(vocabulary.encode(text[start:]))


def _training_sentences(texts: Iterable[str], max_chars: int) -> Iterable[str]:
  """Cuts texts into word-aligned pieces SentencePiece will not skip.

    The trainer silently drops "sentences" longer than `max_sentence_length`
    bytes, and some reference pages are 60 kB long.
    """
  for text in texts:
    words = text.split()
    line: list[str] = []
    size = 0
    for w in words:
      if line and size + 1 + len(w) > max_chars:
        yield ' '.join(line)
        line, size = [], 0
      line.append(w)
      size += len(w) + (1 if size else 0)
    if line:
      yield ' '.join(line)


def train_sentencepiece(texts: Sequence[str], model_path: str, vocab_size: int) -> None:
  """Trains a unigram SentencePiece model with T5's special ids; writes it atomically.

    Deterministic: every sentence is used in the given order (no sampling, no
    shuffling) and the trainer runs on one thread, so the same texts give a
    byte-identical model. The model is written to a temporary file in the same
    directory and then `os.replace`d, so concurrent readers (e.g. pytest-xdist
    workers) see either no file or a complete one. A URL `model_path` (gs://...) is
    uploaded in one piece (all-or-nothing there).
    """
  model_path = os.fspath(model_path)
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_training_sentences(texts, max_chars=2000)),
      model_writer=proto,
      model_type='unigram',
      vocab_size=vocab_size,
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      bos_id=-1,
      input_sentence_size=0,  # 0 = use every sentence (no random sampling)
      shuffle_input_sentence=False,
      max_sentence_length=8192,  # bytes; our pieces are <= 2000 chars
      num_threads=1,
      minloglevel=2,  # training logs go to stderr; keep test output readable
  )
  if files.is_url(model_path):
    files.write_bytes(model_path, proto.getvalue())
    return
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.model')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(proto.getvalue())
    os.replace(tmp, model_path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def default_cache_dir() -> str:
  """`$T5LITE_CACHE` if set, else `~/.cache/t5lite`."""
  return os.environ.get('T5LITE_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 't5lite')


@functools.lru_cache(maxsize=1)
def _corpus_hash() -> str:
  h = hashlib.sha256()
  for doc in embedded.corpus_documents():
    h.update(doc.encode('utf-8'))
    h.update(b'\0')
  return h.hexdigest()[:12]


def embedded_vocabulary(sp_vocab_size: int = DEFAULT_SP_VOCAB_SIZE,
                        cache_dir: str | None = None) -> SentencePieceVocabulary:
  """The offline default vocabulary (1948 pieces + 100 sentinels = 2048 ids).

    Trained on `embedded.corpus_documents()` the first time and cached as
    `<cache_dir>/embedded_sp<size>_<corpus hash>.model`; the hash keeps models
    for different Python versions (different docstrings) apart.
    """
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, f'embedded_sp{sp_vocab_size}_{_corpus_hash()}.model')
  if not os.path.exists(path):
    train_sentencepiece(embedded.corpus_documents(), path, sp_vocab_size)
  return SentencePieceVocabulary(path, extra_ids=DEFAULT_EXTRA_IDS)


def get_vocabulary(spec: str = 'embedded', sp_vocab_size: int = DEFAULT_SP_VOCAB_SIZE):
  """The vocabulary `config.data.vocabulary` names, or None to keep the task's own:
    'embedded' -> the embedded SentencePiece model of `sp_vocab_size` pieces (+100 sentinels);
    'task' -> None (each output feature keeps the vocabulary its task declares);
    'byte' -> ByteVocabulary (ByT5); 'hf:DIR' -> the HuggingFace tokenizer in DIR
    (load_hf_tokenizer); anything else -> a SentencePiece model path (local, or gs:// etc.
    through etils.epath) with 100 sentinels."""
  if spec.startswith(HF_PREFIX):
    try:
      return load_hf_tokenizer(spec[len(HF_PREFIX):])
    except (OSError, ValueError, RuntimeError) as e:
      # FileNotFoundError whatever the cause: callers turn it into a one-line config error.
      raise FileNotFoundError(f'data.vocabulary={spec!r}: {e}') from None
  if spec == 'embedded':
    return embedded_vocabulary(sp_vocab_size)
  if spec == 'task':
    return None
  if spec == 'byte':
    return ByteVocabulary()
  try:
    return SentencePieceVocabulary(spec)
  except (OSError, RuntimeError) as e:
    raise FileNotFoundError(
        f'data.vocabulary={spec!r}: cannot read a SentencePiece model there ({e}); give a '
        'path to a .model file, hf:DIR (a HuggingFace tokenizer directory), or one of '
        "'embedded', 'task', 'byte'") from None
