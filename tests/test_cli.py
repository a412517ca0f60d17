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
