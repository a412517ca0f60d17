"""Bad inputs to the jobs (issue 14): each is one line naming the file, line or field, exit status 2
(the command or its input) or 1 (the run), no traceback, and nothing half-done on disk.

Most cases run the jobs' main() in-process (a tiny float32 model, checkpoints written directly);
SIGTERM at start-up runs the real command lines in subprocesses, with a config file that sends the
signal to its own process while it is loaded.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite import checkpoints, cli, convert, hf, infer, init_from, train, trainer
from t5lite import config as config_lib
from t5lite import config_files
from t5lite import eval as eval_lib
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model
from test_eval_cli import echo_config

TINY = echo_config('bad_inputs_echo', 'alpha beta gamma', 2)


def one_line(err: str) -> str:
  assert 'Traceback' not in err, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  return lines[0]


def run_job(capsys, main, argv):
  """(exit status, the one line on stderr)."""
  code = main(argv)
  return code, one_line(capsys.readouterr().err)


def nothing(invocation):
  del invocation


def parse_only(argv):
  """The command line and config file stage every job shares."""
  return cli.main(argv, nothing, usage='')


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """The tiny config file, a run with a checkpoint of step 2, and a HF copy of its params."""
  root = tmp_path_factory.mktemp('bad_inputs')
  config_path = root / 'tiny.py'
  config_path.write_text(TINY)
  config = config_files.load_config_file(str(config_path))
  model_config = ModelConfig.from_config(config.model)
  model = make_model(model_config)
  example = {
      'encoder_input_tokens': np.ones((1, 16), np.int32), 'decoder_input_tokens': np.ones((1, 8),
                                                                                          np.int32)
  }
  params = nn.meta.unbox(jax.jit(lambda k: model.init(k, **example))(jax.random.PRNGKey(0)))
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params['params'], opt_state={})
  ckpt = checkpoints.Checkpointer(str(root / 'run'), async_save=False)
  ckpt.save(2, state, {}, json.loads(json.dumps(config.to_dict(), default=str)))
  ckpt.close()
  hf.save_hf(jax.tree.map(np.asarray, params['params']), config.model.to_dict(), str(root / 'hf'))
  return {'root': root, 'config': str(config_path), 'run': str(root / 'run')}


@pytest.fixture
def immutable(tmp_path):
  """A folder that even root cannot write in (chattr +i), made writable again afterwards."""
  folder = tmp_path / 'immutable'
  folder.mkdir()
  subprocess.run(['chattr', '+i', str(folder)], check=True)
  try:
    yield folder
  finally:
    subprocess.run(['chattr', '-i', str(folder)], check=True)


# --- config files -----------------------------------------------------------------------------


def config_file(tmp_path, body: str) -> str:
  path = tmp_path / 'bad.py'
  path.write_text('from t5lite.config import base_config\n'
                  'from t5lite.models.presets import model_config\n'
                  '\n'
                  'def get_config(arg=None):\n'
                  '  c = base_config()\n'
                  '  c.model = model_config("tiny")\n' + body + '  return c\n')
  return str(path)


@pytest.mark.parametrize(
    'body, expected',
    [
        ('  c.train.stepz = 3\n',
         "line 7: unknown config key 'train.stepz'. Did you mean 'train.steps'?"),
        # model is replaced by a fresh ConfigDict: the check after loading still finds the line.
        ('  c.train.steps = 3\n  c.model.dtyp = "float32"\n',
         "line 8: unknown config key 'model.dtyp'. Did you mean 'model.dtype'?"),
        ('  c.train.update(steps=3,\n                 stepz=4)\n', 'line 8: unknown config key '
         "'train.stepz'"),
        ('  c.train.steps = (\n', 'line 7: '),  # a syntax error: Python's message follows
        ('  c.train.steps = 1 // 0\n', 'line 7: ZeroDivisionError: integer division or modulo by '
         'zero'),
        ('  c.train.steps = 2.5\n', 'line 7: TypeError: Could not override field'),
        ('  c = {}\n', 'get_config returned a dict, not an ml_collections.ConfigDict'),
    ])
def test_a_bad_config_file_names_the_file_and_line(tmp_path, capsys, body, expected):
  path = config_file(tmp_path, body)
  code, line = run_job(capsys, parse_only, ['--config', path])
  assert code == 2
  assert line.startswith(f'config error: --config: {path}'), line
  assert expected in line, line


def test_a_config_file_without_get_config(tmp_path, capsys):
  path = tmp_path / 'empty.py'
  path.write_text('x = 1\n')
  code, line = run_job(capsys, parse_only, ['--config', str(path)])
  assert code == 2 and line == (f'config error: --config: {path} defines no get_config(arg=None) '
                                'function')


@pytest.mark.parametrize('dotted, value', [('optimizer.learning_rate', float('inf')),
                                           ('model.dropout_rate', float('nan')),
                                           ('reporting.peak_flops_per_device', float('-inf'))])
def test_every_float_must_be_finite(dotted, value):
  c = config_lib.base_config()
  section, name = dotted.split('.')
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, 1)
  assert str(e.value) == f'config.{dotted}={value} is not a finite number'


def test_an_infinite_override_exits_2_before_anything_is_written(env, tmp_path, capsys):
  output = tmp_path / 'out.jsonl'
  code, line = run_job(capsys, infer.main, [
      '--config', env['config'], '--config.optimizer.learning_rate=1e999', '--workdir', env['run'],
      '--input', '/dev/null', '--output',
      str(output)
  ])
  assert (code, line) == (2, 'config error: config.optimizer.learning_rate=inf is not a finite '
                          'number')
  assert not output.exists()


# --- workdirs and output files ----------------------------------------------------------------


def workdir_job(invocation):
  cli.require_workdir(invocation, 'the run folder')


def test_a_workdir_that_is_a_file_or_cannot_be_written(env, tmp_path, immutable, capsys):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  cases = [
      (a_file, f'--workdir {a_file}: is a file, not a folder'),
      (a_file / 'run', f'--workdir {a_file}/run: {a_file} is a file, not a folder'),
      (immutable, f'--workdir {immutable}: cannot write in {immutable} (Operation not permitted)'),
      (immutable / 'run',
       f'--workdir {immutable}/run: cannot write in {immutable} (Operation not permitted)'),
  ]
  for workdir, message in cases:
    code, line = run_job(capsys, lambda argv: cli.main(argv, workdir_job, usage=''),
                         ['--config', env['config'], '--workdir',
                          str(workdir)])
    assert (code, line) == (2, f'config error: {message}')
  assert os.listdir(immutable) == []
  # eval writes WORKDIR/eval and reads WORKDIR/checkpoints: a missing run is an error, not a
  # folder it makes.
  missing = tmp_path / 'no_run'
  for workdir, message in [(a_file, 'is a file, not a folder'), (missing, 'no such folder')]:
    code, line = run_job(capsys, eval_lib.main,
                         ['--config', env['config'], '--workdir',
                          str(workdir)])
    assert (code, line) == (2, f'config error: --workdir {workdir}: {message}')
  assert not missing.exists()


def no_model(*args, **kwargs):
  raise AssertionError('a model was built or loaded before the output was checked')


def test_infer_output_is_checked_before_the_model(env, tmp_path, immutable, capsys, monkeypatch):
  inputs = tmp_path / 'in.jsonl'
  inputs.write_text('{"inputs": "say alpha"}\n')
  monkeypatch.setattr(cli, 'build', no_model)
  cases = [
      (tmp_path / 'missing' / 'out.jsonl', f'the folder {tmp_path}/missing does not exist'),
      (immutable / 'out.jsonl', f'cannot write in {immutable} (Operation not permitted)'),
      (tmp_path, 'is a folder, not a file'),
  ]
  for output, message in cases:
    code, line = run_job(capsys, infer.main, [
        '--config', env['config'], '--workdir', env['run'], '--input',
        str(inputs), '--output',
        str(output)
    ])
    assert (code, line) == (2, f'config error: --output {output}: {message}')
  assert not (tmp_path / 'missing').exists() and os.listdir(immutable) == []


# --- infer inputs -------------------------------------------------------------------------------


def test_infer_on_an_empty_input_checks_the_checkpoint_then_writes_an_empty_output(
    env, tmp_path, capsys, monkeypatch):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  output = tmp_path / 'out.jsonl'
  argv = ['--config', env['config'], '--input', str(empty), '--output', str(output)]
  for flags, message in [
      (['--workdir', env['run'], '--checkpoint', '7'], 'no complete checkpoint of step 7 in '
       f'{env["run"]}/checkpoints (complete steps: 2)'),
      (['--checkpoint', 'latest'], '--checkpoint latest needs --workdir'),
      (['--checkpoint', str(tmp_path / 'nope')], f'--checkpoint {tmp_path}/nope: no complete '
       't5lite checkpoint there'),
  ]:
    code, line = run_job(capsys, infer.main, argv + flags)
    assert code == 2 and line.startswith(f'infer: {message}'), line
    assert not output.exists()
  monkeypatch.setattr(init_from, 'load_params', no_model)  # nothing to decode: never loaded
  assert infer.main(argv + ['--workdir', env['run']]) == 0
  assert 'no inputs' in capsys.readouterr().out
  assert output.read_bytes() == b''


def test_infer_input_that_is_not_utf8_names_the_file_and_line(env, tmp_path, capsys):
  inputs = tmp_path / 'latin1.jsonl'
  bad_line = b'{"inputs": "caf\xe9"}\n'  # Latin-1, not UTF-8
  inputs.write_bytes(b'{"inputs": "say alpha"}\n\n' + bad_line)
  output = tmp_path / 'out.jsonl'
  code, line = run_job(capsys, infer.main, [
      '--config', env['config'], '--workdir', env['run'], '--input',
      str(inputs), '--output',
      str(output)
  ])
  assert code == 2
  byte = bad_line.index(b'\xe9') + 1
  assert line.startswith(f'infer: {inputs}: line 3: not UTF-8 text (byte {byte} of the line)'), line
  assert not output.exists()


@pytest.mark.parametrize('flags, message', [
    (['--task', 'no_such_task'], 'infer: --task no_such_task: no task or mixture named'),
    (['--task', 'downstream_mix'], "infer: --task downstream_mix: 'downstream_mix' is a mixture"),
    (['--task', 'bad_inputs_echo', '--split', 'nope'
     ], "infer: --split nope: task 'bad_inputs_echo' has only the splits ['train', 'validation']"),
    (['--input', '/dev/null', '--checkpoint', 'all'], 'config error: --checkpoint all is for '
     't5lite.eval'),
    (['--input', '/nonexistent.jsonl'], 'infer: --input /nonexistent.jsonl: cannot read it'),
    (['--input', '/dev/null', '--task', 'bad_inputs_echo'], 'config error: give exactly one of'),
    (['--input', '/dev/null', '--bogus=1'], "config error: Unknown command line flag 'bogus'"),
])
def test_infer_bad_flags(env, tmp_path, capsys, flags, message):
  output = tmp_path / 'out.jsonl'
  code, line = run_job(
      capsys, infer.main,
      ['--config', env['config'], '--workdir', env['run'], '--output',
       str(output), *flags])
  assert code == 2 and line.startswith(message), line
  assert not output.exists()


@pytest.mark.parametrize('flags, message', [
    (['--config.eval.tasks=("no_such_task",)'], "config error: config.eval.tasks='no_such_task': "
     'no task or mixture named'),
    (['--config.eval.tasks=("downstream_mix",)'], 'config error: config.eval.tasks: '
     "'downstream_mix' is a mixture, not a task; list its tasks instead"),
    (['--config.eval.split=nope'], "config error: config.eval.split='nope': task"),
    (['--checkpoint', '9'], 'eval: no complete checkpoint of step 9'),
    (['--poll_seconds=abc'], 'config error: flag --poll_seconds=abc'),
])
def test_eval_bad_flags(env, capsys, flags, message):
  code, line = run_job(capsys, eval_lib.main,
                       ['--config', env['config'], '--workdir', env['run'], *flags])
  assert code == 2 and line.startswith(message), line


def test_eval_checkpoint_all_on_an_empty_workdir(env, tmp_path, capsys):
  code, line = run_job(
      capsys, eval_lib.main,
      ['--config', env['config'], '--workdir',
       str(tmp_path), '--checkpoint', 'all'])
  assert (code, line) == (2, f'eval: no complete checkpoint in {tmp_path}/checkpoints')
  assert os.listdir(tmp_path) == []


# --- HuggingFace files ------------------------------------------------------------------------


def truncated_hf(env, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  copy = tmp_path / 'hf_truncated'
  shutil.copytree(env['root'] / 'hf', copy)
  weights = copy / 'model.safetensors'
  weights.write_bytes(weights.read_bytes()[:-1000])
  return copy, weights


def test_a_truncated_safetensors_file_is_named_and_exits_1(env, tmp_path, capsys):
  model, weights = truncated_hf(env, tmp_path)
  out = tmp_path / 'converted'
  code, line = run_job(
      capsys, convert.main,
      ['hf-to-t5lite', '--model', str(model), '--out',
       str(out)])
  assert code == 1
  assert line.startswith(
      f'convert error: {weights}: cannot read the weights (SafetensorError'), line
  assert not out.exists()
  # The same file as checkpoint.init_from=hf:DIR of a training run.
  workdir = tmp_path / 'run'
  code, line = run_job(capsys, train.main, [
      '--config', env['config'], '--workdir',
      str(workdir), f'--config.checkpoint.init_from=hf:{model}'
  ])
  assert code == 1
  assert line.startswith(f'checkpoint error: checkpoint.init_from=hf:{model}: {weights}: cannot '
                         'read the weights'), line
  assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')


@pytest.mark.parametrize('argv, code, message', [
    (['t5lite-to-hf', '--checkpoint', '/nonexistent', '--out', 'OUT'
     ], 2, 'convert error: --checkpoint /nonexistent: no such path'),
    (['hf-to-t5lite', '--model', '/nonexistent', '--out', 'OUT'
     ], 2, 'convert error: --model /nonexistent: no such directory'),
    (['hf-to-t5lite', '--model', 'HF', '--out', 'A_FILE'
     ], 2, 'convert error: --out A_FILE: is a file, not a folder'),
    (['t5lite-to-hf', '--checkpoint', 'RUN', '--out', 'A_FILE'
     ], 2, 'convert error: --out A_FILE: is a file, not a folder'),
])
def test_convert_bad_paths(env, tmp_path, capsys, argv, code, message):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  names = {
      'OUT': str(tmp_path / 'out'), 'A_FILE': str(a_file), 'HF': str(env['root'] / 'hf'),
      'RUN': env['run']
  }
  argv = [names.get(a, a) for a in argv]
  message = message.replace('A_FILE', str(a_file))
  assert run_job(capsys, convert.main, argv) == (code, message)
  assert not (tmp_path / 'out').exists()


def test_convert_missing_arguments_is_usage_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    convert.main(['hf-to-t5lite', '--model', 'x'])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'Traceback' not in err and 'the following arguments are required: --out' in err


# --- SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_in_a_job_is_a_message_and_exit_0(capsys):
  before = signal.getsignal(signal.SIGTERM)
  cleaned = []

  def body():
    try:
      os.kill(os.getpid(), signal.SIGTERM)
      raise AssertionError('SIGTERM did not stop the job')
    finally:
      cleaned.append(True)  # the job's `finally` blocks still run

  assert cli.run_main(body, stopped='job: stopped by SIGTERM') == 0
  assert capsys.readouterr().err == 'job: stopped by SIGTERM\n' and cleaned == [True]
  assert signal.getsignal(signal.SIGTERM) is before  # restored on the way out


def test_sigterm_during_convert(env, tmp_path, capsys, monkeypatch):

  def load_hf(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError('SIGTERM did not stop the job')

  monkeypatch.setattr(hf, 'load_hf', load_hf)
  code, line = run_job(
      capsys, convert.main,
      ['hf-to-t5lite', '--model',
       str(env['root'] / 'hf'), '--out',
       str(tmp_path / 'out')])
  assert (code, line) == (0, 'convert: stopped by SIGTERM before it finished; remove --out and '
                          'run again')


SIGTERM_CONFIG = textwrap.dedent('''
    import os, signal
    from t5lite.config import base_config

    def get_config(arg=None):
      os.kill(os.getpid(), signal.SIGTERM)  # as if sent while the job starts
      return base_config()
    ''')


@pytest.mark.parametrize('job, flags, message', [
    ('train', [], 'stopped by SIGTERM before the first step: nothing to save yet'),
    ('eval', [], 'eval: stopped by SIGTERM'),
    ('infer', ['--input', '/dev/null', '--output', 'OUT'], 'infer: stopped by SIGTERM'),
])
def test_sigterm_at_start_up_exits_0_with_one_line(env, tmp_path, job, flags, message):
  config = tmp_path / 'sigterm.py'
  config.write_text(SIGTERM_CONFIG)
  flags = [str(tmp_path / 'out.jsonl') if f == 'OUT' else f for f in flags]
  result = subprocess.run([
      sys.executable, '-m', f't5lite.{job}', '--config',
      str(config), '--workdir', env['run'], *flags
  ], capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert one_line(result.stderr).startswith(message), result.stderr
  assert not (tmp_path / 'out.jsonl').exists()
