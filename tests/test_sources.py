"""Local file sources (text lines, JSONL, TSV), in-memory/function sources, TFDS errors."""

import json

import pytest

from t5lite.data import sources as S


def test_jsonl_reads_back_across_shards(tmp_path):
  rows = [{'q': f'question {i}', 'a': i, 'nested': {'x': [i, i + 1]}} for i in range(7)]
  (tmp_path / 'd-00001.jsonl').write_text('\n'.join(json.dumps(r) for r in rows[4:]) + '\n',
                                          encoding='utf-8')
  (tmp_path / 'd-00000.jsonl').write_text('\n'.join(json.dumps(r) for r in rows[:4]) + '\n\n',
                                          encoding='utf-8')  # blank line skipped
  src = S.JsonlSource({'train': str(tmp_path / 'd-*.jsonl')})
  assert src.files('train') == [str(tmp_path / 'd-00000.jsonl'), str(tmp_path / 'd-00001.jsonl')]
  got = src.get('train')
  assert len(got) == 7 and src.num_examples('train') == 7
  assert [got[i] for i in range(7)] == rows  # shards in sorted path order
  assert got[5] == rows[5] and got[1:3] == rows[1:3]  # random access


def test_tsv_and_text_lines_read_back(tmp_path):
  (tmp_path / 'a.tsv').write_text('hello world\tbonjour\nnaïve "quote"\tnaïf\n', encoding='utf-8')
  src = S.TsvSource({'validation': str(tmp_path / 'a.tsv')}, ['en', 'fr'])
  assert list(src.get('validation')) == [{'en': 'hello world', 'fr': 'bonjour'},
                                         {'en': 'naïve "quote"', 'fr': 'naïf'}]
  (tmp_path / 'b.txt').write_text('line one\n\nline two\r\n', encoding='utf-8')
  (tmp_path / 'c.txt').write_text('line three', encoding='utf-8')  # no final newline
  t = S.TextLineSource({'train': [str(tmp_path / 'b.txt'), str(tmp_path / 'c.txt')]})
  assert list(t.get('train')) == [{'text': 'line one'}, {'text': 'line two'},
                                  {'text': 'line three'}]


def test_bad_lines_name_file_and_line(tmp_path):
  (tmp_path / 'bad.jsonl').write_text('{"a": 1}\n{not json}\n[1, 2]\n')
  src = S.JsonlSource({'train': str(tmp_path / 'bad.jsonl')}).get('train')
  assert src[0] == {'a': 1}
  with pytest.raises(ValueError, match=r'bad.jsonl:2: not valid JSON'):
    src[1]
  with pytest.raises(ValueError, match=r'bad.jsonl:3: expected a JSON object'):
    src[2]
  (tmp_path / 'bad.tsv').write_text('a\tb\tc\n')
  with pytest.raises(ValueError, match=r'bad.tsv:1: 3 tab-separated columns, expected 2'):
    S.TsvSource({'train': str(tmp_path / 'bad.tsv')}, ['x', 'y']).get('train')[0]


def test_missing_files_and_splits(tmp_path):
  src = S.JsonlSource({'train': str(tmp_path / 'nothing-*.jsonl')})
  with pytest.raises(FileNotFoundError, match="split 'train': no file matches .*nothing-"):
    src.get('train')
  with pytest.raises(ValueError, match="no split 'test'"):
    src.get('test')


def test_in_memory_and_function_sources():
  m = S.InMemorySource({'train': [{'x': 1}, {'x': 2}]})
  assert m.splits == ('train',) and list(m.get('train')) == [{'x': 1}, {'x': 2}]
  calls = []

  def fn(split):
    calls.append(split)
    return [{'split': split, 'i': i} for i in range(3)]

  f = S.FunctionSource(fn, splits=['train', 'validation'])
  assert f.get('validation')[2] == {'split': 'validation', 'i': 2}
  assert f.num_examples('validation') == 3 and calls == ['validation']  # cached


def test_tfrecord_only_without_tensorflow_names_the_extra(monkeypatch):
  import tensorflow_datasets as tfds

  def fake_data_source(name, split, data_dir=None):
    raise NotImplementedError(f'Dataset {name} has file format tfrecord; data_source needs '
                              'array_record.')

  monkeypatch.setattr(tfds, 'data_source', fake_data_source)
  monkeypatch.setattr(S, '_has_tensorflow', lambda: False)
  with pytest.raises(RuntimeError, match=r'pip install t5lite\[tf\]'):
    S.TfdsSource('glue/cola').get('train')


def test_tfds_other_errors_pass_through(monkeypatch):
  import tensorflow_datasets as tfds

  def fake_data_source(name, split, data_dir=None):
    raise FileNotFoundError(f'no dataset {name} in {data_dir}')

  monkeypatch.setattr(tfds, 'data_source', fake_data_source)
  with pytest.raises(FileNotFoundError, match='no dataset'):
    S.TfdsSource('mine', data_dir='/nowhere').get('train')
