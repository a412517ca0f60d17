"""Checkpoint faults, in process with small states (issue 14): failed saves (sync and async, and
in a subprocess: one line, no hang at exit, the older step intact), per-array checksums (a flipped
bit or 16 flipped bytes reject the step), a truncated file without a flood of tracebacks,
non-finite restored states, reject_from, checkpoints from before checksums, checksums that do
not depend on the mesh, and orbax's harmless warning filtered. The end-to-end runs of the trainer
are in test_faults.py."""
import logging
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5lite import checkpoints, init_from

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_DATA = os.path.join('state', 'ocdbt.process_0', 'd')


def make_mesh(shape=(8,), names=('data',)) -> Mesh:
  count = int(np.prod(shape))
  assert len(jax.devices()) >= count, 'tests/conftest.py sets up 8 CPU devices'
  return Mesh(np.array(jax.devices()[:count]).reshape(shape), names)


def make_state(mesh: Mesh, seed: int) -> dict:
  """f32 and bf16 arrays, sharded over the mesh's first axis or replicated, and an int32 scalar.
  Random values (little to compress), so that a damaged byte of a data file lands in array data
  that still decodes."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  sharded, replicated = NamedSharding(mesh, P(mesh.axis_names[0])), NamedSharding(mesh, P())
  return {
      'params': {
          'kernel': jax.device_put(jax.random.normal(k1, (512, 256), jnp.float32), sharded),
          'embedding': jax.device_put(
              jax.random.normal(k2, (256, 128), jnp.float32).astype(jnp.bfloat16), sharded),
          'scale': jax.device_put(jax.random.normal(k3, (128,), jnp.float32), replicated),
      },
      'step': jax.device_put(jnp.int32(seed), replicated),
  }


def abstract(state, sharding_of=None):
  """Restore targets: `state`'s shapes and dtypes, on its own shardings or sharding_of(x)'s."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(sharding_of or
                                                                 (lambda y: y.sharding))(x)), state)


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_bitwise_equal(a, b):
  flat_a, flat_b = jax.tree.leaves_with_path(host(a)), jax.tree.leaves_with_path(host(b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def save_steps(workdir, states: dict, async_save=False):
  ckpt = checkpoints.Checkpointer(str(workdir), async_save=async_save)
  try:
    for step, state in states.items():
      assert ckpt.save(step, state, {'position': step}, {'note': 'test'})
    ckpt.wait()
  finally:
    ckpt.close()


def restore_latest(workdir, target):
  ckpt = checkpoints.Checkpointer(str(workdir))
  try:
    return ckpt.restore_latest(target)
  finally:
    ckpt.close()


def largest_data_file(step_dir) -> str:
  folder = os.path.join(step_dir, STATE_DATA)
  return max((os.path.join(folder, n) for n in os.listdir(folder)), key=os.path.getsize)


def flip(path: str, n_bytes: int) -> None:
  """One bit (n_bytes=0) or n_bytes whole bytes flipped in the middle of the file."""
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    if n_bytes == 0:
      data[middle] ^= 0x10
    for i in range(middle, middle + n_bytes):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(bytes(data))


def rejected(workdir) -> list[str]:
  folder = os.path.join(str(workdir), checkpoints.REJECTED_DIR)
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


class Immutable:
  """`chattr +i` on a folder for the duration: we run as root, whom permission bits do not stop;
  this flag stops everyone from creating anything in it. Always undone, so tmp_path cleans up."""

  def __init__(self, path):
    self.path = str(path)

  def __enter__(self):
    subprocess.run(['chattr', '+i', self.path], check=True)
    return self

  def __exit__(self, *exc):
    subprocess.run(['chattr', '-i', self.path], check=True)


# ---------------------------------------------------------------------------------------------
# Failed saves


@pytest.mark.parametrize('async_save', [False, True])
def test_a_save_into_an_unwritable_folder_raises_one_line_and_keeps_the_older_step(
    tmp_path, async_save):
  mesh = make_mesh()
  first = make_state(mesh, 1)
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=async_save)
  try:
    ckpt.save(1, first, {'position': 1}, {})
    ckpt.wait()
    with Immutable(ckpt.directory):
      with pytest.raises(checkpoints.CheckpointSaveError) as raised:
        ckpt.save(2, make_state(mesh, 2), {'position': 2}, {})
        ckpt.wait()  # (the folder of the step is made synchronously, so save() raises already)
      # The failure sticks: the next step's check and the next save say it again.
      with pytest.raises(checkpoints.CheckpointSaveError):
        ckpt.check_save()
      with pytest.raises(checkpoints.CheckpointSaveError):
        ckpt.save(3, first, {'position': 3}, {})
  finally:
    start = time.time()
    ckpt.close()  # does not raise again, and does not hang
    assert time.time() - start < 10
  message = str(raised.value)
  assert '\n' not in message, message
  assert message.startswith(
      f'saving the checkpoint of step 2 to {ckpt.directory} failed: '), message
  assert 'PermissionError' in message and 'Operation not permitted' in message, message
  assert 'the newest complete checkpoint, step 1' in message, message
  assert checkpoints.complete_steps(ckpt.directory) == [1]
  restored = restore_latest(tmp_path, abstract(first))
  assert restored.step == 1 and restored.data_state == {'position': 1}
  assert_bitwise_equal(restored.state, first)


# Saves step 1, makes the folder unwritable (chattr +i) or the disk "full" (RLIMIT_FSIZE: writes
# past 256 KiB fail with EFBIG), saves step 2 asynchronously and then calls check_save() as a
# train loop does each step, for at most 30 s; exits 3 with the error on one line. Before
# checkpoints.py handled it, the immutable folder made the interpreter hang at exit, waiting for
# orbax's writer threads.
FAILING_SAVE = textwrap.dedent('''
    import resource, signal, subprocess, sys, time
    import jax
    from t5lite import checkpoints
    workdir, mode = sys.argv[1:]
    values = jax.random.normal(jax.random.key(0), (1 << 19,))  # 2 MiB of float32
    ckpt = checkpoints.Checkpointer(workdir, async_save=True)
    ckpt.save(1, {'x': values}, {}, {})
    ckpt.wait()
    if mode == 'immutable':
      subprocess.run(['chattr', '+i', ckpt.directory], check=True)
    else:
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))
    where = 'save'
    try:
      ckpt.save(2, {'x': values + 1}, {}, {})
      where = 'check_save'
      for _ in range(600):
        time.sleep(0.05)
        ckpt.check_save()
      print('no error seen')
    except checkpoints.CheckpointSaveError as e:
      print(f'{where}: {e}', file=sys.stderr)
      sys.exit(3)
    finally:
      ckpt.close()
''')


@pytest.mark.parametrize('mode,where', [('immutable', 'save'), ('full', 'check_save')])
def test_a_failed_async_save_is_reported_and_the_process_exits_promptly(tmp_path, mode, where):
  directory = str(tmp_path / 'checkpoints')
  start = time.time()
  try:
    result = subprocess.run([sys.executable, '-c', FAILING_SAVE,
                             str(tmp_path), mode], capture_output=True, text=True, cwd=REPO,
                            timeout=180)
  finally:
    if mode == 'immutable' and os.path.isdir(directory):
      subprocess.run(['chattr', '-i', directory], check=True)
  took = time.time() - start
  output = result.stdout + result.stderr
  assert result.returncode == 3, output[-3000:]
  assert took < 60, took  # no wait for orbax's threads at exit
  lines = [line for line in result.stderr.splitlines() if line.startswith(f'{where}: ')]
  assert len(lines) == 1, output[-3000:]
  assert f'saving the checkpoint of step 2 to {directory} failed: ' in lines[0]
  cause = 'Operation not permitted' if mode == 'immutable' else 'File too large'
  assert cause in lines[0], lines[0]
  assert 'Traceback' not in output, output[-3000:]
  assert checkpoints.complete_steps(directory) == [1]
  step, state = checkpoints.restore_as_numpy(str(tmp_path))
  assert step == 1
  expected = np.asarray(jax.random.normal(jax.random.key(0), (1 << 19,)))
  assert state['x'].tobytes() == expected.tobytes()


# ---------------------------------------------------------------------------------------------
# Integrity


@pytest.mark.parametrize('n_bytes', [0, 16], ids=['one-bit', '16-bytes'])
def test_flipped_bits_reject_the_step_and_the_previous_restores_bitwise(tmp_path, capsys, n_bytes):
  mesh = make_mesh()
  first, second = make_state(mesh, 1), make_state(mesh, 2)
  save_steps(tmp_path, {1: first, 2: second})
  flip(largest_data_file(tmp_path / 'checkpoints' / '2'), n_bytes)
  # The damage reads back without an error (what happened before checksums): only they tell.
  _, damaged = checkpoints.restore_as_numpy(str(tmp_path), 2, check=False)
  assert any(x.tobytes() != y.tobytes()
             for x, y in zip(jax.tree.leaves(damaged), jax.tree.leaves(host(second))))
  with pytest.raises(checkpoints.CorruptCheckpointError, match=r'step 2 .*checksum'):
    checkpoints.restore_as_numpy(str(tmp_path), 2)
  capsys.readouterr()

  restored = restore_latest(tmp_path, abstract(first))
  out = capsys.readouterr().out
  assert restored.step == 1
  assert_bitwise_equal(restored.state, first)
  lines = [line for line in out.splitlines() if 'step 2' in line]
  assert len(lines) == 1, out
  assert 'rejected' in lines[0] and 'checksum' in lines[0] and 'params/' in lines[0], lines[0]
  assert checkpoints.complete_steps(str(tmp_path / 'checkpoints')) == [1]
  [moved] = rejected(tmp_path)
  assert moved.startswith('2-'), moved
  reason = open(tmp_path / checkpoints.REJECTED_DIR / moved / checkpoints.REASON_FILE).read()
  assert 'checksum' in reason


def test_load_params_for_init_verifies_the_params(tmp_path):
  mesh = make_mesh()
  state = make_state(mesh, 1)
  save_steps(tmp_path, {1: state})
  target = abstract(state['params'])
  loaded = init_from.load_params_for_init(str(tmp_path), target)
  assert_bitwise_equal(loaded, state['params'])
  flip(largest_data_file(tmp_path / 'checkpoints' / '1'), 0)
  with pytest.raises(checkpoints.CorruptCheckpointError, match=r'init_from=.*checksum'):
    init_from.load_params_for_init(str(tmp_path), target)


def many_arrays(mesh: Mesh, seed: int) -> dict:
  sharded = NamedSharding(mesh, P(mesh.axis_names[0]))
  keys = jax.random.split(jax.random.key(seed), 48)
  return {
      f'w{i}': jax.device_put(
          jax.random.normal(key, (64, 64),
                            jnp.float32).astype(jnp.bfloat16 if i % 2 else jnp.float32),
          sharded) for i, key in enumerate(keys)
  }


# Saves two steps of many sharded arrays, truncates every data file of the newer one and
# restores: the fallback to step 1 must say one line, where orbax's abandoned reads printed dozens
# of lines each through sys.unraisablehook. In a subprocess: pytest replaces that hook in-process.
TRUNCATED = textwrap.dedent('''
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from t5lite import checkpoints
    workdir, mode = sys.argv[1:]
    if mode == 'unfiltered':  # what it printed before: Python's own hook
      sys.unraisablehook = sys.__unraisablehook__
    mesh = Mesh(np.array(jax.devices()), ('data',))
    sharded = NamedSharding(mesh, P('data'))
    def arrays(seed):
      keys = jax.random.split(jax.random.key(seed), 48)
      return {f'w{i}': jax.device_put(jax.random.normal(k, (64, 64)), sharded)
              for i, k in enumerate(keys)}
    ckpt = checkpoints.Checkpointer(workdir, async_save=False)
    ckpt.save(1, arrays(1), {}, {})
    ckpt.save(2, arrays(2), {}, {})
    ckpt.close()
    folder = os.path.join(workdir, 'checkpoints', '2', 'state', 'ocdbt.process_0', 'd')
    for name in os.listdir(folder):
      os.truncate(os.path.join(folder, name), os.path.getsize(os.path.join(folder, name)) // 2)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharded),
                          arrays(1))
    ckpt = checkpoints.Checkpointer(workdir)
    restored = ckpt.restore_latest(target)
    ckpt.close()
    import gc; gc.collect()
    print('restored step', restored.step,
          all(np.array_equal(restored.state[k], v) for k, v in arrays(1).items()))
''')


def test_a_truncated_step_falls_back_with_one_line_and_no_traceback(tmp_path):
  outputs = {}
  for mode in ('filtered',):
    result = subprocess.run([sys.executable, '-c', TRUNCATED,
                             str(tmp_path / mode), mode], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'restored step 1 True' in result.stdout, result.stdout[-3000:]
    outputs[mode] = result.stdout + result.stderr
  text = outputs['filtered']
  assert 'Traceback' not in text and 'Exception ignored' not in text, text[-3000:]
  assert len(text.splitlines()) < 10, text[-3000:]
  [line] = [line for line in text.splitlines() if 'step 2' in line]
  assert 'cannot be read' in line and 'moved it to' in line, line


def test_a_late_tensorstore_callback_into_a_closed_loop_prints_nothing(tmp_path):
  """The mechanism of the flood: orbax closes its asyncio loop when one read fails; each
  tensorstore read still in flight then calls back into it and prints a traceback
  ('RuntimeError: Event loop is closed') through sys.unraisablehook. Reproduced with one
  tensorstore future, without and with t5lite.checkpoints imported."""
  script = textwrap.dedent('''
      import asyncio, sys
      import tensorstore as ts
      if sys.argv[1] == 'with':
        import t5lite.checkpoints
      promise, future = ts.Promise.new()
      loop = asyncio.new_event_loop()
      async def wait():
        await future
      task = loop.create_task(wait())
      loop.run_until_complete(asyncio.sleep(0.01))
      loop.close()
      promise.set_result(1)
      class Other:
        def __del__(self):
          raise ValueError('other')
      Other()  # an unrelated error that Python can only print
  ''')
  outputs = {}
  for mode in ('without', 'with'):
    result = subprocess.run([sys.executable, '-c', script, mode], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs[mode] = result.stderr
  assert 'RuntimeError: Event loop is closed' in outputs['without']  # what floods without it
  assert 'Event loop is closed' not in outputs['with'], outputs['with']
  assert 'ValueError: other' in outputs['with']  # any other unraisable error still prints


def test_an_unretrieved_orbax_task_error_prints_nothing(tmp_path):
  """The same abandoned reads, when they end as asyncio Tasks: asyncio logs each one ('Task
  exception was never retrieved' and a traceback) when the task is collected. Reproduced with a
  coroutine defined in a file under an `orbax` folder; one from anywhere else still prints."""
  for folder in ('orbax', 'mine'):
    (tmp_path / folder).mkdir()
    (tmp_path / folder
     / 'reader.py').write_text('async def read():\n  raise ValueError("read failed in ' + folder
                               + '")\n')
  script = textwrap.dedent('''
      import asyncio, gc, importlib.util, logging, sys
      logging.basicConfig()
      if sys.argv[1] == 'with':
        import t5lite.checkpoints
      def load(folder):
        spec = importlib.util.spec_from_file_location(folder, f'{sys.argv[2]}/{folder}/reader.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
      loop = asyncio.new_event_loop()
      for folder in ('orbax', 'mine'):
        loop.create_task(load(folder).read())  # never awaited: its error is never retrieved
      loop.run_until_complete(asyncio.sleep(0.01))
      loop.close()
      gc.collect()
  ''')
  outputs = {}
  for mode in ('without', 'with'):
    result = subprocess.run(
        [sys.executable, '-c', script, mode, str(tmp_path)], capture_output=True, text=True,
        cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs[mode] = result.stderr
  assert 'read failed in orbax' in outputs['without']  # what asyncio prints without the filter
  assert 'read failed in orbax' not in outputs['with'], outputs['with']
  assert 'read failed in mine' in outputs['with']  # any other task's error still prints


def test_a_restored_non_finite_state_is_rejected(tmp_path, capsys):
  mesh = make_mesh()
  first, second = make_state(mesh, 1), make_state(mesh, 2)
  second['params']['scale'] = second['params']['scale'].at[3].set(jnp.nan)
  save_steps(tmp_path, {1: first, 2: second})
  capsys.readouterr()
  restored = restore_latest(tmp_path, abstract(first))
  out = capsys.readouterr().out
  assert restored.step == 1
  assert_bitwise_equal(restored.state, first)
  [line] = [line for line in out.splitlines() if 'step 2' in line]
  assert 'params/scale' in line and '1 non-finite value(s) of 128' in line, line
  assert [name.split('-')[0] for name in rejected(tmp_path)] == ['2']


def test_reject_from_moves_the_steps_from_there_on(tmp_path, capsys):
  mesh = make_mesh()
  states = {step: make_state(mesh, step) for step in (2, 4, 6, 8)}
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=True)
  try:
    for step, state in states.items():
      ckpt.save(step, state, {'position': step}, {})  # the last one still in flight
    capsys.readouterr()
    assert ckpt.reject_from(5, 'its params gave a non-finite loss at step 7') == 4
    out = capsys.readouterr().out
    assert ckpt.latest_step() == 4
    assert checkpoints.complete_steps(ckpt.directory) == [2, 4]
    first = rejected(tmp_path)
    assert [name.split('-')[0] for name in first] == ['6', '8']
    for step, name in zip((6, 8), first):
      [line] = [line for line in out.splitlines() if f'step {step} ' in line]
      assert 'rejected (its params gave a non-finite loss at step 7)' in line, line
      assert os.path.join(checkpoints.REJECTED_DIR, name) in line, line
      reason = open(tmp_path / checkpoints.REJECTED_DIR / name / checkpoints.REASON_FILE).read()
      assert 'non-finite loss at step 7' in reason
    # The same step can be written again: the run goes on from step 4.
    assert ckpt.save(6, states[6], {'position': 6}, {})
    ckpt.wait()
    assert ckpt.reject_from(100, 'nothing that new') == 6
    assert ckpt.reject_from(0, 'all of them') is None
  finally:
    ckpt.close()
  assert checkpoints.complete_steps(str(tmp_path / 'checkpoints')) == []
  assert sorted(int(name.split('-')[0]) for name in rejected(tmp_path)) == [2, 4, 6, 6, 8]
  # What was moved aside is whole: the step 8 folder still restores bitwise.
  inspect = tmp_path / 'inspect' / 'checkpoints'
  os.makedirs(inspect)
  os.rename(tmp_path / checkpoints.REJECTED_DIR / first[1], inspect / '8')
  step, state = checkpoints.restore_as_numpy(str(tmp_path / 'inspect'))
  assert step == 8
  assert_bitwise_equal(state, states[8])


def test_a_checkpoint_written_before_checksums_still_restores(tmp_path, capsys):
  """Written as t5lite wrote steps before this change: the same orbax items, no checksums."""
  mesh = make_mesh()
  state = make_state(mesh, 1)
  every_process = ocp.options.MultiprocessingOptions(primary_host=None)
  manager = ocp.CheckpointManager(
      str(tmp_path / 'checkpoints'), item_handlers={
          'state': ocp.StandardCheckpointHandler(),
          'data': ocp.JsonCheckpointHandler(filename=checkpoints.data_state_filename(),
                                            multiprocessing_options=every_process),
          'config': ocp.JsonCheckpointHandler(),
      }, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True))
  manager.save(
      3, force=True, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave({'position': 3}),
                                             config=ocp.args.JsonSave({})))
  manager.close()
  assert not os.path.exists(tmp_path / 'checkpoints' / '3' / checkpoints.CHECKSUMS_ITEM)
  capsys.readouterr()
  restored = restore_latest(tmp_path, abstract(state))
  out = capsys.readouterr().out
  assert restored.step == 3
  assert_bitwise_equal(restored.state, state)
  assert len([line for line in out.splitlines() if 'without checksums' in line]) <= 1, out
  assert checkpoints.restore_as_numpy(str(tmp_path))[0] == 3


def _numpy_fingerprint(x: np.ndarray) -> tuple[int, int]:
  """The checksum computed on the host with numpy, in 64-bit integers: the independent truth."""
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
  bits = np.ascontiguousarray(x).reshape(-1).view(unsigned).astype(np.uint64)
  weights = 2 * np.arange(bits.size, dtype=np.uint64) + 1
  return int(bits.sum() % 2**32), int((bits * weights % 2**32).sum() % 2**32)


def test_checksums_do_not_depend_on_the_mesh_and_restore_onto_another_one(tmp_path):
  eight = make_state(make_mesh(), 1)
  other_mesh = make_mesh((2, 4), ('a', 'b'))
  on_other = abstract(
      eight, lambda x: NamedSharding(other_mesh, P(*([None] * (x.ndim - 1) + ['b'] *
                                                     (x.ndim > 0)))))
  moved = jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), eight, on_other)
  one_device = jax.device_put(eight, jax.devices()[3])
  sums = checkpoints.fingerprints(eight)
  assert sums == checkpoints.fingerprints(moved) == checkpoints.fingerprints(one_device)
  for name, x in [('params/kernel', eight['params']['kernel']),
                  ('params/embedding', eight['params']['embedding']), ('step', eight['step'])]:
    assert (sums[name]['sum'], sums[name]['weighted']) == _numpy_fingerprint(np.asarray(x)), name
  # Saved from 8 devices, restored and verified on a 2x4 mesh with other shardings.
  save_steps(tmp_path, {1: eight})
  restored = restore_latest(tmp_path, on_other)
  assert restored.step == 1
  assert restored.state['params']['kernel'].sharding == on_other['params']['kernel'].sharding
  assert_bitwise_equal(restored.state, eight)


# ---------------------------------------------------------------------------------------------
# Quiet


def test_orbax_missing_metadata_warning_is_filtered_and_other_warnings_are_not(tmp_path, caplog):
  save_steps(tmp_path, {1: make_state(make_mesh(), 1)})
  state_dir = str(tmp_path / 'checkpoints' / '1' / 'state')
  absl = logging.getLogger('absl')
  [noise_filter] = [f for f in absl.filters if isinstance(f, checkpoints._OrbaxNoise)]  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    absl.removeFilter(noise_filter)  # first without the filter: the warning is real
    try:
      ocp.PyTreeCheckpointer().metadata(state_dir)
    finally:
      absl.addFilter(noise_filter)
    assert 'Metadata file does not exist' in caplog.text
    caplog.clear()
    ocp.PyTreeCheckpointer().metadata(state_dir)
    absl_logging.warning('another orbax warning')
  assert 'Metadata file does not exist' not in caplog.text
  assert 'another orbax warning' in caplog.text
