"""Feature converter, vocabulary and the grain span-corruption pipeline."""

import os

import numpy as np
import pytest

from t5lite.data import catalog, converters, embedded, pipeline, preprocessors, vocab
from t5lite.data.catalog import common, pretraining

# ---------------------------------------------------------------------------
# Converter (expected arrays written by hand)
# ---------------------------------------------------------------------------

EX1 = {'inputs': np.array([3, 4, 1]), 'targets': np.array([5, 1])}
EX2 = {'inputs': np.array([6, 1]), 'targets': np.array([7, 8, 1])}
EX3 = {'inputs': np.array([9, 9, 9, 1]), 'targets': np.array([2, 1])}  # fits no longer


def test_packed_features_by_hand():
  f = converters.encdec_features([EX1, EX2, EX3], inputs_length=6, targets_length=6, pack=True)
  expected = {
      'encoder_input_tokens': [[3, 4, 1, 6, 1, 0], [9, 9, 9, 1, 0, 0]],
      'encoder_segment_ids': [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]],
      'encoder_positions': [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]],
      'decoder_target_tokens': [[5, 1, 7, 8, 1, 0], [2, 1, 0, 0, 0, 0]],
      'decoder_input_tokens': [[0, 5, 0, 7, 8, 0], [0, 2, 0, 0, 0, 0]],
      'decoder_loss_weights': [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]],
      'decoder_segment_ids': [[1, 1, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0]],
      'decoder_positions': [[0, 1, 0, 1, 2, 0], [0, 1, 0, 0, 0, 0]],
  }
  assert set(f) == set(expected)
  for name, want in expected.items():
    assert f[name].dtype == np.int32, name
    np.testing.assert_array_equal(f[name], want, err_msg=name)


def test_unpacked_padding_by_hand():
  f = converters.encdec_features([EX1, EX2], inputs_length=4, targets_length=4, pack=False)
  expected = {
      'encoder_input_tokens': [[3, 4, 1, 0], [6, 1, 0, 0]],
      'decoder_target_tokens': [[5, 1, 0, 0], [7, 8, 1, 0]],
      # Plain shift as in seqio: the position after EOS sees EOS (weight 0).
      'decoder_input_tokens': [[0, 5, 1, 0], [0, 7, 8, 1]],
      'decoder_loss_weights': [[1, 1, 0, 0], [1, 1, 1, 0]],
  }
  assert set(f) == set(expected)
  for name, want in expected.items():
    np.testing.assert_array_equal(f[name], want, err_msg=name)


def test_truncation_and_pad_rows():
  long = {'inputs': np.arange(3, 13), 'targets': np.arange(3, 9)}
  f = converters.encdec_features([long], inputs_length=4, targets_length=3, pack=True)
  np.testing.assert_array_equal(f['encoder_input_tokens'], [[3, 4, 5, 6]])
  np.testing.assert_array_equal(f['decoder_target_tokens'], [[3, 4, 5]])
  padded = converters.pad_rows(f, 3)
  for name, x in padded.items():
    assert x.shape[0] == 3 and x.dtype == np.int32
    assert not x[1:].any(), name
  with pytest.raises(ValueError, match='rows'):
    converters.pad_rows(padded, 2)


# ---------------------------------------------------------------------------
# Vocabulary (trained once per test session into a temporary cache)
# ---------------------------------------------------------------------------


@pytest.fixture(scope='session')
def vocab_cache(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('t5lite_cache'))
  old = os.environ.get('T5LITE_CACHE')
  os.environ['T5LITE_CACHE'] = cache
  yield cache
  if old is None:
    del os.environ['T5LITE_CACHE']
  else:
    os.environ['T5LITE_CACHE'] = old


@pytest.fixture(scope='session')
def v(vocab_cache):
  return vocab.embedded_vocabulary()  # default size, cache dir from $T5LITE_CACHE


def test_default_vocabulary(v, vocab_cache):
  assert v.vocab_size == 2048 and v.sp_vocab_size == 1948
  assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
  assert v.sentinel_id(0) == 2047 and v.sentinel_id(99) == 1948
  with pytest.raises(ValueError):
    v.sentinel_id(100)
  name = os.path.basename(v.path)
  assert os.path.dirname(v.path) == vocab_cache and '1948' in name
  # Cached: a second call reuses the file instead of retraining.
  mtime = os.path.getmtime(v.path)
  assert vocab.embedded_vocabulary().path == v.path
  assert os.path.getmtime(v.path) == mtime


def test_encode_decode_round_trip(v):
  text = 'Return a new list containing all items from the iterable in ascending order.'
  ids = v.encode(text)
  assert ids and all(3 <= i < v.sp_vocab_size for i in ids)
  assert v.decode(ids) == text
  # Pad skipped, EOS stops decoding.
  assert v.decode([0] + ids + [1] + v.encode('not shown')) == text


def test_sentinel_rendering(v):
  ids = v.encode('Return a') + [v.sentinel_id(0)] + v.encode('list') + [v.sentinel_id(7), 1]
  assert v.decode(ids) == 'Return a<extra_id_0> list<extra_id_7>'


def test_train_sentencepiece_is_deterministic(tmp_path):
  texts = embedded.corpus_documents()[:150]
  a, b = tmp_path / 'a.model', tmp_path / 'b.model'
  vocab.train_sentencepiece(texts, str(a), 300)
  vocab.train_sentencepiece(texts, str(b), 300)
  assert a.read_bytes() == b.read_bytes()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.tmp')] == []
  small = vocab.SentencePieceVocabulary(str(a), extra_ids=10)
  assert small.vocab_size == 310 and small.sentinel_id(0) == 309


def test_corpus_is_deterministic_and_sized():
  docs = embedded.corpus_documents()
  assert docs == embedded.corpus_documents()
  total = sum(map(len, docs))
  assert 500_000 < total < 3_000_000
  assert min(map(len, docs)) >= 20
  assert all(d == ' '.join(d.split()) for d in docs)


# ---------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------

LENGTH = 64  # short sequences keep the tests fast
TARGETS = preprocessors.random_spans_helper(LENGTH, 0.15, 3.0)[1]


def make(v, seed=0, batch=4, pack=True, **kw):
  kw.setdefault('process_index', 0)
  kw.setdefault('process_count', 1)
  # The path the trainer takes: the registered quickstart task.
  return pipeline.make_task_iterator('embedded_span_corruption',
                                     feature_lengths={'inputs': LENGTH,
                                                      'targets': TARGETS}, global_batch_size=batch,
                                     seed=seed, pack=pack, vocabulary=v, **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_shapes_and_loss_weights(v):
  _, targets_length = preprocessors.random_spans_helper(LENGTH, 0.15, 3.0)
  for pack in (True, False):
    batch = next(make(v, pack=pack))
    expected = set(converters.ENCDEC_FEATURES)
    if pack:
      expected |= set(converters.PACKING_FEATURES)
    assert set(batch) == expected
    for name, x in batch.items():
      want = LENGTH if name.startswith('encoder') else targets_length
      assert x.shape == (4, want) and x.dtype == np.int32, name
    np.testing.assert_array_equal(batch['decoder_loss_weights'], batch['decoder_target_tokens']
                                  != 0)
    # Full-length chunks fill the rows exactly.
    assert (batch['encoder_input_tokens'] != 0).all()


def test_examples_are_corpus_chunks(v):
  raw_length, _ = preprocessors.random_spans_helper(LENGTH, 0.15, 3.0)
  # The train split: every document but the held-out validation ones (catalog.VALIDATION_EVERY).
  stream = np.concatenate([
      np.asarray(v.encode(d), np.int32) for i, d in enumerate(embedded.corpus_documents())
      if i % catalog.VALIDATION_EVERY != catalog.VALIDATION_EVERY - 1
  ])
  batch = next(make(v, pack=False))
  for inputs, targets in zip(batch['encoder_input_tokens'], batch['decoder_target_tokens']):
    merged = preprocessors.merge_span_corruption(inputs, targets, v.vocab_size)
    assert len(merged) == raw_length
    start = stream.tobytes().find(merged.tobytes())
    assert start >= 0 and start % (4 * raw_length) == 0  # an aligned chunk


def test_determinism(v):
  a = take(make(v, seed=0), 3)
  b = take(make(v, seed=0), 3)
  c = take(make(v, seed=1), 3)
  assert_batches_equal(a, b)
  assert not all(
      np.array_equal(x['encoder_input_tokens'], y['encoder_input_tokens']) for x, y in zip(a, c))


def test_resume_from_state(v):
  it = make(v, seed=3)
  take(it, 2)
  state = it.get_state()
  expected = take(it, 3)
  fresh = make(v, seed=3)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 3), expected)


def test_process_slices_partition_the_global_batch(v):

  def rows(batch):
    return {r.tobytes() for r in batch['encoder_input_tokens']}

  global_rows = rows(next(make(v, batch=4, pack=False)))
  p0 = next(make(v, batch=4, pack=False, process_index=0, process_count=2))
  p1 = next(make(v, batch=4, pack=False, process_index=1, process_count=2))
  assert p0['encoder_input_tokens'].shape == (2, LENGTH)
  assert rows(p0) | rows(p1) == global_rows and not rows(p0) & rows(p1)


def test_new_shuffle_each_epoch(v):
  it = make(v, batch=1, pack=False)

  def chunk():
    b = next(it)
    return preprocessors.merge_span_corruption(b['encoder_input_tokens'][0],
                                               b['decoder_target_tokens'][0], v.vocab_size)

  raw_length, _ = preprocessors.random_spans_helper(LENGTH, 0.15, 3.0)
  train_docs = [
      t for i, t in enumerate(pipeline._tokenized_corpus(v.path, v.extra_ids))
      if common.in_split(i, 'train')
  ]
  chunks = [c.tobytes() for c in preprocessors.split_tokens(train_docs, raw_length) if len(c) >= 2]
  n = len(chunks)
  epoch0 = [chunk().tobytes() for _ in range(n)]
  epoch1 = [chunk().tobytes() for _ in range(20)]
  assert epoch0[:20] != epoch1
  # Each epoch is a permutation of the chunks (compared as multisets: the
  # corpus does repeat a 70-token passage once).
  assert epoch0 != chunks and sorted(epoch0) == sorted(chunks)


def test_batch_size_not_divisible_by_processes(v):
  with pytest.raises(ValueError, match='global_batch_size'):
    make(v, batch=5, process_index=0, process_count=2)


def test_validation_split_is_held_out(v):
  """The embedded corpus's validation split shares no document with train, and is small."""
  source = pretraining.embedded_source()
  train_docs = {e['doc'] for e in source.get('train')}
  validation_docs = {e['doc'] for e in source.get('validation')}
  assert not train_docs & validation_docs
  assert train_docs | validation_docs == set(range(len(embedded.corpus_documents())))
  assert 0.02 < len(validation_docs) / len(train_docs) < 0.08


def test_worker_processes_give_the_same_batches_and_resume(v):
  """Preprocessing in 2 grain worker processes: the same batches as in-process, and a state
    taken mid-way resumes (in a new set of workers) with exactly the batches that followed."""
  reference = take(make(v, seed=3), 6)
  it = make(v, seed=3, num_workers=2)
  got = take(it, 3)
  state = it.get_state()
  got += take(it, 3)
  it.close()
  assert_batches_equal(reference, got)
  resumed = make(v, seed=3, num_workers=2)
  resumed.set_state(state)
  assert_batches_equal(reference[3:], take(resumed, 3))
  resumed.close()


def test_corpus_does_not_depend_on_what_was_imported_first():
  """torch/transformers patch stdlib modules on import; the corpus (and so the vocabulary and
    every batch) must still be what a fresh interpreter reads."""
  import subprocess
  import sys
  code = ('import torch, transformers\n'
          'from t5lite.data import vocab\n'
          'print(vocab._corpus_hash())')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       timeout=300).stdout.split()[-1]
  assert out == vocab._corpus_hash()
