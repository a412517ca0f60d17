"""config.keep_host_memory (t5lite/host_memory.py): after it, a large malloc comes from the heap
(reused between steps) instead of a fresh mmap, and XLA's threads share one malloc arena; it does
nothing when off or off-CPU."""
import os
import subprocess
import sys
import textwrap

from t5lite import cli, host_memory, train
from test_init_from import tiny_config

# In a fresh interpreter: count glibc's mmapped blocks (mallinfo2().hblks) around a 64 MiB malloc,
# before and after keep_freed_memory.
PROBE = textwrap.dedent('''
    import ctypes
    libc = ctypes.CDLL('libc.so.6')
    class MallInfo2(ctypes.Structure):
      _fields_ = [(name, ctypes.c_size_t) for name in (
          'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
          'fordblks', 'keepcost')]
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    def mmapped_blocks_during_malloc():
      before = libc.mallinfo2().hblks
      block = libc.malloc(64 << 20)
      during = libc.mallinfo2().hblks
      libc.free(block)
      return during - before
    def heap_kept_after_freeing_a_top_block_over_2_gib():
      # Virtual only (never touched). With M_TRIM_THRESHOLD at INT_MAX glibc would hand a free
      # top over 2 GiB back to the kernel; at -1 (never) the heap keeps it.
      block = libc.malloc((2 << 30) + (256 << 20))
      assert block, 'malloc of 2.25 GiB (virtual) failed'
      size = libc.mallinfo2().arena
      libc.free(block)
      return libc.mallinfo2().arena >= size
    from t5lite import host_memory
    first = mmapped_blocks_during_malloc()
    applied = host_memory.keep_freed_memory(True, backend='cpu')
    print(first, applied, mmapped_blocks_during_malloc(),
          heap_kept_after_freeing_a_top_block_over_2_gib())
''')


def test_large_blocks_come_from_the_heap_once_applied():
  if not sys.platform.startswith('linux'):  # no glibc: the documented no-op, not a skip
    assert host_memory.keep_freed_memory(True, backend='cpu') is False
    return
  result = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, check=True)
  before, applied, after, heap_kept = result.stdout.split()
  assert (before, applied, after, heap_kept) == ('1', 'True', '0', 'True'), result.stdout


# In a fresh interpreter (JAX not started): optionally apply, then run XLA:CPU computations with
# 48 MiB temporaries on its worker threads; print the number of glibc arenas (malloc_info's
# <heap> entries) and the minor page faults of the last 3 calls.
ARENAS = textwrap.dedent('''
    import ctypes, os, re, resource, sys, tempfile
    from t5lite import host_memory
    applied = host_memory.keep_freed_memory(True) if sys.argv[1] == 'apply' else False
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x[:, None] * x[None, :3072]), axis=0))
    x = jnp.ones((4096,), jnp.float32)
    for _ in range(3):
      f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
      f(x).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc = ctypes.CDLL('libc.so.6')
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.fclose.argtypes = (ctypes.c_void_p,)
    path = tempfile.mktemp()
    stream = libc.fopen(path.encode(), b'w')
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(applied, len(re.findall('<heap nr=', open(path).read())), faults)
''')


def test_xla_threads_share_one_arena_and_steps_stop_faulting():
  if not sys.platform.startswith('linux'):
    return  # no glibc: test_large_blocks_come_from_the_heap_once_applied checks the no-op
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  runs = {}
  for mode in ('apply', 'default'):
    result = subprocess.run([sys.executable, '-c', ARENAS, mode], capture_output=True, text=True,
                            check=True, env=env)
    applied, arenas, faults = result.stdout.split()
    runs[mode] = (applied, int(arenas), int(faults))
  assert runs['apply'][:2] == ('True', 1), runs
  assert runs['default'][1] > 1, runs  # the probe sees the per-thread arenas it removes
  # 3 calls with 48 MiB of temporaries each: fresh memory would be ~36,000 4 KiB faults.
  assert runs['apply'][2] < 2000, runs


def test_platform_is_judged_without_starting_jax(monkeypatch):
  monkeypatch.setattr(host_memory, '_configured_platforms', lambda: 'cpu')
  assert host_memory._expected_platform() == 'cpu'
  monkeypatch.setattr(host_memory, '_configured_platforms', lambda: 'cuda,cpu')
  assert host_memory._expected_platform() == 'other'
  monkeypatch.setattr(host_memory, '_configured_platforms', lambda: None)
  monkeypatch.setattr(host_memory.importlib.metadata, 'entry_points', lambda group: [])
  monkeypatch.setattr(host_memory.pkgutil, 'iter_modules', lambda path: [])
  monkeypatch.setattr(host_memory.importlib.util, 'find_spec', lambda name: None)
  assert host_memory._expected_platform() == 'cpu'  # no accelerator plugin: JAX runs on CPU
  plugin = type('Module', (), {'name': 'xla_cuda12'})
  monkeypatch.setattr(host_memory.pkgutil, 'iter_modules', lambda path: [plugin])
  assert host_memory._expected_platform() == 'other'


def test_off_or_not_cpu_leaves_the_allocator_alone(monkeypatch):
  monkeypatch.setattr(host_memory, '_applied', False)
  assert host_memory.keep_freed_memory(False, backend='cpu') is False
  assert host_memory.keep_freed_memory(True, backend='gpu') is False
  assert host_memory._applied is False


def test_train_and_eval_jobs_apply_the_config(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(host_memory, 'keep_freed_memory', lambda enabled, backend=None: calls.append(
      (enabled, backend)))
  devices = train.jax.devices  # train and eval share the jax module: one patch records both
  monkeypatch.setattr(train.jax, 'devices', lambda *a: calls.append('devices') or devices(*a))
  config = tiny_config(1)
  config.keep_host_memory = False
  cli.build(config)  # the eval and infer jobs' set-up
  train.run(config, str(tmp_path))
  # No devices given: called before JAX is asked for any, the platform left to be judged.
  assert calls[:2] == [(False, None), 'devices'], calls  # cli.build (eval, infer)
  assert calls[2:4] == [(False, None), 'devices'], calls  # train.run
