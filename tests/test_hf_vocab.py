"""HuggingFace tokenizers (issue 17): data.vocabulary='hf:DIR', the tokenizer files t5lite-to-hf
writes (transformers' AutoTokenizer must give t5lite's ids), the tokenizer hf-to-t5lite records,
and the refusal of a fine-tune on another vocabulary than the model's. Offline: every tokenizer
and model is built here (SentencePiece trained in-test, tiny random HF T5 models)."""
import json
import os
import pickle
import random
import shutil

import pytest
import torch
import transformers

import t5lite.data.catalog  # noqa: F401  (registers the built-in tasks that validate names)
from t5lite import config as config_lib
from t5lite import config_files, convert, train
from t5lite.data import embedded, hf_vocab, vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every kind of text a tokenizer can disagree on: NFKC folds (ﬁ, full-width, ①), characters the
# small models lack (unk), whitespace runs and kinds, digits, and sentinels written as text.
ALPHABET = (list('abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?\'"-()[]{}/\\@#$%^&*_+=~`|') + [
    ' ', '  ', '\t', '\n', '   ', '\n\n', 'é', 'ü', 'ß', '日本', '語', 'ﬁ', '½', 'Ω', '😀', '\u00a0',
    '\u200b', 'Ａ', '①', 'ｶ', 'e\u0301', '<extra_id_0>', '<extra_id_17>', '<extra_id_99>',
    ' <extra_id_3> ', 'the ', 'of ', 'def ', 'return ', '123', '4.5'
])


def strings(n=300, seed=0):
  r = random.Random(seed)
  fixed = ['', ' ', 'Hello world', '  two  spaces  ', 'tab\there', 'line\nbreak', '3.14159 2026']
  return fixed + [''.join(r.choice(ALPHABET) for _ in range(r.randint(1, 30))) for _ in range(n)]


def t5lite_ids(vocabulary, text):
  """What t5lite trains on for `text` as a target: its ids, sentinels read, then EOS (as HF)."""
  return vocab.encode_with_sentinels(vocabulary, text) + [vocab.EOS_ID]


def assert_autotokenizer_matches(directory, vocabulary, extra_ids):
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  assert len(tok) == vocabulary.vocab_size
  for i in (0, extra_ids - 1):
    assert tok.convert_tokens_to_ids(f'<extra_id_{i}>') == vocabulary.sentinel_id(i)
  texts = strings()
  got = tok(texts)['input_ids']
  wrong = [(t, g, t5lite_ids(vocabulary, t)) for t, g in zip(texts, got)
           if g != t5lite_ids(vocabulary, t)]
  assert not wrong, f'{len(wrong)} of {len(texts)} differ, e.g. {wrong[0]}'


@pytest.fixture(scope='module')
def small_sp(tmp_path_factory):
  """A 284-piece SentencePiece model (+100 sentinels = 384 ids) trained here on other text than
  the embedded one, and a second one of the same size trained on yet other text."""
  folder = tmp_path_factory.mktemp('sp')
  docs = list(embedded.corpus_documents())
  paths = []
  for name, texts in (('a', docs[:40] + ['naïve café 日本語 ½ ﬁ'] * 3), ('b', docs[200:260])):
    vocab.train_sentencepiece(texts, str(folder / f'{name}.model'), 284)
    paths.append(str(folder / f'{name}.model'))
  return paths


def test_written_tokenizers_encode_like_t5lite(small_sp, tmp_path):
  """t5lite-to-hf's files: AutoTokenizer gives t5lite's ids on 300+ strings, for the embedded
  vocabulary, a SentencePiece model trained here, and ByT5's bytes (sentinels from the top)."""
  for name, vocabulary in (('embedded', vocab.embedded_vocabulary()),
                           ('small', vocab.SentencePieceVocabulary(small_sp[0])),
                           ('byte', vocab.ByteVocabulary())):
    out = str(tmp_path / name)
    written = hf_vocab.write_tokenizer(vocabulary, out)
    assert hf_vocab.TOKENIZER_CONFIG in written and hf_vocab.SPECIAL_TOKENS_MAP in written
    assert (hf_vocab.SPIECE in written) == (name != 'byte')
    assert_autotokenizer_matches(out, vocabulary, vocabulary.extra_ids)


def test_hf_dir_vocabulary_reads_spiece_tokenizer_json_and_byt5(small_sp, tmp_path):
  sp = vocab.SentencePieceVocabulary(small_sp[0])
  hf_vocab.write_tokenizer(sp, str(tmp_path / 'sp'))
  got = vocab.get_vocabulary(f'hf:{tmp_path / "sp"}')
  assert isinstance(got, vocab.SentencePieceVocabulary) and got.vocab_size == 384
  assert got.sentinel_id(0) == 383 and got.extra_ids == 100

  # A tokenizer.json alone (as transformers saves it): read through `tokenizers`, same ids.
  transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'sp')).save_pretrained(
      str(tmp_path / 'fast'))
  assert os.path.exists(tmp_path / 'fast' / 'tokenizer.json')
  if os.path.exists(tmp_path / 'fast' / 'spiece.model'):
    os.remove(tmp_path / 'fast' / 'spiece.model')
  fast = vocab.get_vocabulary(f'hf:{tmp_path / "fast"}')
  assert isinstance(fast, vocab.TokenizersVocabulary)
  assert (fast.vocab_size, fast.extra_ids, fast.sentinel_id(5)) == (384, 100, 378)
  # Special-token text is text, as for SentencePiece (transformers' tokenizer.json would match
  # '</s>' as a piece): plain encode agrees too, also after pickling (grain's worker processes).
  literal = ['x </s> y', '<pad><unk>', '<extra_id_3>', 'a</s>']
  fast_copy = pickle.loads(pickle.dumps(fast))
  for text in strings() + literal:
    assert vocab.encode_with_sentinels(fast, text) == vocab.encode_with_sentinels(sp, text), text
    assert fast.encode(text) == fast_copy.encode(text) == sp.encode(text), text
  # ... and written back out (t5lite-to-hf of a model trained on it), AutoTokenizer agrees.
  assert hf_vocab.write_tokenizer(fast, str(tmp_path / 'fast_out'))[0] == 'special_tokens_map.json'
  assert os.path.exists(tmp_path / 'fast_out' / 'tokenizer.json')
  assert_autotokenizer_matches(str(tmp_path / 'fast_out'), fast, 100)
  ids = vocab.encode_with_sentinels(sp, 'the return <extra_id_2> of 12')
  assert fast.decode(ids + [1, 50]) == sp.decode(ids) == 'the return<extra_id_2> of 12'

  hf_vocab.write_tokenizer(vocab.ByteVocabulary(), str(tmp_path / 'byte'))
  assert repr(vocab.get_vocabulary(f'hf:{tmp_path / "byte"}')) == repr(vocab.ByteVocabulary())

  # Not T5's layout, or no tokenizer at all: refused by name.
  config = json.loads((tmp_path / 'fast' / 'tokenizer.json').read_text())
  pieces = config['model']['vocab']  # the sentinels are pieces 284..383: move <extra_id_1> to 5
  pieces[5], pieces[382] = pieces[382], pieces[5]
  for t in config['added_tokens']:
    t['id'] = 5 if t['content'] == '<extra_id_1>' else t['id']
  (tmp_path / 'fast' / 'tokenizer.json').write_text(json.dumps(config))
  with pytest.raises(FileNotFoundError, match=r"not T5's id layout .*<extra_id_1>=5"):
    vocab.get_vocabulary(f'hf:{tmp_path / "fast"}')
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='no tokenizer there'):
    vocab.get_vocabulary(f'hf:{tmp_path / "empty"}')


def test_mt5_layout_sentinels_inside_the_sentencepiece_model(small_sp, tmp_path):
  """mT5's spiece.model holds its sentinels as its top pieces ('\u2581<extra_id_0>' at size - 1,
  HF extra_ids=0): built here by appending 100 such pieces to a trained model."""
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=import-outside-toplevel
  proto = pb.ModelProto()
  proto.ParseFromString(open(small_sp[0], 'rb').read())
  for n in range(99, -1, -1):
    piece = proto.pieces.add()
    piece.piece, piece.type = f'\u2581<extra_id_{n}>', pb.ModelProto.SentencePiece.USER_DEFINED
  os.makedirs(tmp_path / 'mt5')
  (tmp_path / 'mt5' / 'spiece.model').write_bytes(proto.SerializeToString())
  (tmp_path / 'mt5' / 'tokenizer_config.json').write_text(
      json.dumps({'tokenizer_class': 'T5Tokenizer', 'extra_ids': 0, 'eos_token': '</s>'}))
  mt5 = vocab.get_vocabulary(f'hf:{tmp_path / "mt5"}')
  assert (mt5.vocab_size, mt5.sp_vocab_size, mt5.extra_ids) == (384, 284, 100)
  assert mt5.sentinel_id(0) == 383 and mt5.sentinel_id(99) == 284
  assert mt5.decode([383, 22, 382]).startswith('<extra_id_0>')
  small = vocab.SentencePieceVocabulary(small_sp[0])
  text = 'the return of 12'
  assert mt5.encode(text) == small.encode(text)

  written = hf_vocab.write_tokenizer(mt5, str(tmp_path / 'out'))
  config = json.loads((tmp_path / 'out' / 'tokenizer_config.json').read_text())
  assert 'spiece.model' in written and config['extra_ids'] == 0
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'out'))
  assert len(tok) == 384
  texts = [t for t in strings() if '<extra_id_' not in t]
  assert tok(texts)['input_ids'] == [t5lite_ids(mt5, t) for t in texts]


def hf_model_dir(path, vocab_size, tokenizer=None):
  """A tiny random HF T5.1.1 with the quickstart's dims and `vocab_size` embedding rows, with the
  tokenizer files of `tokenizer` (a t5lite vocabulary) or none."""
  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=vocab_size, d_model=128, d_ff=256, d_kv=32, num_heads=4,
                                 num_layers=2, num_decoder_layers=2,
                                 relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128,
                                 feed_forward_proj='gated-gelu', tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(config)
  # transformers 5.x ties the output layer whatever tie_word_embeddings says (tests/test_hf.py)
  model.lm_head = torch.nn.Linear(128, vocab_size, bias=False)
  model.save_pretrained(str(path))
  if tokenizer is not None:
    hf_vocab.write_tokenizer(tokenizer, str(path))
  return str(path)


def quickstart(*overrides):
  config = config_files.load_config_file(os.path.join(REPO, 'configs', 'quickstart.py'))
  for override in overrides:
    config_files.set_override(config, *override.split('=', 1))
  return config


def refusal(*overrides):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(quickstart(*overrides), 1)
  return str(info.value)


def test_convert_records_writes_and_refuses_other_vocabularies(small_sp, tmp_path, capsys):
  """A 'Flan-T5' (its own 384-id tokenizer) converted both ways, and fine-tunes from it."""
  own = vocab.SentencePieceVocabulary(small_sp[0])
  hf_dir = hf_model_dir(tmp_path / 'flan', 384, own)
  workdir = str(tmp_path / 'converted')
  assert convert.main(['hf-to-t5lite', '--model', hf_dir, '--out', workdir]) == 0
  out = capsys.readouterr().out
  assert f'--config.data.vocabulary=hf:{hf_dir}' in out and 'sentencepiece, 384 ids' in out
  recorded = json.load(open(os.path.join(workdir, 'model_config.json')))['converted_from']
  assert recorded['tokenizer'] == hf_vocab.record(own, f'hf:{hf_dir}')
  assert f'--config.data.vocabulary=hf:{hf_dir}' in json.load(
      open(os.path.join(workdir, 'model_config.json')))['overrides']
  saved = hf_vocab.read_saved_config(os.path.join(workdir, 'checkpoints', '0'))
  assert saved['converted_from']['tokenizer'] == recorded['tokenizer']

  # Back to HF: the recorded tokenizer is written, and AutoTokenizer encodes as t5lite does.
  back = str(tmp_path / 'back')
  assert convert.main(['t5lite-to-hf', '--checkpoint', workdir, '--out', back]) == 0
  assert f'its tokenizer (hf:{hf_dir}): special_tokens_map.json, spiece.model' in \
      capsys.readouterr().out
  assert_autotokenizer_matches(back, own, 100)
  model_config = transformers.AutoConfig.from_pretrained(back)
  assert model_config.vocab_size == 384 == len(transformers.AutoTokenizer.from_pretrained(back))

  # Fine-tunes: the model's own vocabulary passes (as hf:DIR or its spiece.model) ...
  model = ['model.vocab_size=384', 'model.relative_attention_max_distance=128']
  for init in (f'hf:{hf_dir}', workdir):
    for spec in (f'hf:{hf_dir}', os.path.join(hf_dir, 'spiece.model')):
      config_lib.validate(
          quickstart(*model, f'checkpoint.init_from={init}', f'data.vocabulary={spec}'), 1)
    # ... the embedded 2k default is refused (size), as are the same-size bytes (kind) and
    # another 384-id SentencePiece model (its sha256), each message naming both vocabularies.
    err = refusal(*model, f'checkpoint.init_from={init}')
    assert 'config.data.vocabulary: embedded (sentencepiece, 2048 ids' in err
    assert f'trained with hf:{hf_dir} (sentencepiece, 384 ids, sha256 ' in err
    assert f'set --config.data.vocabulary=hf:{hf_dir}' in err
    # data.vocabulary=task: the task's own (the quickstart task's is the embedded one).
    assert 'vocabulary: task:embedded_span_corruption (sentencepiece, 2048 ids' in refusal(
        *model, f'checkpoint.init_from={init}', 'data.vocabulary=task')
    assert 'byte (byte, 384 ids)' in refusal(*model, f'checkpoint.init_from={init}',
                                             'data.vocabulary=byte')
    other = hf_vocab.record(vocab.SentencePieceVocabulary(small_sp[1]), small_sp[1])
    err = refusal(*model, f'checkpoint.init_from={init}', f'data.vocabulary={small_sp[1]}')
    assert f'sha256 {other["sha256"][:12]}' in err and recorded['tokenizer']['sha256'][:12] in err

  # A fine-tune that re-initialises the embedding and the output layer may change vocabulary.
  config_lib.validate(
      quickstart(*model, f'checkpoint.init_from={workdir}',
                 "checkpoint.init_ignore=('token_embedder', 'logits_dense')"), 1)
  assert 'config.data.vocabulary: embedded' in refusal(
      *model, f'checkpoint.init_from={workdir}', "checkpoint.init_ignore=('token_embedder',)")
  # A task's own vocabulary class (no extra_ids, a kind t5lite does not know) compares by size.
  custom = type('Custom', (), {'vocab_size': 384})()
  assert not hf_vocab.mismatch(hf_vocab.record(custom, 'task:x'), recorded['tokenizer'])
  assert hf_vocab.mismatch(hf_vocab.record(type('Custom', (), {'vocab_size': 512})(), 'task:x'),
                           recorded['tokenizer'])

  # The training command refuses it before building anything: one line, status 2.
  argv = [
      '--config',
      os.path.join(REPO, 'configs', 'quickstart.py'), '--workdir',
      str(tmp_path / 'ft')
  ] + [f'--config.{o}' for o in model]
  assert train.main(argv + [f'--config.checkpoint.init_from={workdir}']) == 2
  err = capsys.readouterr().err
  assert err.startswith('config error: config.data.vocabulary: embedded (')
  assert err.count('\n') == 1 and not os.path.exists(tmp_path / 'ft' / 'checkpoints')

  # A t5lite-to-hf of a checkpoint that records no tokenizer writes none and says so; --vocabulary
  # names one.
  bare = hf_model_dir(tmp_path / 'bare', 2048)
  assert convert.main(['hf-to-t5lite', '--model', bare, '--out', str(tmp_path / 'w2')]) == 0
  assert 'holds no tokenizer' in capsys.readouterr().out
  assert convert.main(
      ['t5lite-to-hf', '--checkpoint',
       str(tmp_path / 'w2'), '--out',
       str(tmp_path / 'b2')]) == 0
  assert 'no tokenizer files' in capsys.readouterr().out
  assert not os.path.exists(tmp_path / 'b2' / 'tokenizer_config.json')
  assert convert.main([
      't5lite-to-hf', '--checkpoint',
      str(tmp_path / 'w2'), '--out',
      str(tmp_path / 'b3'), '--vocabulary', 'embedded'
  ]) == 0
  assert_autotokenizer_matches(str(tmp_path / 'b3'), vocab.embedded_vocabulary(), 100)
  # With no tokenizer known, sizes decide: 2048 ids fit a 2048-row model, 384 do not.
  config_lib.validate(quickstart(f'checkpoint.init_from=hf:{bare}'), 1)
  err = refusal(f'checkpoint.init_from={tmp_path / "w2"}', 'data.vocabulary=byte')
  assert 'has 2048 embedding rows and no recorded tokenizer' in err
  # A tokenizer larger than the model is refused at conversion.
  shutil.copy(vocab.embedded_vocabulary().path, os.path.join(hf_dir, 'spiece.model'))
  assert convert.main(['hf-to-t5lite', '--model', hf_dir, '--out', str(tmp_path / 'w3')]) == 2
  assert 'its tokenizer has 2048 ids, more than the model' in capsys.readouterr().err


def test_a_training_runs_vocabulary_is_what_t5lite_to_hf_writes():
  """A run's checkpoint config records data.vocabulary (and sp_vocab_size): that is the model's."""
  saved = {'data': {'vocabulary': 'byte', 'sp_vocab_size': 1948}, 'model': {'vocab_size': 384}}
  rec, where = hf_vocab.model_tokenizer(saved)
  assert rec['kind'] == 'byte' and rec['vocab_size'] == 384 and 'byte' in where
  written, said = convert._vocabulary_for_hf(saved, None, 'step')  # pylint: disable=protected-access
  assert isinstance(written, vocab.ByteVocabulary) and said == 'its tokenizer (byte)'
  assert convert._vocabulary_for_hf({}, None, 'step')[0] is None  # pylint: disable=protected-access
  with pytest.raises(convert.ConvertError, match="'task'.*names no one vocabulary"):
    convert._vocabulary_for_hf({}, 'task', 'step')  # pylint: disable=protected-access
