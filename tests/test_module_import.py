"""--module_import (T5X's flag, repeatable) and config.imports: a user's task module, imported
before the config is validated, registers tasks the config can name; a module that cannot be
imported is one config error naming it, on every job and on inspect."""
import json
import pathlib
import sys
import textwrap

import pytest

from t5lite import cli, config_files
from t5lite import config as config_lib
from t5lite.data import inspect as inspect_lib
from t5lite.data import tasks as T

QUICKSTART = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'quickstart.py')

TASK_MODULE = '''
from t5lite.data import preprocessors as P, tasks
from t5lite.data.sources import InMemorySource
from t5lite.data.vocab import ByteVocabulary

feature = tasks.Feature(ByteVocabulary())
tasks.add_task({name!r}, InMemorySource({{'train': [{{'inputs': 'ab', 'targets': 'c'}}] * 8}}),
               [P.tokenize], {{'inputs': feature, 'targets': feature}}, overwrite=True)
'''


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
  """Writes modules into a package on sys.path; forgets them (and their tasks) afterwards."""
  monkeypatch.syspath_prepend(str(tmp_path))
  (tmp_path / 'my_project').mkdir()
  (tmp_path / 'my_project' / '__init__.py').write_text('')
  written = []

  def write(module, source):
    (tmp_path / 'my_project' / f'{module}.py').write_text(textwrap.dedent(source))
    written.append(f'my_project.{module}')
    return f'my_project.{module}'

  yield write
  for name in written + ['my_project']:
    sys.modules.pop(name, None)
  for name in ('user_task_a', 'user_task_b'):
    T.remove(name)


def test_module_import_registers_tasks_that_data_task_can_name(user_modules):
  a = user_modules('tasks_a', TASK_MODULE.format(name='user_task_a'))
  b = user_modules('tasks_b', TASK_MODULE.format(name='user_task_b'))
  argv = ['--config', QUICKSTART, '--config.data.task=user_task_b']
  config = config_files.load_config_file(QUICKSTART)
  config.data.task = 'user_task_b'
  with pytest.raises(config_lib.ConfigError, match="no task or mixture named 'user_task_b'"):
    config_lib.validate(config, 8)  # nothing imported it yet
  invocation = cli.parse(argv + [f'--module_import={a}', '--module_import', b])
  assert invocation.config.imports == (a, b)  # recorded, so the workdir's config.json has them
  assert {'user_task_a', 'user_task_b'} <= set(T.names())
  config_lib.validate(invocation.config, 8)
  # Named twice (flag and config): imported once, listed once.
  again = cli.parse(argv + [f'--module_import={a}', f'--config.imports=("{a}",)'])
  assert again.config.imports == (a,)


def test_config_imports_alone_are_imported_by_build(user_modules):
  name = user_modules('tasks_a', TASK_MODULE.format(name='user_task_a'))
  config = config_files.load_config_file(QUICKSTART)
  config.data.task = 'user_task_a'
  config.imports = (name,)
  assert cli.build(config).cfg.data.task == 'user_task_a'  # a program calls build, not parse


def test_import_errors_name_the_module(user_modules):
  broken = user_modules('broken', 'x = 1\nraise RuntimeError("no data dir")\n')
  with pytest.raises(config_lib.ConfigError,
                     match=r"no module named 'my_project\.nope' on the Python path"):
    T.import_modules(['my_project.nope'])
  with pytest.raises(
      config_lib.ConfigError,
      match=r"module 'my_project\.broken' failed to import: RuntimeError: no data "
      r'dir \(at .*my_project/broken\.py:2\)'):
    T.import_modules([broken])
  # A dependency the module lacks is that module's failure, not a missing module of the user's.
  needs = user_modules('needs', 'import not_installed_anywhere_xyz\n')
  with pytest.raises(
      config_lib.ConfigError, match=r"module 'my_project\.needs' failed to import: "
      r"ModuleNotFoundError: No module named 'not_installed_anywhere_xyz'"):
    T.import_modules([needs])
  with pytest.raises(config_lib.ConfigError, match=r"config.imports='x.y': must be a tuple"):
    T.import_modules('x.y')


@pytest.mark.parametrize('job', ['train', 'eval', 'infer'])
def test_every_job_reports_a_module_it_cannot_import(job, tmp_path, capsys):
  main = __import__(f't5lite.{job}', fromlist=['main']).main
  argv = ['--config', QUICKSTART, '--workdir', str(tmp_path), '--module_import=no_such_mod_17']
  if job == 'infer':
    argv += ['--input', str(tmp_path / 'in.jsonl'), '--output', str(tmp_path / 'out.jsonl')]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert "config error: --module_import / config.imports: no module named 'no_such_mod_17'" in err


def test_inspect_imports_modules_and_reads_a_source(user_modules, tmp_path, capsys):
  name = user_modules('tasks_a', TASK_MODULE.format(name='user_task_a'))
  lengths = ['--lengths', 'inputs=8,targets=4', '--n', '1', '--batches', '1', '--batch_size', '2']
  assert inspect_lib.main(['--module_import', name, '--task', 'user_task_a', *lengths]) == 0
  out = capsys.readouterr().out
  assert "== Task('user_task_a')" in out and 'inputs  (3 tokens): ab' in out
  assert inspect_lib.main(['--module_import', 'no_such_mod_17', '--task', 'x', *lengths]) == 2
  assert "no module named 'no_such_mod_17'" in capsys.readouterr().err
  (tmp_path / 'd.jsonl').write_text(json.dumps({'q': 'hello', 'a': 'world'}) + '\n')
  source = ['--source', f'jsonl:{tmp_path}/d.jsonl', '--source_fields', 'inputs=q,targets=a']
  assert inspect_lib.main([*source, '--vocabulary', 'byte', *lengths]) == 0
  out = capsys.readouterr().out
  assert 'inputs  (6 tokens): hello' in out and 'targets (4 tokens): wor' in out
  T.remove(f'data.source=jsonl:{tmp_path}/d.jsonl (supervised, inputs=q,targets=a)')
  # A missing file or an unusable vocabulary is one line, as in the jobs' validation.
  assert inspect_lib.main(['--source', f'jsonl:{tmp_path}/none.jsonl', *lengths]) == 2
  assert 'none.jsonl' in capsys.readouterr().err
  assert inspect_lib.main([*source, '--vocabulary', 'task', *lengths]) == 2
  assert "vocabulary='task' gives data.source no vocabulary" in capsys.readouterr().err
