"""Bad data at resume and bad local files: one clear error, never a KeyError or a silent mismatch.

A data position (the iterator state a checkpoint stores as JSON) belongs to the pipeline
that wrote it; resuming it in another one must be refused naming the change and the way
to start the data afresh on purpose (data.reset_position). Local-file tasks with a
missing, empty or malformed file must fail with a DataSourceError naming the file and
line, also when the line is read in a grain worker process.
"""

import functools
import json
import pickle

import numpy as np
import pytest

from t5lite.data import pipeline, preprocessors as P, tasks as T
from t5lite.data.pipeline import DataStateMismatchError
from t5lite.data.sources import (DataFileNotFoundError, DataSourceError, InMemorySource,
                                 JsonlSource, TextLineSource, TsvSource)
from t5lite.data.vocab import ByteVocabulary

# Only t5lite classes in the tasks, so grain worker processes can unpickle them.
FEATS = {'inputs': T.Feature(ByteVocabulary()), 'targets': T.Feature(ByteVocabulary())}
LENGTHS = {'inputs': 8, 'targets': 4}
RESET = 'data.reset_position=True'
QA_STEPS = [functools.partial(P.rekey, key_map={'inputs': 'q', 'targets': 'a'}), P.tokenize]


@pytest.fixture
def registry():
  made = []

  def add(name, source, steps=(), **kw):
    made.append(name)
    return T.add_task(name, source, list(steps), FEATS, overwrite=True, **kw)

  def mix(name, comps):
    made.append(name)
    return T.add_mixture(name, comps, overwrite=True)

  add.mix = mix
  yield add
  for name in made:
    T.remove(name)


def tagged(tag, n):
  """n examples whose inputs carry the tag and an index: [tag, 3 + i]."""
  return InMemorySource(
      {'train': [{'inputs': np.array([tag, 3 + i]), 'targets': np.array([tag])} for i in range(n)]})


def make(name, lengths=LENGTHS, batch=4, **kw):
  kw.setdefault('seed', 0)
  return pipeline.make_task_iterator(name, feature_lengths=lengths, global_batch_size=batch,
                                     process_index=0, process_count=1, **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def saved_state(it):
  """The state as the checkpoint stores and restores it: through JSON."""
  return json.loads(json.dumps(it.get_state()))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture
def tasks(registry):
  registry('f_a', tagged(5, 30))
  registry('f_b', tagged(6, 20))
  registry('f_c', tagged(7, 10))
  registry.mix('f_mix', [('f_a', 1.0), ('f_b', 1.0)])
  return registry


def refused(it, state) -> str:
  with pytest.raises(DataStateMismatchError) as e:
    it.set_state(state)
  message = str(e.value)
  assert '\n' not in message and RESET in message
  assert isinstance(e.value, ValueError)  # the jobs' one-line path for bad input
  return message


# --- the same pipeline resumes exactly ------------------------------------------------


@pytest.mark.parametrize('name', ['f_a', 'f_mix'])
def test_unchanged_pipeline_resumes_as_if_uninterrupted(tasks, name):
  uninterrupted = take(make(name), 7)
  first = make(name)
  take(first, 3)
  state = saved_state(first)
  resumed = make(name)  # a new process would build it afresh from the same config
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), uninterrupted[3:])


def test_state_written_before_fingerprints_still_resumes_when_it_fits(tasks):
  uninterrupted = take(make('f_mix'), 5)
  first = make('f_mix')
  take(first, 2)
  old = saved_state(first)
  del old['pipeline']  # what a checkpoint written before this change holds
  resumed = make('f_mix')
  resumed.set_state(old)
  assert_batches_equal(take(resumed, 3), uninterrupted[2:])


# --- another pipeline is refused, naming the change ------------------------------------


def test_task_swapped_for_a_mixture(tasks):
  first = make('f_a')
  take(first, 2)
  message = refused(make('f_mix'), saved_state(first))
  assert ("data.task: the checkpoint was written reading task 'f_a'; this config reads "
          "mixture 'f_mix' (tasks f_a@0.5, f_b@0.5)") in message


def test_mixture_swapped_for_a_task(tasks):
  first = make('f_mix')
  take(first, 2)
  message = refused(make('f_b'), saved_state(first))
  assert ("reading mixture 'f_mix' (tasks f_a@0.5, f_b@0.5); this config reads task 'f_b'"
          in message)


def test_a_task_added_to_the_mixture(tasks):
  first = make('f_mix')
  take(first, 2)
  state = saved_state(first)
  tasks.mix('f_mix', [('f_a', 1.0), ('f_b', 1.0), ('f_c', 2.0)])  # the edited mixture
  message = refused(make('f_mix'), state)
  assert ("reading mixture 'f_mix' (tasks f_a@0.5, f_b@0.5); this config reads mixture 'f_mix' "
          '(tasks f_a@0.25, f_b@0.25, f_c@0.5)') in message


def test_a_rate_changed(tasks):
  first = make('f_mix')
  take(first, 2)
  state = saved_state(first)
  tasks.mix('f_mix', [('f_a', 3.0), ('f_b', 1.0)])
  message = refused(make('f_mix'), state)
  assert '(tasks f_a@0.5, f_b@0.5); this config reads mixture' in message
  assert '(tasks f_a@0.75, f_b@0.25)' in message


def test_a_different_inputs_length(tasks):
  first = make('f_a')
  take(first, 2)
  message = refused(make('f_a', lengths={'inputs': 16, 'targets': 4}), saved_state(first))
  assert ('data.inputs_length/data.targets_length: the checkpoint was written with inputs=8, '
          'targets=4; this config has inputs=16, targets=4') in message
  assert 'data.task' not in message  # only what changed


@pytest.mark.parametrize('change, label', [
    (dict(seed=1), 'train.seed: the checkpoint was written with 0; this config has 1'),
    (dict(batch=8), 'train.batch_size (rows per process): the checkpoint was written with 4; '
     'this config has 8'),
    (dict(pack=False), 'data.pack: the checkpoint was written with True; this config has False'),
    (dict(converter='prefix_lm'), "data.converter: the checkpoint was written with 'encdec'"),
    (dict(num_workers=2), 'data.num_workers: the checkpoint was written with 0; this config has 2'),
])
def test_other_settings_that_move_the_position(tasks, change, label):
  first = make('f_a')
  take(first, 2)
  state = saved_state(first)
  it = make('f_a', **change)
  try:
    assert label in refused(it, state)
  finally:
    it.close()


def test_a_data_file_that_grew(registry, tmp_path):
  path = tmp_path / 'qa.jsonl'
  line = json.dumps({'q': 'two plus two', 'a': 'four'}) + '\n'
  path.write_text(line * 5)
  registry('l_grow', JsonlSource({'train': str(path)}), QA_STEPS)
  first = make('l_grow')
  take(first, 2)
  state = saved_state(first)
  path.write_text(line * 6)  # the shuffle is now a permutation of 6: other examples there
  registry('l_grow', JsonlSource({'train': str(path)}), QA_STEPS)  # a new run re-reads it
  message = refused(make('l_grow'), state)
  assert ("the tasks' data (examples per task): the checkpoint was written with l_grow=5; this "
          'config has l_grow=6') in message


def test_old_state_that_does_not_fit_is_refused_not_a_key_error(tasks):
  first = make('f_a')
  take(first, 2)
  old = saved_state(first)
  del old['pipeline']
  message = refused(make('f_mix'), old)  # grain alone: KeyError: 'parents'
  assert 'no record of its data pipeline' in message


def test_old_state_of_a_smaller_mixture_is_refused_not_resumed(tasks):
  first = make('f_mix')
  take(first, 2)
  old = saved_state(first)
  del old['pipeline']
  tasks.mix('f_mix', [('f_a', 1.0), ('f_b', 1.0), ('f_c', 1.0)])
  # grain alone resumes this silently: a mix zips the two saved task positions onto three.
  message = refused(make('f_mix'), old)
  assert 'upstream.parents has 2 entries, this pipeline 3' in message


def test_a_state_that_fits_no_structure_is_still_one_clear_error(tasks):
  it = make('f_a')
  good = saved_state(make('f_a'))
  message = refused(it, {'upstream': {'something': 'else'}, 'pipeline': good['pipeline']})
  assert 'does not fit this pipeline' in message
  refused(it, {'not': 'a state'})
  refused(it, None)


# --- local files ------------------------------------------------------------------------


def read_all(name, **kw):
  """Reads the whole (small) file at least once through the training pipeline."""
  it = make(name, **kw)
  try:
    for _ in range(6):
      next(it)
  finally:
    it.close()


def one_line_data_error(fn) -> str:
  with pytest.raises(DataSourceError) as e:
    fn()
  assert '\n' not in str(e.value)
  return str(e.value)


def test_missing_file(registry, tmp_path):
  path = tmp_path / 'nothing.jsonl'
  registry('l_missing', JsonlSource({'train': str(path)}), QA_STEPS)
  with pytest.raises(FileNotFoundError):  # also what it was before
    make('l_missing')
  message = one_line_data_error(lambda: make('l_missing'))
  assert f"split 'train': no file matches '{path}'" in message


@pytest.mark.parametrize('content', ['', '\n  \n\n'])
def test_empty_file(registry, tmp_path, content):
  path = tmp_path / 'empty.jsonl'
  path.write_text(content)
  registry('l_empty', JsonlSource({'train': str(path)}), QA_STEPS)
  message = one_line_data_error(lambda: make('l_empty'))  # when the pipeline is built
  assert message == (f'{path}: no examples (empty, or only blank lines); expected one JSON '
                     'object per line.')


def test_a_file_that_cannot_be_read(registry, tmp_path):
  (tmp_path / 'dir.jsonl').mkdir()
  registry('l_dir', JsonlSource({'train': str(tmp_path / 'dir.jsonl')}), QA_STEPS)
  assert f'{tmp_path / "dir.jsonl"}: cannot be read' in one_line_data_error(lambda: make('l_dir'))


@pytest.mark.parametrize('num_workers', [0, 2])
def test_malformed_json_at_line_3(registry, tmp_path, num_workers):
  path = tmp_path / 'qa.jsonl'
  good = json.dumps({'q': 'two plus two', 'a': 'four'})
  path.write_text('\n'.join([good, good, '{"q": "three", "a": oops}', good, good]) + '\n')
  registry('l_json', JsonlSource({'train': str(path)}), QA_STEPS)
  # Read in grain's threads (0) or worker processes (2): the same error arrives here.
  message = one_line_data_error(lambda: read_all('l_json', num_workers=num_workers))
  assert message.startswith(f'{path}:3: not valid JSON (')
  assert message.endswith('expected one JSON object per line.')


def test_json_line_that_is_not_an_object(registry, tmp_path):
  path = tmp_path / 'qa.jsonl'
  path.write_text('{"q": "a", "a": "b"}\n[1, 2]\n')
  registry('l_list', JsonlSource({'train': str(path)}), QA_STEPS)
  message = one_line_data_error(lambda: read_all('l_list'))
  assert message == (f'{path}:2: expected a JSON object, got list; expected one JSON object '
                     'per line.')


def test_wrong_tsv_column_count(registry, tmp_path):
  path = tmp_path / 'pairs.tsv'
  path.write_text('one two\tun deux\nthree\tfour\tfive\nsix\tsix\n')
  registry('l_tsv', TsvSource({'train': str(path)}, ['q', 'a']), QA_STEPS)
  message = one_line_data_error(lambda: read_all('l_tsv'))
  assert message == f'{path}:2: 3 tab-separated columns, expected 2 (q, a).'


def test_text_that_is_not_utf8(registry, tmp_path):
  path = tmp_path / 'lines.txt'
  path.write_bytes(b'fine line\nbad \xff byte\nfine again\n')
  registry('l_text', TextLineSource({'train': str(path)}, key='q'),
           [functools.partial(P.rekey, key_map={'inputs': 'q', 'targets': 'q'}), P.tokenize])
  message = one_line_data_error(lambda: read_all('l_text'))
  assert message == f'{path}:2: not UTF-8 text (byte 0xff at column 5); expected UTF-8 lines.'


def test_a_task_with_no_examples(registry):
  registry('l_none', InMemorySource({'train': []}))
  assert "task 'l_none' split 'train' has no examples" in one_line_data_error(
      lambda: make('l_none'))


def test_data_errors_cross_process_boundaries_as_themselves():
  for e in (DataSourceError('f.jsonl:3: bad'), DataFileNotFoundError('no file matches x'),
            DataStateMismatchError('changed')):
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is type(e) and str(back) == str(e)
