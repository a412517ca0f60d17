"""t5lite.cli.run_main: the error-to-exit-code mapping the train, eval and infer mains share."""
import pytest

from t5lite import checkpoints, cli
from t5lite import config as config_lib


def raising(error):

  def job():
    raise error

  return job


@pytest.mark.parametrize('error, code, line', [
    (config_lib.ConfigError('bad key x'), 2, 'config error: bad key x\n'),
    (checkpoints.CheckpointError('corrupt step 3'), 1, 'checkpoint error: corrupt step 3\n'),
    (FloatingPointError('loss is nan'), 1, 'training stopped: loss is nan\n'),
])
def test_known_errors_become_one_line_and_an_exit_code(error, code, line, capsys):
  assert cli.run_main(raising(error), [(FloatingPointError, 'training stopped', 1)]) == code
  assert capsys.readouterr().err == line


def test_success_is_zero_and_unknown_errors_propagate(capsys):
  assert cli.run_main(lambda: None) == 0 and capsys.readouterr().err == ''
  with pytest.raises(FloatingPointError):  # not one of this job's kinds
    cli.run_main(raising(FloatingPointError('x')))


def test_the_jobs_own_kinds_come_first(capsys):

  class MissingRun(config_lib.ConfigError):
    pass

  assert cli.run_main(raising(MissingRun('no run')), [(MissingRun, 'eval', 3)]) == 3
  assert capsys.readouterr().err == 'eval: no run\n'


# --- the command line (absl flags + ml_collections config_flags) -------------------------------

QUICKSTART = 'configs/quickstart.py'


@pytest.mark.parametrize('job', ['train', 'eval', 'infer'])
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_the_flags_and_exits_0(job, flag):
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  out = subprocess.run([sys.executable, '-m', f't5lite.{job}', flag], capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  for name in ('--config', '--workdir', '--flagfile', '--coordinator_address'):
    assert name in out.stdout, (name, out.stdout)
  if job == 'eval':
    assert '--checkpoint' in out.stdout and '--watch' in out.stdout
  if job == 'infer':
    assert '--input' in out.stdout and '--output' in out.stdout


def test_config_file_arg_overrides_and_workdir():
  inv = cli.parse([
      '--config', f'{QUICKSTART}:small', '--config.train.steps=7', '--config.optimizer.name',
      'adamw', '--workdir=/tmp/w'
  ])
  assert inv.workdir == '/tmp/w'
  assert (inv.config.train.steps, inv.config.optimizer.name) == (7, 'adamw')
  assert inv.config.model.d_model == 512  # the :small preset


def test_flagfile(tmp_path):
  flagfile = tmp_path / 'flags.txt'
  flagfile.write_text(f'--config={QUICKSTART}\n--config.train.steps=3\n--workdir=/tmp/x\n')
  inv = cli.parse([f'--flagfile={flagfile}', '--config.train.seed=5'])
  assert (inv.config.train.steps, inv.config.train.seed, inv.workdir) == (3, 5, '/tmp/x')


def test_job_flags_are_typed():
  flags = (cli.Flag('checkpoint', 'latest', 'which'), cli.Flag('watch', False, 'poll'),
           cli.Flag('timeout', 3600.0, 's'), cli.Flag('input', None, 'file', str))
  inv = cli.parse(['--config', QUICKSTART, '--watch', '--timeout=5', '--checkpoint', '30'], flags)
  assert inv.options == {'checkpoint': '30', 'watch': True, 'timeout': 5.0, 'input': None}


@pytest.mark.parametrize('argv, message', [
    (['--config', QUICKSTART, '--config.train.stepz=3'
     ], "unknown config key 'train.stepz'. Did you mean 'train.steps'?"),
    (['--config', QUICKSTART, '--config.train.steps=ten'], 'config.train.steps: expected int'),
    ([], '--config is required'),
    (['--config', 'configs/nope.py'], "no config file at 'configs/nope.py'"),
    (['--config', QUICKSTART, '--bogus=1'], "Unknown command line flag 'bogus'"),
    (['--config', QUICKSTART, 'stray'], 'unexpected argument(s) stray'),
])
def test_bad_command_lines_are_config_errors(argv, message):
  with pytest.raises(config_lib.ConfigError, match=None) as e:
    cli.parse(argv)
  assert message in str(e.value), str(e.value)


def test_a_bad_command_line_exits_2_with_one_line(capsys):
  from t5lite import train  # pylint: disable=import-outside-toplevel
  assert train.main(['--config', QUICKSTART, '--config.train.stepz=3', '--workdir', '/tmp/x']) == 2
  err = capsys.readouterr().err
  assert err.startswith("config error: unknown config key 'train.stepz'") and err.count('\n') == 1
