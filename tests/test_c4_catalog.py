"""The C4 catalog tasks read through TFDS without TensorFlow.

Instead of downloading C4, the test prepares a stand-in under the same TFDS name, config and
version (`c4/en:3.1.0`, features text + url, array_record files) in a temporary TFDS_DATA_DIR,
with a builder defined here (skip_registration, so it does not replace TFDS's own). The
registered tasks then open it exactly as they would open a prepared C4.
"""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from t5lite.data import catalog, pipeline, preprocessors, vocab

WORDS = 'the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxes'.split()


def document(i):
  rng = np.random.RandomState(i)
  return f'Document {i}: ' + ' '.join(rng.choice(WORDS, 40 + 60 * (i % 5))) + '.'


class C4(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version('3.1.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='en')]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(
            {'text': tfds.features.Text(), 'url': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
        'train': self._generate_examples(range(30)),
        'validation': self._generate_examples(range(100, 107))
    }

  def _generate_examples(self, ids):
    for i in ids:
      yield i, {'text': document(i), 'url': f'https://example.com/{i}'}


@pytest.fixture(scope='module')
def c4_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  C4(config='en', data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return str(data_dir)


def test_c4_span_corruption_reads_documents_and_corrupts_chunks(c4_dir, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', c4_dir)
  v = vocab.embedded_vocabulary()  # T5's own vocabulary lives on gs://: not fetched in tests
  docs = {i: np.asarray(v.encode(document(i)), np.int32) for i in range(30)}
  it = pipeline.make_task_iterator('c4_span_corruption',
                                   feature_lengths={'inputs': 128,
                                                    'targets': 29}, global_batch_size=8, seed=0,
                                   pack=False, vocabulary=v, process_index=0, process_count=1)
  raw_length = preprocessors.span_corruption_raw_length({'inputs': 128})
  seen = set()
  for _ in range(3):
    batch = next(it)
    for inputs, targets in zip(batch['encoder_input_tokens'], batch['decoder_target_tokens']):
      merged = preprocessors.merge_span_corruption(inputs, targets, v.vocab_size)
      # Each example is a window of one document (a random chunk of at most the raw length).
      owners = [i for i, d in docs.items() if merged.tobytes() in d.tobytes()]
      assert owners and len(merged) == min(raw_length, len(docs[owners[0]])), len(merged)
      seen.update(owners)
  assert len(seen) >= 12  # shuffled over many documents
  assert any(len(d) > raw_length for d in docs.values())  # some windows were real crops


def test_c4_validation_split_and_ul2(c4_dir, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', c4_dir)
  v = vocab.embedded_vocabulary()
  lengths = {'inputs': 128, 'targets': 64}
  it = pipeline.make_task_iterator('c4_ul2', feature_lengths=lengths, global_batch_size=4, seed=0,
                                   split='validation', shuffle=False, repeat=False, vocabulary=v,
                                   process_index=0, process_count=1)
  rows = sum(int((b['encoder_input_tokens'] != 0).any(axis=1).sum()) for b in it)
  assert rows >= 2  # the 7 validation documents, packed
  modes = {preprocessors.mode_token_id(v.vocab_size, m) for m in ('[NLU]', '[NLG]', '[S2S]')}
  it = pipeline.make_task_iterator('c4_ul2', feature_lengths=lengths, global_batch_size=8, seed=1,
                                   pack=False, vocabulary=v, process_index=0, process_count=1)
  firsts = {int(x) for b in (next(it), next(it)) for x in b['encoder_input_tokens'][:, 0]}
  assert firsts <= modes and len(firsts) >= 2  # every example starts with its mode token


def test_c4_declares_t5_vocabulary_lazily():
  task = __import__('t5lite.data.tasks', fromlist=['get']).get('c4_span_corruption')
  feature = task.output_features['targets']
  assert feature._vocabulary.args == (catalog.T5_SPM_PATH,)  # not loaded: no network at import
