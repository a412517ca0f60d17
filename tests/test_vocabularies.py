"""Byte vocabulary (ByT5), data.vocabulary, and the train_vocab command."""
import os

import numpy as np
import pytest

from t5lite import config_files
from t5lite import train
from t5lite.data import catalog, embedded, pipeline, preprocessors, tasks, train_vocab, vocab
from t5lite.data.catalog import common
from t5lite.data.sources import InMemorySource


def test_byte_vocabulary_ids_follow_byt5():
  v = vocab.ByteVocabulary()
  assert (v.vocab_size, v.sp_vocab_size, v.extra_ids) == (384, 259, 125)
  # 'h' is byte 104 -> id 107; 'é' is the two bytes 0xC3 0xA9 -> ids 198, 172.
  assert v.encode('hé') == [107, 198, 172]
  assert v.sentinel_id(0) == 383 and v.sentinel_id(124) == 259
  text = 'naïve café: 3 ≤ 4'
  assert v.decode(v.encode(text)) == text
  # Sentinels show, pad is skipped, EOS ends, a cut-off multi-byte character is dropped.
  ids = [107, 0, 383, 198, 108, 1, 120]
  assert v.decode(ids) == 'h<extra_id_0>i'
  with pytest.raises(ValueError):
    v.sentinel_id(125)


def test_span_corruption_over_bytes_re_merges_to_the_text():
  v = vocab.ByteVocabulary()
  it = pipeline.make_task_iterator('embedded_span_corruption',
                                   feature_lengths={'inputs': 128, 'targets': 29},
                                   global_batch_size=8, seed=0, pack=False, vocabulary=v)
  batch = next(it)
  assert batch['encoder_input_tokens'].max() < v.vocab_size
  # The train split's documents as one byte stream: every example is a slice of it.
  stream = b''.join(
      d.encode('utf-8') for i, d in enumerate(embedded.corpus_documents())
      if common.in_split(i, 'train'))
  for inputs, targets in zip(batch['encoder_input_tokens'], batch['decoder_target_tokens']):
    merged = preprocessors.merge_span_corruption(inputs, targets, v.vocab_size)
    assert merged.min() >= v.OFFSET and merged.max() < v.sp_vocab_size  # plain bytes again
    assert bytes((merged - v.OFFSET).astype(np.uint8).tolist()) in stream
    assert len(merged) == preprocessors.random_spans_helper(128, 0.15, 3.0)[0]


def test_training_with_bytes_and_a_missing_vocabulary_file(tmp_path, capsys):
  c = config_files.load_config_file(
      os.path.join(os.path.dirname(__file__), '..', 'configs', 'quickstart.py'))
  c.data.vocabulary = 'byte'
  c.model.vocab_size = 384
  c.model.dtype = 'float32'
  c.train.update(steps=2, batch_size=8, log_every=1)
  c.reporting.update(tensorboard=False, peak_flops_per_device=1e11)
  history = train.run(c, str(tmp_path / 'w'))
  # Untrained, the loss is about log(384) = 5.95 nats per byte.
  assert abs(history[0]['loss'] - np.log(384)) < 1.0 and np.isfinite(history[-1]['loss'])
  code = train.main([
      '--config', 'configs/quickstart.py', '--workdir',
      str(tmp_path / 'x'), f'--config.data.vocabulary={tmp_path}/nothing.model'
  ])
  assert code == 2 and 'data.vocabulary=' in capsys.readouterr().err


def test_train_vocab_command(tmp_path, capsys):
  words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'theta', 'lambda']
  rng = np.random.RandomState(0)
  lines = [{'text': ' '.join(rng.choice(words, 12)), 'label': 'x'} for _ in range(300)]
  tasks.add_task('vocab_test_task', InMemorySource({'train': lines}), [],
                 {'targets': tasks.Feature(vocab.ByteVocabulary())}, overwrite=True)
  try:
    out = tmp_path / 'v.model'
    assert train_vocab.main([
        '--task', 'vocab_test_task', '--vocab_size', '24', '--out',
        str(out), '--features', 'text'
    ]) == 0
    assert 'use --config.data.vocabulary=' in capsys.readouterr().out
    trained = vocab.get_vocabulary(str(out))
    assert (trained.sp_vocab_size, trained.vocab_size) == (24, 124)
    sentence = 'gamma delta alpha'
    assert trained.decode(trained.encode(sentence)) == sentence
    # Deterministic: the same task gives the same model, byte for byte.
    again = tmp_path / 'again.model'
    train_vocab.main([
        '--task', 'vocab_test_task', '--vocab_size', '24', '--out',
        str(again), '--features', 'text'
    ])
    assert out.read_bytes() == again.read_bytes()
    # A field the examples lack, and an unknown task: exit 2 with the reason.
    assert train_vocab.main(
        ['--task', 'vocab_test_task', '--out',
         str(tmp_path / 'y.model'), '--features', 'body']) == 2
    assert "has no field 'body'" in capsys.readouterr().err
    assert train_vocab.main(['--task', 'vocab_tset_task', '--out', str(tmp_path / 'z.model')]) == 2
    assert 'vocab_test_task' in capsys.readouterr().err  # the closest registered name
  finally:
    tasks.remove('vocab_test_task')
