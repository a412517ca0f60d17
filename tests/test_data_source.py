"""data.source: every format reads back the examples written, the field mapping and objectives give
the tokens a hand computation gives, per-process slices and exact resume as for registered tasks,
clear errors, and a short `t5lite.train` run on a jsonl file with configs/finetune_files.py."""

import json
import pathlib
import types

import numpy as np
import pytest

from t5lite import config as config_lib
from t5lite import config_files
from t5lite.data import catalog  # noqa: F401  (registers the built-in tasks, as the jobs do)
from t5lite.data import file_tasks, pipeline
from t5lite.data import tasks as T
from t5lite.data.sources import DataFileNotFoundError, DataSourceError
from t5lite.data.vocab import ByteVocabulary
from t5lite.fields import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
ROWS = [{'q': f'question {i} é', 'a': f'answer {i}', 'n': str(i)} for i in range(23)]
VALID = [{'q': f'held out {i}', 'a': f'other {i}', 'n': str(i)} for i in range(5)]
BYTES = ByteVocabulary()


def byte_ids(text):
  """ByT5's ids, computed by hand: each UTF-8 byte + 3 (pad, eos, unk come first)."""
  return [b + 3 for b in text.encode('utf-8')]


def write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows), encoding='utf-8')


def write_tsv(path, rows):
  lines = ['\t'.join(rows[0])] + ['\t'.join(r.values()) for r in rows]
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')


def write_parquet(path, rows):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=4)  # several groups


def write_arrayrecord(path, rows):
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(path), 'group_size:1')
  for r in rows:
    writer.write(json.dumps(r).encode('utf-8'))
  writer.close()


WRITERS = {
    'jsonl': write_jsonl, 'tsv': write_tsv, 'parquet': write_parquet,
    'arrayrecord': write_arrayrecord
}


def data_config(source, fields='inputs=q,targets=a', objective='supervised'):
  return types.SimpleNamespace(source=source, source_fields=fields, objective=objective,
                               vocabulary='byte', sp_vocab_size=0)


@pytest.fixture
def register():
  made = []

  def add(source, **kw):
    task = file_tasks.register(data_config(source, **kw))
    made.append(task.name)
    return task

  yield add
  for name in made:
    T.remove(name)


@pytest.mark.parametrize('fmt', sorted(WRITERS))
def test_each_format_reads_back_the_rows_written(tmp_path, fmt):
  # Two shards for train (read in path order), one for validation.
  WRITERS[fmt](tmp_path / f'train-0.{fmt}', ROWS[:10])
  WRITERS[fmt](tmp_path / f'train-1.{fmt}', ROWS[10:])
  WRITERS[fmt](tmp_path / f'validation-0.{fmt}', VALID)
  source = file_tasks.make_source(fmt, str(tmp_path / f'{{split}}-*.{fmt}'), 'test')
  assert list(source.get('train')) == ROWS
  assert [source.get('train')[i] for i in (22, 0, 13, -1)
         ] == [ROWS[22], ROWS[0], ROWS[13], ROWS[-1]]
  assert list(source.get('validation')) == VALID
  with pytest.raises(DataFileNotFoundError, match=r"test split 'test': no file matches"):
    source.get('test')


def test_text_lines_are_the_column_text(tmp_path):
  (tmp_path / 'a.txt').write_text('first line\n\nsecond line\n', encoding='utf-8')
  source = file_tasks.make_source('text', str(tmp_path / '*.txt'), 'test')
  assert list(source.get('train')) == [{'text': 'first line'}, {'text': 'second line'}]
  assert source.splits == ('train',)


def test_hf_datasets_saved_and_parquet_folders(tmp_path, monkeypatch):
  import datasets  # the [hf] extra's (and the test extra's)
  monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'cache'))
  datasets.DatasetDict(
      {'train': datasets.Dataset.from_list(ROWS),
       'validation': datasets.Dataset.from_list(VALID)}).save_to_disk(str(tmp_path / 'saved'))
  saved = file_tasks.make_source('hf', str(tmp_path / 'saved'), 'test')
  assert saved.splits == ('train', 'validation')
  assert list(saved.get('train')) == ROWS and list(saved.get('validation')) == VALID
  # A folder of Parquet files named by split, as `datasets.load_dataset(folder)` reads one.
  (tmp_path / 'files').mkdir()
  write_parquet(tmp_path / 'files' / 'train.parquet', ROWS)
  write_parquet(tmp_path / 'files' / 'validation.parquet', VALID)
  files = file_tasks.make_source('hf', str(tmp_path / 'files'), 'test')
  assert list(files.get('train')) == ROWS and list(files.get('validation')) == VALID
  # One saved Dataset per split through '{split}'.
  datasets.Dataset.from_list(VALID).save_to_disk(str(tmp_path / 'per' / 'validation'))
  per = file_tasks.make_source('hf', str(tmp_path / 'per' / '{split}'), 'test')
  assert list(per.get('validation')) == VALID


def batches(name, n=None, **kw):
  kw.setdefault('process_index', 0)
  kw.setdefault('process_count', 1)
  kw.setdefault('feature_lengths', {'inputs': 32, 'targets': 16})
  it = pipeline.make_task_iterator(name, global_batch_size=kw.pop('batch', 4), seed=0,
                                   vocabulary=BYTES, **kw)
  out = []
  while n is None or len(out) < n:  # n None: to the end (repeat=False)
    try:
      out.append(next(it))
    except StopIteration:
      break
  return out, it


def test_supervised_maps_the_columns_to_inputs_and_targets(tmp_path, register):
  write_jsonl(tmp_path / 'train.jsonl', ROWS)
  task = register(f'jsonl:{tmp_path}/train.jsonl', fields='inputs=a,targets=n')
  assert task.name == f'data.source=jsonl:{tmp_path}/train.jsonl (supervised, inputs=a,targets=n)'
  out, _ = batches(task.name, pack=False, shuffle=False, repeat=False, batch=23)
  b = out[0]
  for i, row in enumerate(ROWS):
    inputs = byte_ids(row['a']) + [1]  # EOS
    targets = byte_ids(row['n']) + [1]
    assert b['encoder_input_tokens'][i].tolist() == inputs + [0] * (32 - len(inputs))
    assert b['decoder_target_tokens'][i].tolist() == targets + [0] * (16 - len(targets))


def test_span_corruption_and_prefix_lm_objectives(tmp_path, register):
  text = 'the quick brown fox jumps over the lazy dog ' * 3
  (tmp_path / 'c.txt').write_text(f'{text}\n{text[:40]}\n', encoding='utf-8')
  docs = [byte_ids(text), byte_ids(text[:40])]
  span = register(f'text:{tmp_path}/c.txt', fields='inputs=text', objective='span_corruption')
  prefix = register(f'text:{tmp_path}/c.txt', fields='inputs=text', objective='prefix_lm')
  sentinel0 = BYTES.vocab_size - 1  # T5's <extra_id_0>: the highest id
  for name in (span.name, prefix.name):
    out, _ = batches(name, pack=False, shuffle=False, repeat=False, batch=2)
    b = out[0]
    for row, doc in enumerate(docs):
      inputs = [t for t in b['encoder_input_tokens'][row].tolist() if t]
      targets = [t for t in b['decoder_target_tokens'][row].tolist() if t]
      assert inputs[-1] == targets[-1] == 1
      inputs, targets = inputs[:-1], targets[:-1]
      if name == prefix.name:  # a contiguous window of the text, split in two non-empty parts
        window = inputs + targets
        assert inputs and targets
      else:  # each sentinel in the inputs stands for the span that follows it in the targets
        assert targets[0] == sentinel0 and sentinel0 in inputs
        spans, current = {}, None
        for t in targets:
          if t >= BYTES.vocab_size - BYTES.extra_ids:
            current = spans.setdefault(t, [])
          else:
            current.append(t)
        window = [u for t in inputs for u in (spans[t] if t in spans else [t])]
        assert len(inputs) <= 31  # the chunk fills data.inputs_length at most (EOS included)
      assert any(doc[s:s + len(window)] == window for s in range(len(doc) - len(window) + 1))


def test_two_processes_read_disjoint_examples_covering_all(tmp_path, register):
  write_parquet(tmp_path / 'train.parquet', ROWS)
  task = register(f'parquet:{tmp_path}/train.parquet', fields='inputs=q,targets=n')
  seen = []
  for p in (0, 1):
    out, _ = batches(task.name, pack=False, shuffle=True, repeat=False, batch=4, process_index=p,
                     process_count=2)
    for b in out:
      seen += [tuple(x[x != 0].tolist()) for x in b['decoder_target_tokens'] if x.any()]
  expected = sorted(tuple(byte_ids(r['n']) + [1]) for r in ROWS)
  assert sorted(seen) == expected  # every example once: none twice, none missing


@pytest.mark.parametrize('fmt', ['jsonl', 'arrayrecord'])
def test_resume_from_a_saved_position_gives_the_same_batches(tmp_path, register, fmt):
  WRITERS[fmt](tmp_path / f'train.{fmt}', ROWS)
  task = register(f'{fmt}:{tmp_path}/train.{fmt}', fields='inputs=q,targets=a',
                  objective='supervised')
  _, it = batches(task.name, n=3, pack=True)  # packed, shuffled, endless: training's pipeline
  state = it.get_state()
  expected = [next(it) for _ in range(8)]  # past the end of the first epoch
  _, fresh = batches(task.name, n=0, pack=True)
  fresh.set_state(json.loads(json.dumps(state)))  # as the checkpoint stores it
  for want in expected:
    got = next(fresh)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_clear_errors(tmp_path, register):
  write_jsonl(tmp_path / 'train.jsonl', ROWS)
  with pytest.raises(ConfigError, match=r'FORMAT one of jsonl, tsv.*e\.g\. jsonl:x\.jsonl'):
    file_tasks.parse_source('x.jsonl')
  with pytest.raises(ConfigError, match=r'FORMAT one of.*e\.g\. jsonl:x\.csv$'):
    file_tasks.parse_source('csv:x.csv')
  with pytest.raises(ConfigError, match=r'e\.g\. parquet:gs://b/x\.parquet$'):
    file_tasks.parse_source('gs://b/x.parquet')
  with pytest.raises(ConfigError, match=r"'inputs=q,answer=a'.*unknown feature 'answer'"):
    file_tasks.parse_fields('inputs=q,answer=a', 'supervised')
  with pytest.raises(ConfigError, match=r'reads inputs and targets; map targets'):
    file_tasks.parse_fields('inputs=q', 'supervised')
  assert file_tasks.parse_fields('inputs=q', 'span_corruption') == {'inputs': 'q'}
  # A mapped column that is not there: named, with the columns there are, when the split opens.
  task = register(f'jsonl:{tmp_path}/train.jsonl', fields='inputs=question,targets=a')
  with pytest.raises(DataSourceError,
                     match=r"no column 'question' .*columns are \['a', 'n', 'q'\]"):
    batches(task.name, n=1)
  # A split the pattern has no '{split}' for: the hint says how to give one.
  task = register(f'jsonl:{tmp_path}/train.jsonl')
  with pytest.raises(ValueError, match=r"no split 'validation'.*no '\{split\}' in its pattern"):
    batches(task.name, n=1, split='validation', shuffle=False, repeat=False)
  # A column that is not text.
  write_jsonl(tmp_path / 'num.jsonl', [{'q': 'x', 'a': 3}])
  task = register(f'jsonl:{tmp_path}/num.jsonl')
  with pytest.raises(DataSourceError, match=r"column 'a' holds a int \('3'\), expected text"):
    batches(task.name, n=1)


def test_config_rule(tmp_path):
  c = config_files.load_config_file(str(REPO / 'configs' / 'finetune_files.py'))
  with pytest.raises(ConfigError, match=r"'jsonl:' names no files: set it"):
    file_tasks.check_config(c)
  with pytest.raises(ConfigError, match=r"'jsonl:' names no files: set it"):
    config_lib.validate(c, 8)  # one of the config's rules (t5lite/config_rules.py)
  c.data.source = f'jsonl:{tmp_path}/{{split}}.jsonl'
  with pytest.raises(ConfigError, match=r"no file matches .*train\.jsonl' \(the split 'train'\)"):
    file_tasks.check_config(c)
  write_jsonl(tmp_path / 'train.jsonl', ROWS)
  file_tasks.check_config(c)
  c.eval.every_steps = 100  # the validation loss reads the split 'validation': its files too
  with pytest.raises(ConfigError, match=r"no file matches .*validation\.jsonl' \(the split"):
    file_tasks.check_config(c)
  c.data.source = f'jsonl:{tmp_path}/train.jsonl'
  with pytest.raises(ConfigError, match=r"validates on split 'validation' .* no '\{split\}'"):
    file_tasks.check_config(c)
  c.eval.every_steps = 0
  for source in ('arrayrecord:gs://bucket/{split}.ar', 'hf:gs://bucket/dataset'):
    c.data.source = source  # their readers open local paths: refused now, not when read
    with pytest.raises(ConfigError, match='sources read local files only'):
      file_tasks.check_config(c)
  c.data.source = f'jsonl:{tmp_path}/train.jsonl'
  c.data.vocabulary = 'task'
  with pytest.raises(ConfigError, match="vocabulary='task' gives data.source no vocabulary"):
    file_tasks.check_config(c)


def test_train_on_a_jsonl_file_with_the_files_config(tmp_path, capsys):
  from t5lite import train
  write_jsonl(tmp_path / 'train.jsonl', ROWS)
  write_jsonl(tmp_path / 'validation.jsonl', VALID)
  argv = [
      '--config',
      str(REPO / 'configs' / 'finetune_files.py'), '--workdir',
      str(tmp_path / 'run'), f'--config.data.source=jsonl:{tmp_path}/{{split}}.jsonl',
      '--config.data.source_fields=inputs=q,targets=a', '--config.data.vocabulary=byte',
      '--config.model.vocab_size=384', '--config.model.dtype=float32',
      '--config.data.inputs_length=32', '--config.data.targets_length=16', '--config.train.steps=2',
      '--config.train.batch_size=8', '--config.train.log_every=1', '--config.eval.every_steps=2',
      '--config.checkpoint.every_steps=2'
  ]
  assert train.main(argv) == 0
  lines = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [1, 2] and 'eval/loss' in lines[1]
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['data']['task'].startswith(f'data.source=jsonl:{tmp_path}/{{split}}.jsonl')
  # The same command with one more step resumes; another mapping is another task: refused.
  assert train.main(argv + ['--config.train.steps=3']) == 0
  assert [json.loads(l)['step'] for l in open(tmp_path / 'run' / 'metrics.jsonl')] == [1, 2, 3]
  capsys.readouterr()
  changed = argv + ['--config.train.steps=4', '--config.data.source_fields=inputs=a,targets=q']
  assert train.main(changed) == 2
  assert 'data error: the data pipeline changed since the checkpoint: data.task' in \
      capsys.readouterr().err
  # Without data.source the config says what to set, before anything is built.
  assert train.main(argv[:4]) == 2
  assert "config.data.source='jsonl:' names no files" in capsys.readouterr().err


def test_parquet_and_jsonl_on_gcs(tmp_path, gcs):
  """gs:// patterns (the GCS emulator of conftest.py): the same rows as the local files."""
  from t5lite import files
  for fmt in ('parquet', 'jsonl'):
    for split, rows in (('train', ROWS), ('validation', VALID)):
      WRITERS[fmt](tmp_path / f'{split}.{fmt}', rows)
      files.write_bytes(f'{gcs.url}/data/{split}-0.{fmt}',
                        (tmp_path / f'{split}.{fmt}').read_bytes())
    source = file_tasks.make_source(fmt, f'{gcs.url}/data/{{split}}-*.{fmt}', 'test')
    assert list(source.get('train')) == ROWS and list(source.get('validation')) == VALID


def test_worker_processes_read_the_same_batches(tmp_path, register):
  """data.num_workers > 0: the task (its source, steps and vocabulary) crosses to grain's worker
  processes and gives the batches the training process gives."""
  write_parquet(tmp_path / 'train.parquet', ROWS)
  task = register(f'parquet:{tmp_path}/train.parquet', fields='inputs=q,targets=a')
  inline, _ = batches(task.name, n=4)
  workers, it = batches(task.name, n=4, num_workers=1)
  it.close()
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(inline, workers) for k in a)


def test_unreadable_files_are_named(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / 'bad.arrayrecord'), 'group_size:1')
  writer.write(b'\x08\x01a tf.train.Example, say')
  writer.close()
  (tmp_path / 'header.tsv').write_text('q\ta\n')
  (tmp_path / 'bad.parquet').write_text('not parquet\n')
  cases = [
      ('arrayrecord', 'bad.arrayrecord', r'bad\.arrayrecord: record 0 is not a UTF-8 JSON object'),
      ('tsv', 'header.tsv', r'header\.tsv: no examples .*expected a header line naming'),
      ('parquet', 'bad.parquet', r'bad\.parquet: not a readable Parquet file'),
      ('hf', 'none', r"no such folder '.*none'; expected a `datasets` save_to_disk folder"),
  ]
  for fmt, name, message in cases:
    with pytest.raises(DataSourceError, match=message):
      file_tasks.make_source(fmt, str(tmp_path / name), 'test').get('train')[0]
