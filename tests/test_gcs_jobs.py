"""eval, infer, convert, vocabularies and file sources on gs:// (a GCS emulator on 127.0.0.1, the
`gcs` fixture of conftest.py), each checked against the same job on local paths.

The gs:// run is test_eval_cli's tiny run (checkpoints written by the Checkpointer, no training)
copied into the bucket with files.copy_tree, so these tests do not depend on training to gs://.
The jobs run as subprocesses from a temporary cwd, as a user starts them; after each test no local
`gs:` folder exists there or in the checkout.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_eval_cli import INPUTS, env, save  # pylint: disable=unused-import  (env: a fixture)

from t5lite import convert, files, hf
from t5lite import eval as eval_lib
from t5lite import infer
from t5lite.data import sources, tasks, train_vocab, vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code: str, gcs, cwd) -> str:
  """Runs `code` in a fresh interpreter against the emulator from `cwd`; its stdout."""
  result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=gcs.env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


@pytest.fixture
def no_local_gs(tmp_path):
  """After the test: nothing went to a local folder named 'gs:' (cwd or the checkout)."""
  yield
  for root in (tmp_path, REPO):
    assert not os.path.exists(os.path.join(root, 'gs:')), root
  for folder, dirs, _ in os.walk(tmp_path):
    assert 'gs:' not in dirs, folder


def run_copy(env, tmp_path, gcs, *steps):
  """(local workdir, its gs:// copy) holding checkpoints `steps`."""
  local = tmp_path / 'local'
  save(env, local, *steps)
  files.copy_tree(local, gcs.url + '/run')
  return str(local), gcs.url + '/run'


def without_time(record: dict) -> dict:
  return {k: v for k, v in record.items() if k != 'seconds'}


def test_eval_all_on_a_gs_run_equals_the_local_copy(env, tmp_path, gcs, no_local_gs, capsys):
  local, url = run_copy(env, tmp_path, gcs, 2, 4)
  # Step 2 first, then `all`: it must see step 2's result in the bucket and skip it.
  out = python(
      f'''
      import sys
      from t5lite import eval
      flags = ['--config', {env['config']!r}, '--workdir', {url!r},
               '--config.reporting.tensorboard=True']
      assert eval.main(flags + ['--checkpoint', '2']) == 0
      assert eval.main(flags + ['--checkpoint', 'all']) == 0
      ''', gcs, tmp_path)
  assert 'step 2: already evaluated' in out and 'evaluating step 4' in out, out
  assert eval_lib.main(['--config', env['config'], '--workdir', local, '--checkpoint', 'all']) == 0
  for step in (2, 4):
    got = json.loads(files.read_text(f'{url}/eval/cli_echo/step_{step}.json'))
    want = json.loads(open(f'{local}/eval/cli_echo/step_{step}.json').read())
    assert without_time(got) == without_time(want)
    assert got['num_examples'] == 10 and got['step'] == step
  objects = gcs.objects()
  assert f'{url}/eval/cli_echo/step_2.json' in objects
  assert any(o.startswith(f'{url}/eval/events.out.tfevents') for o in objects), objects


def test_infer_with_gs_input_and_output_equals_the_local_run(env, tmp_path, gcs, no_local_gs):
  local, url = run_copy(env, tmp_path, gcs, 4)
  lines = ''.join(l + '\n' for l in INPUTS)
  (tmp_path / 'in.jsonl').write_text(lines)
  files.write_text(f'{gcs.url}/in.jsonl', lines)
  flags = ['--config', env['config'], '--checkpoint', 'latest', '--config.infer.batch_size=8']
  assert infer.main(flags + [
      '--workdir', local, '--input',
      str(tmp_path / 'in.jsonl'), '--output',
      str(tmp_path / 'out.jsonl')
  ]) == 0
  want = (tmp_path / 'out.jsonl').read_bytes()
  # An interrupted earlier run left 8 complete lines and a cut-off one in the bucket.
  files.write_bytes(f'{gcs.url}/resumed.jsonl', b''.join(want.splitlines(True)[:8]) + want[-20:])
  gs_flags = flags + ['--workdir', url, '--input', f'{gcs.url}/in.jsonl']
  out = python(
      f'''
      from t5lite import infer
      assert infer.main({gs_flags!r} + ['--output', {gcs.url + '/out.jsonl'!r}]) == 0
      assert infer.main({gs_flags!r} + ['--output', {gcs.url + '/resumed.jsonl'!r}]) == 0
      ''', gcs, tmp_path)
  assert 'resuming: 8 of 10' in out, out
  assert files.read_bytes(f'{gcs.url}/out.jsonl') == want
  assert files.read_bytes(f'{gcs.url}/resumed.jsonl') == want
  assert len(want.splitlines()) == 10


def test_convert_both_ways_through_gs(env, tmp_path, gcs, no_local_gs):
  local, url = run_copy(env, tmp_path, gcs, 4)
  hf_url, back_url = gcs.url + '/hf', gcs.url + '/back'
  assert convert.main(['t5lite-to-hf', '--checkpoint', local, '--out', str(tmp_path / 'hf')]) == 0
  out = python(
      f'''
      from t5lite import convert
      assert convert.main(['t5lite-to-hf', '--checkpoint', {local!r}, '--out', {hf_url!r}]) == 0
      assert convert.main(['hf-to-t5lite', '--model', {hf_url!r}, '--out', 'back']) == 0
      assert convert.main(['hf-to-t5lite', '--model', {hf_url!r}, '--out', {back_url!r}]) == 0
      # The gs:// HF model evaluated straight from the bucket (hf:gs://..., read in memory).
      from t5lite import eval
      flags = ['--config', {env['config']!r}, '--workdir', {url!r}]
      assert eval.main(flags + ['--checkpoint', '4']) == 0
      assert eval.main(flags + ['--checkpoint', 'hf:' + {hf_url!r}]) == 0
      ''', gcs, tmp_path)
  assert f'reading the HuggingFace model {hf_url}' in out, out
  assert f'writing the HuggingFace model {hf_url}' in out, out
  # The HF files in the bucket are the ones a local conversion writes, byte for byte.
  for name in ('model.safetensors', 'config.json', 'generation_config.json'):
    assert files.read_bytes(f'{hf_url}/{name}') == (tmp_path / 'hf' / name).read_bytes(), name
  # Read back from gs:// into a local and a gs:// t5lite checkpoint: the trained params exactly.
  want = hf.flatten(jax_to_numpy(env['state'].params))
  for back in (str(tmp_path / 'back'), back_url):
    _, params = convert._read_step(files.join(back, 'checkpoints', '0'))  # pylint: disable=protected-access
    got = hf.flatten(params)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
      np.testing.assert_array_equal(got[name], value, err_msg=name)
  assert f'{back_url}/model_config.json' in gcs.objects()
  # Its eval results (as step 0) are the trained checkpoint's (step 4), prediction for prediction.
  from_hf, from_run = (
      json.loads(files.read_text(f'{url}/eval/cli_echo/step_{step}.json')) for step in (0, 4))
  assert from_hf['examples'] and from_hf['examples'] == from_run['examples']
  assert from_hf['metrics'] == from_run['metrics']
  # checkpoint.init_from='hf:gs://...' reads through hf.load_flat_for_init: the same as locally.
  assert hf.is_model_dir(hf_url) and not hf.is_model_dir(back_url)
  from_gs = hf.load_flat_for_init(hf_url, False)
  from_local = hf.load_flat_for_init(str(tmp_path / 'hf'), False)
  assert sorted(from_gs) == sorted(from_local)
  for name, value in from_local.items():
    np.testing.assert_array_equal(from_gs[name], value, err_msg=name)


def jax_to_numpy(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.map(np.asarray, jax.device_get(tree))


ANIMALS = ('fox', 'cat', 'owl', 'hen', 'yak', 'emu', 'gnu')
SENTENCES = [
    f'the {("quick", "slow", "lazy", "brown")[i % 4]} {ANIMALS[i % 7]} jumps over dog number {i}'
    for i in range(100)
]


def test_a_vocabulary_and_file_sources_on_gs(tmp_path, gcs, no_local_gs, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  # Shards of a text, a JSON-lines and a TSV source, locally and in the bucket alike.
  shards = {'a': SENTENCES[:50], 'b': SENTENCES[50:]}
  for name, part in shards.items():
    for root in (str(tmp_path), gcs.url):
      files.write_text(f'{root}/data/lines-{name}.txt', '\n'.join(part) + '\n\n')
      files.write_text(f'{root}/data/rows-{name}.jsonl',
                       ''.join(json.dumps({'text': s, 'n': len(s)}) + '\n' for s in part))
      files.write_text(f'{root}/data/rows-{name}.tsv', ''.join(f'{s}\t{len(s)}\n' for s in part))
  for pattern, make in (('lines-*.txt', sources.TextLineSource), ('rows-?.jsonl',
                                                                  sources.JsonlSource),
                        ('rows-[ab].tsv', lambda p: sources.TsvSource(p, ('text', 'n')))):
    local, remote = make({'train': f'{tmp_path}/data/{pattern}'
                         }), make({'train': f'{gcs.url}/data/{pattern}'})
    assert remote.files('train') == [
        f'{gcs.url}/data/{os.path.basename(f)}' for f in local.files('train')
    ]
    got, want = remote.get('train'), local.get('train')
    assert len(got) == len(want) == len(SENTENCES)
    assert [got[i] for i in range(len(got))] == [want[i] for i in range(len(want))]
    assert got[len(got) - 1]['text'] == SENTENCES[-1]
  with pytest.raises(sources.DataFileNotFoundError, match='no file matches'):
    sources.TextLineSource({'train': f'{gcs.url}/data/none-*.txt'}).get('train')

  # A vocabulary trained from a task whose files are on gs://, written to gs://: the same bytes
  # as one trained from the local files into a local file; then loaded from the bucket.
  for name, root in (('gcs_vocab_text', gcs.url), ('local_vocab_text', str(tmp_path))):
    tasks.add_task(name, sources.TextLineSource({'train': f'{root}/data/lines-*.txt'}), [],
                   {'targets': tasks.Feature(vocab.ByteVocabulary())}, overwrite=True)
  try:
    assert train_vocab.main(
        ['--task', 'gcs_vocab_text', '--out', f'{gcs.url}/sp.model', '--vocab_size', '48']) == 0
    assert train_vocab.main(
        ['--task', 'local_vocab_text', '--out', 'sp.model', '--vocab_size', '48']) == 0
  finally:
    tasks.remove('gcs_vocab_text')
    tasks.remove('local_vocab_text')
  out = capsys.readouterr().out
  assert 'train_vocab: training a 48-piece SentencePiece model on 100 texts' in out, out
  assert files.read_bytes(f'{gcs.url}/sp.model') == (tmp_path / 'sp.model').read_bytes()
  remote = vocab.get_vocabulary(f'{gcs.url}/sp.model')
  local = vocab.SentencePieceVocabulary(str(tmp_path / 'sp.model'))
  assert remote.vocab_size == local.vocab_size == 148
  for text in SENTENCES[:5] + ['a <extra_id_3> b']:
    ids = vocab.encode_with_sentinels(remote, text)
    assert ids == vocab.encode_with_sentinels(local, text)
    assert remote.decode(ids) == local.decode(ids)
  with pytest.raises(FileNotFoundError, match='cannot read a SentencePiece model'):
    vocab.get_vocabulary(f'{gcs.url}/missing.model')


def test_a_gs_infer_output_is_uploaded_at_the_first_batch_then_at_most_every_upload_s(gcs):
  # pylint: disable=protected-access
  url = gcs.url + '/preds.jsonl'
  out = infer._Output(url, b'{"kept": 0}\n', upload_s=3600)
  out.write('{"batch": 1}\n')  # the first write: at once (a bucket that refuses fails early)
  assert files.read_text(url) == '{"kept": 0}\n{"batch": 1}\n'
  out.write('{"batch": 2}\n')  # within upload_s: kept in memory
  assert files.read_text(url) == '{"kept": 0}\n{"batch": 1}\n'
  out.close()  # the end (or an error, or SIGTERM: close runs in a finally)
  assert files.read_text(url) == '{"kept": 0}\n{"batch": 1}\n{"batch": 2}\n'
  infer._Output(gcs.url + '/empty.jsonl', b'').close()  # no inputs: an empty object
  assert files.read_text(gcs.url + '/empty.jsonl') == ''
