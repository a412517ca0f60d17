"""t5lite vocabularies and HuggingFace tokenizers: the files t5lite-to-hf writes, and the identity
that hf-to-t5lite records and a fine-tune is checked against (docs/hf.md, "Tokenizers").

Reading a HF tokenizer directory (data.vocabulary='hf:DIR') is `vocab.load_hf_tokenizer`.
`write_tokenizer` writes the files `transformers.AutoTokenizer.from_pretrained` reads so that it
encodes text to the same ids as the t5lite vocabulary (tests/test_hf_vocab.py checks it on 300+
strings). `record` and `mismatch` identify a vocabulary (kind, size, sha256 of its model file);
`model_tokenizer` finds a checkpoint's, and `init_mismatch` says why a fine-tune (init_from) on
another vocabulary than the model's would train on the wrong tokens (t5lite/config_rules.py).
"""
from __future__ import annotations

import hashlib
import json

from t5lite import files
from t5lite.data import vocab

SPIECE, TOKENIZER_JSON = vocab.HF_SPIECE, vocab.HF_TOKENIZER_JSON
TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = vocab.HF_TOKENIZER_CONFIG, 'special_tokens_map.json'
TOKENIZER_FILES = (SPIECE, TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)

# ---------------------------------------------------------------------------------------------
# Identity: what a vocabulary is, recorded with converted checkpoints and compared at fine-tune.


def record(vocabulary, spec: str) -> dict:
  """{'vocabulary': spec, 'kind', 'vocab_size', 'extra_ids', 'sha256'} of a t5lite vocabulary;
  sha256 is of its model file (None for bytes, which need none)."""
  kind, digest = type(vocabulary).__name__, None  # a task's own class: compared by size
  if isinstance(vocabulary, vocab.ByteVocabulary):
    kind = 'byte'
  elif isinstance(vocabulary, (vocab.SentencePieceVocabulary, vocab.TokenizersVocabulary)):
    kind = 'tokenizers' if isinstance(vocabulary, vocab.TokenizersVocabulary) else 'sentencepiece'
    digest = hashlib.sha256(files.read_bytes(vocabulary.path)).hexdigest()
  return {
      'vocabulary': spec, 'kind': kind, 'vocab_size': vocabulary.vocab_size,
      'extra_ids': getattr(vocabulary, 'extra_ids', None), 'sha256': digest
  }


def record_of_spec(spec: str, sp_vocab_size: int = vocab.DEFAULT_SP_VOCAB_SIZE) -> dict | None:
  """`record` of the vocabulary a data.vocabulary value names; None for 'task' (no one vocabulary).
  FileNotFoundError (naming `spec`) when it cannot be read."""
  v = vocab.get_vocabulary(spec, sp_vocab_size)
  return None if v is None else record(v, spec)


def describe(rec: dict) -> str:
  digest = f', sha256 {rec["sha256"][:12]}' if rec.get('sha256') else ''
  return f'{rec["vocabulary"]} ({rec["kind"]}, {rec["vocab_size"]} ids{digest})'


def mismatch(data: dict, model: dict) -> bool:
  """Whether two records name different vocabularies: size, kind or file hash (where known). A
  kind t5lite does not know (a task's own vocabulary class) is compared by size alone."""
  known = {'byte', 'sentencepiece', 'tokenizers'}
  if data['kind'] not in known or model['kind'] not in known:
    return data['vocab_size'] != model['vocab_size']
  if (data['vocab_size'], data['kind'], data['extra_ids']) != (model['vocab_size'], model['kind'],
                                                               model['extra_ids']):
    return True
  return bool(data.get('sha256') and model.get('sha256') and data['sha256'] != model['sha256'])


# ---------------------------------------------------------------------------------------------
# Writing: t5lite-to-hf puts these beside the model.


def _sentinels(n: int) -> list[str]:
  return [f'<extra_id_{i}>' for i in range(n)]


def _added_token(content: str) -> dict:
  return {
      'content': content, 'lstrip': False, 'rstrip': False, 'normalized': False,
      'single_word': False, 'special': True
  }


def write_tokenizer(vocabulary, out_dir: str, model_max_length: int = 512) -> list[str]:
  """Writes the tokenizer files of `vocabulary` into `out_dir` (local or a URL); returns their
  names. SentencePiece -> spiece.model + T5Tokenizer config; bytes -> ByT5Tokenizer config;
  tokenizer.json -> itself + a T5 config."""
  special = {**vocab.HF_SPECIAL, 'additional_special_tokens': _sentinels(vocabulary.extra_ids)}
  config = {**special, 'extra_ids': vocabulary.extra_ids, 'model_max_length': model_max_length}
  written = {}
  if isinstance(vocabulary, vocab.ByteVocabulary):
    # transformers' ByT5Tokenizer numbers its own extra ids upwards from 259; ByT5 (seqio's
    # ByteVocabulary) counts them down from the top, so every id is pinned here.
    added = {str(vocab.PAD_ID): '<pad>', str(vocab.EOS_ID): '</s>', str(vocab.UNK_ID): '<unk>'}
    added.update({
        str(vocabulary.sentinel_id(i)): t
        for i, t in enumerate(special['additional_special_tokens'])
    })
    config.update(tokenizer_class='ByT5Tokenizer', extra_ids=0,
                  added_tokens_decoder={k: _added_token(v) for k, v in added.items()})
  elif isinstance(vocabulary, vocab.TokenizersVocabulary):
    written[TOKENIZER_JSON] = files.read_bytes(vocabulary.path)
    config.update(tokenizer_class='T5Tokenizer')
  else:
    written[SPIECE] = files.read_bytes(vocabulary.path)
    config.update(tokenizer_class='T5Tokenizer')
    if vocabulary.sentinels_in_model:  # mT5's layout, written as Google's mT5 configs say it
      special['additional_special_tokens'] = []
      config.update(extra_ids=0, additional_special_tokens=[])
  written[TOKENIZER_CONFIG] = json.dumps(config, indent=2).encode()
  written[SPECIAL_TOKENS_MAP] = json.dumps(special, indent=2).encode()
  for name, data in written.items():
    files.write_bytes(files.join(out_dir, name), data)
  return sorted(written)


# ---------------------------------------------------------------------------------------------
# The model's tokenizer, for checkpoint.init_from (t5lite/config_rules.py checks it).


def read_saved_config(step_dir: str) -> dict:
  """The config a t5lite checkpoint step saved (its orbax `config` item, a JSON file); {} if none."""
  path = files.join(step_dir, 'config', 'metadata')
  if not files.to_path(path).is_file():
    return {}
  return json.loads(files.read_text(path))


def model_tokenizer(saved: dict) -> tuple[dict | None, str]:
  """(record of the model's vocabulary or None when unknown, where it comes from) from a step's
  saved config: a conversion's recorded tokenizer, or the vocabulary a t5lite run trained on."""
  converted = saved.get('converted_from')
  if isinstance(converted, dict):
    return converted.get('tokenizer'), 'recorded at conversion'
  data = saved.get('data')
  if isinstance(data, dict) and data.get('vocabulary'):
    spec = data['vocabulary']
    try:
      rec = record_of_spec(spec, int(data.get('sp_vocab_size', vocab.DEFAULT_SP_VOCAB_SIZE)))
    except FileNotFoundError:
      rec = None  # a vocabulary file since moved: the size check below still runs
    return rec, f'its training run\'s data.vocabulary={spec!r}'
  return None, 'none recorded'


def init_mismatch(data: dict | None, model: dict | None, model_vocab_size: int,
                  init_from: str) -> str | None:
  """Why fine-tuning `init_from` (a model whose vocabulary `model` records, or None when unknown;
  embedding rows `model_vocab_size`) on the vocabulary `data` would train on the wrong tokens, or
  None when it would not. Unknown on either side: only the sizes are compared (T5 pads the
  embedding to a multiple of 128 rows, so a vocabulary 128 or more ids smaller is another one)."""
  if data is None:
    return None
  if model is not None:
    if not mismatch(data, model):
      return None
    return (f'config.data.vocabulary: {describe(data)}, but the model of '
            f'checkpoint.init_from={init_from} was trained with {describe(model)}; set '
            f'--config.data.vocabulary={model["vocabulary"]}')
  if model_vocab_size - 128 < data['vocab_size'] <= model_vocab_size:
    return None
  return (f'config.data.vocabulary: {describe(data)}, but the model of '
          f'checkpoint.init_from={init_from} has {model_vocab_size} embedding rows and no recorded '
          'tokenizer; set --config.data.vocabulary to the vocabulary it was trained with (hf:DIR '
          'for a HuggingFace tokenizer directory, or a SentencePiece .model path)')
