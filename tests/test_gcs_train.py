"""Training on a gs:// workdir, against the GCS API (tests/conftest.py's emulator, 127.0.0.1).

`python -m t5lite.train --config configs/quickstart.py --workdir gs://...` (shortened) puts every
file of the run in the bucket and none in a local `gs:` folder; kill -9 and the same command
again resumes to the uninterrupted run's state and metrics, bit for bit (the reference is the
local run of tests/test_checkpoints.py, so gs:// also equals a local disk); SIGTERM saves in the
bucket and exits 0; init_from, eval's --checkpoint and a rejected step read and write the bucket;
the workdir lock holds there; bad URLs give one line.
"""
import io
import json
import os
import random
import re
import signal
import subprocess
import time
from contextlib import redirect_stderr

import jax
import numpy as np
import pytest

from t5lite import checkpoints, cli, files, init_from, train, workdir as workdir_lib
from t5lite import config as config_lib

from test_checkpoints import QUICKSTART, REPO, assert_trees_equal, logged_losses, train_command, uninterrupted  # pylint: disable=unused-import


def gcs_env(gcs) -> dict:
  # One device, as test_checkpoints' runs.
  return dict(gcs.env, XLA_FLAGS='', JAX_PLATFORMS='cpu')


def gcs_train(gcs, cwd, steps, every, *extra, timeout=300):
  return subprocess.run(train_command(f'{gcs.url}/run', steps, every, *extra), capture_output=True,
                        text=True, cwd=cwd, env=gcs_env(gcs), timeout=timeout)


def start_gcs_train(gcs, cwd, steps, every, wait_for_step, *extra, checkpoint=None):
  """A training subprocess on gs://, returned once it has logged `wait_for_step` (and, if given,
  once step `checkpoint` is complete in the bucket)."""
  stderr = open(os.path.join(cwd, 'stderr.txt'), 'w')
  proc = subprocess.Popen(train_command(f'{gcs.url}/run', steps, every,
                                        *extra), stdout=subprocess.PIPE, stderr=stderr, text=True,
                          cwd=cwd, env=gcs_env(gcs))
  deadline, lines = time.time() + 300, []
  for line in proc.stdout:
    lines.append(line)
    match = re.search(r'(?:^|\s)step (\d+) \|', line)
    if match and int(match.group(1)) >= wait_for_step and (
        checkpoint is None
        or checkpoint in checkpoints.complete_steps(f'{gcs.url}/run/checkpoints')):
      return proc, lines
    if time.time() > deadline:
      break
  proc.kill()
  raise AssertionError(f'training never reached step {wait_for_step}: {"".join(lines)[-2000:]}')


def bucket_losses(url):
  """logged_losses of a run in the bucket."""
  with files.local_copy(f'{url}/metrics.jsonl') as local:
    return logged_losses(os.path.dirname(local))


def assert_no_local_gs_folder(*folders):
  for folder in (*folders, REPO):
    assert not os.path.exists(os.path.join(folder, 'gs:')), folder


def test_kill_9_on_gcs_resumes_bitwise_with_every_file_in_the_bucket(tmp_path, gcs, uninterrupted):
  """The acceptance check: quickstart on gs://, killed (-9) after its first checkpoint and run
  again, ends as the uninterrupted (local) run: params, optimizer state and every logged loss."""
  url = f'{gcs.url}/run'
  kill_at = random.Random().randint(4, 9)
  proc, _ = start_gcs_train(gcs, str(tmp_path), 12, 3, kill_at,
                            '--config.reporting.tensorboard=True', checkpoint=3)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert files.to_path(f'{url}/lock.json').exists()  # left behind by the killed run

  result = gcs_train(gcs, str(tmp_path), 12, 3, '--config.reporting.tensorboard=True')
  assert result.returncode == 0, result.stderr[-3000:]
  restart = int(
      re.search(r'resumed from the checkpoint of step (\d+) in (\S+)', result.stdout).group(1))
  assert 3 <= restart <= kill_at, (kill_at, restart)
  assert f'in {url}/checkpoints' in result.stdout
  assert re.search(r'compiling the train step \.\.\.', result.stdout), result.stdout[-2000:]
  assert re.search(r'compiled the train step in [0-9.]+s', result.stdout), result.stdout[-2000:]

  step_ref, state_ref = checkpoints.restore_as_numpy(str(uninterrupted))
  step_new, state_new = checkpoints.restore_as_numpy(url)
  assert step_ref == step_new == 12
  assert_trees_equal(state_new, state_ref)
  steps, losses = bucket_losses(url)
  _, reference = logged_losses(uninterrupted)
  assert steps == list(range(1, 13)) and losses == reference, (kill_at, restart)

  objects = [o[len(url) + 1:] for o in gcs.objects()]
  for name in ('config.json', 'config.txt', 'metrics.jsonl', 'checkpoints/12/commit_success.txt',
               f'checkpoints/12/{checkpoints.CHECKSUMS_ITEM}/{checkpoints.CHECKSUMS_FILE}',
               'checkpoints/12/data/process_0-of-1.json'):
    assert name in objects, objects
  assert any(o.startswith('tensorboard/events.out.tfevents.') for o in objects), objects
  assert any(o.startswith('checkpoints/12/state/') for o in objects), objects
  assert 'lock.json' not in objects  # released at the end
  # The same steps as the local run kept (checkpoint.keep drops the oldest).
  kept = checkpoints.complete_steps(os.path.join(uninterrupted, 'checkpoints'))
  assert kept[-1] == 12 and checkpoints.complete_steps(f'{url}/checkpoints') == kept
  assert_no_local_gs_folder(str(tmp_path))

  # eval's and infer's --checkpoint, and init_from, read the same run from the bucket.
  assert checkpoints.resolve_steps('all', url) == [(s, f'{url}/checkpoints/{s}') for s in kept]
  assert checkpoints.resolve_steps(url, None) == [(12, f'{url}/checkpoints/12')]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          state_ref['params'])
  loaded = init_from.load_params_for_init(url, abstract)
  assert_trees_equal(loaded, state_ref['params'])


def test_sigterm_on_gcs_saves_in_the_bucket_and_exits_0(tmp_path, gcs, uninterrupted):
  url = f'{gcs.url}/run'
  proc, lines = start_gcs_train(gcs, str(tmp_path), 12, 100, 2)  # no periodic save before 12
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, open(tmp_path / 'stderr.txt').read()[-3000:]
  match = re.search(r'preempted \(SIGTERM\): saved the checkpoint of step (\d+) in (\S+);',
                    ''.join(lines) + out)
  assert match, ''.join(lines) + out
  stopped = int(match.group(1))
  assert match.group(2) == f'{url}/checkpoints' and stopped < 12
  assert checkpoints.complete_steps(f'{url}/checkpoints') == [stopped]
  steps, losses = bucket_losses(url)  # metrics.jsonl was uploaded at the save
  _, reference = logged_losses(uninterrupted)
  assert steps == list(range(1, stopped + 1))
  assert [losses[s] for s in steps] == [reference[s] for s in steps]
  assert not files.to_path(f'{url}/lock.json').exists()
  assert_no_local_gs_folder(str(tmp_path))


def test_init_from_a_gcs_run_through_the_train_command(tmp_path, gcs, uninterrupted):
  """A local fine-tuning run whose checkpoint.init_from is a run in the bucket starts from that
  run's params: after its one step (the schedule's warm-up gives step 1 a learning rate of 0) its
  checkpoint holds exactly the source's params."""
  source = f'{gcs.url}/source'
  files.copy_tree(str(uninterrupted), source)  # the local reference run, copied to the bucket
  assert checkpoints.resolve_init_path(source) == f'{source}/checkpoints/12'
  result = subprocess.run(
      train_command(tmp_path / 'ft', 1, 1, f'--config.checkpoint.init_from={source}'),
      capture_output=True, text=True, cwd=str(tmp_path), env=gcs_env(gcs), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'initialised params from {source}/checkpoints/12' in result.stdout, result.stdout[-2000:]
  assert re.search(r'step 1 \|.*\| lr 0 \|', result.stdout), result.stdout[-2000:]
  _, state = checkpoints.restore_as_numpy(str(tmp_path / 'ft'))
  _, reference = checkpoints.restore_as_numpy(str(uninterrupted))
  assert_trees_equal(state['params'], reference['params'])
  assert_no_local_gs_folder(str(tmp_path))


def test_a_rejected_step_is_copied_aside_in_the_bucket_with_its_reason(gcs):
  url = f'{gcs.url}/run'
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  states = {
      s: {'params': {'w': jax.device_put(np.full((4, 8), s, np.float32), device)}} for s in (1, 2)
  }
  ckpt = checkpoints.Checkpointer(url)
  try:
    for step, state in states.items():
      ckpt.save(step, state, {'position': step}, {'model': {}})
      ckpt.wait()
    # Damage step 2's array data as a bad disk would: its checksum no longer matches.
    checksums = files.to_path(f'{url}/checkpoints/2/{checkpoints.CHECKSUMS_ITEM}/'
                              f'{checkpoints.CHECKSUMS_FILE}')
    checksums.write_text(checksums.read_text().replace('"sum": ', '"sum": 1'))
    before = {o for o in gcs.objects() if '/checkpoints/2/' in o}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            states[1])
    restored = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  assert restored.step == 1
  np.testing.assert_array_equal(np.asarray(restored.state['params']['w']), 1)
  assert checkpoints.complete_steps(f'{url}/checkpoints') == [1]
  rejected = [o for o in gcs.objects() if f'/{checkpoints.REJECTED_DIR}/' in o]
  folder = rejected[0].split(f'/{checkpoints.REJECTED_DIR}/')[1].split('/')[0]
  assert re.fullmatch(r'2-\d{8}-\d{6}', folder), folder
  prefix = f'{url}/{checkpoints.REJECTED_DIR}/{folder}/'
  # Every object of the step was copied; nothing of it is left in checkpoints/.
  assert sorted(o[len(prefix):] for o in rejected if o != prefix + checkpoints.REASON_FILE) == \
      sorted(o[len(f'{url}/checkpoints/2/'):] for o in before)
  assert not [o for o in gcs.objects() if '/checkpoints/2/' in o]
  reason = files.read_text(prefix + checkpoints.REASON_FILE)
  assert reason.startswith('step 2 rejected') and 'checksum' in reason, reason


def test_the_workdir_lock_holds_on_gcs(gcs):
  first = workdir_lib.WorkdirLock(gcs.url, settle_s=0.2).acquire()
  try:
    assert files.to_path(f'{gcs.url}/lock.json').exists()
    second = workdir_lib.WorkdirLock(gcs.url, settle_s=0.2)
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f'pid {os.getpid()}'):
      second.acquire()
  finally:
    first.release()
  assert not files.to_path(f'{gcs.url}/lock.json').exists()
  with workdir_lib.WorkdirLock(gcs.url, settle_s=0.2):  # free again
    pass


def test_bad_gs_workdirs_give_one_line(gcs, monkeypatch, tmp_path):
  with pytest.raises(config_lib.ConfigError, match='the bucket gs://no-such-bucket-t5 does not'):
    cli.check_folder('gs://no-such-bucket-t5/run', '--workdir')
  files.write_text(f'{gcs.url}/a-file', 'x')
  with pytest.raises(config_lib.ConfigError, match='is a file, not a folder'):
    cli.check_folder(f'{gcs.url}/a-file', '--workdir')
  with pytest.raises(config_lib.ConfigError, match='no such folder'):
    cli.check_folder(f'{gcs.url}/nothing-here', '--workdir', must_exist=True)
  cli.check_folder(f'{gcs.url}/new-run', '--workdir')  # a new folder in a bucket that exists
  stderr = io.StringIO()
  with redirect_stderr(stderr):  # the train command checks --workdir before building anything
    code = train.main(['--config', QUICKSTART, '--workdir', 'gs://no-such-bucket-t5/run'])
  assert code == 2 and stderr.getvalue().strip().splitlines() == [
      'config error: --workdir gs://no-such-bucket-t5/run: the bucket gs://no-such-bucket-t5 does '
      'not exist (or these credentials cannot see it)'
  ], stderr.getvalue()
  # Without gcsfs (and tensorflow): exit 2 and how to install it, no traceback.
  real_find_spec = files.importlib.util.find_spec
  monkeypatch.setattr(
      files.importlib.util, 'find_spec', lambda name, *a: None
      if name in ('gcsfs', 'tensorflow') else real_find_spec(name, *a))
  stderr = io.StringIO()
  with redirect_stderr(stderr):
    code = cli.run_main(lambda: cli.check_folder(f'{gcs.url}/run', '--workdir'))
  assert code == 2
  assert stderr.getvalue().startswith(
      'error: ') and "pip install 't5lite[gcp]'" in stderr.getvalue()
  assert len(stderr.getvalue().strip().splitlines()) == 1, stderr.getvalue()
  assert_no_local_gs_folder(str(tmp_path), os.getcwd())


def test_a_scan_sees_steps_that_another_process_wrote(gcs):
  """eval --watch polls complete_steps while a trainer (another process, another client) saves:
  gcsfs's listing cache must not hide the new step."""
  import gcsfs  # pylint: disable=import-outside-toplevel
  directory = f'{gcs.url}/checkpoints'
  files.write_text(f'{directory}/1/{checkpoints.COMMIT_MARKER}', 'done')
  assert checkpoints.complete_steps(directory) == [1]
  other = gcsfs.GCSFileSystem(skip_instance_cache=True)
  other.pipe(f'{directory[len("gs://"):]}/2/{checkpoints.COMMIT_MARKER}', b'done')
  assert checkpoints.complete_steps(directory) == [1, 2]


def test_metrics_on_gcs_are_uploaded_whole_at_flush_and_close(gcs):
  """An object cannot be appended to: the writer keeps metrics.jsonl whole and uploads it at
  flush() (train.py calls it before every checkpoint) and close(); a resumed writer keeps the
  lines already in the bucket. (TensorBoard's events in the bucket: the kill -9 test; here,
  tensorboardX's gs:// writer would upload once more at interpreter exit, after the emulator is
  gone, and retry for 2 minutes.)"""
  from t5lite import reporting  # pylint: disable=import-outside-toplevel
  path = files.to_path(f'{gcs.url}/metrics.jsonl')
  first = reporting.MetricWriter(gcs.url, tensorboard=False, flush_s=3600)
  first.write(1, {'loss': 3.0})
  assert not path.exists()  # not yet: the next upload is at flush() or close()
  first.write(2, {'loss': 2.0})
  first.flush()
  assert [l['step'] for l in map(json.loads, path.read_text().splitlines())] == [1, 2]
  first.write(3, {'loss': 1.0})
  first.close()
  resumed = reporting.MetricWriter(gcs.url, tensorboard=False)
  resumed.write(4, {'loss': 0.5})
  resumed.close()
  records = [json.loads(l) for l in path.read_text().splitlines()]
  assert [(r['step'], r['loss']) for r in records] == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
