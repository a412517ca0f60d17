"""config.keep_host_memory (t5lite/host_memory.py): after it, a large malloc comes from the heap
(reused between steps) instead of a fresh mmap; it does nothing when off or off-CPU."""
import subprocess
import sys
import textwrap

from t5lite import eval as eval_lib
from t5lite import host_memory, train
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
    libc.free.argtypes = (ctypes.c_void_p,)
    def mmapped_blocks_during_malloc():
      before = libc.mallinfo2().hblks
      block = libc.malloc(64 << 20)
      during = libc.mallinfo2().hblks
      libc.free(block)
      return during - before
    from t5lite import host_memory
    first = mmapped_blocks_during_malloc()
    applied = host_memory.keep_freed_memory(True, backend='cpu')
    print(first, applied, mmapped_blocks_during_malloc())
''')


def test_large_blocks_come_from_the_heap_once_applied():
  if not sys.platform.startswith('linux'):  # no glibc: the documented no-op, not a skip
    assert host_memory.keep_freed_memory(True, backend='cpu') is False
    return
  result = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True,
                          check=True)
  before, applied, after = result.stdout.split()
  assert (before, applied, after) == ('1', 'True', '0'), result.stdout


def test_off_or_not_cpu_leaves_the_allocator_alone(monkeypatch):
  monkeypatch.setattr(host_memory, '_applied', False)
  assert host_memory.keep_freed_memory(False, backend='cpu') is False
  assert host_memory.keep_freed_memory(True, backend='gpu') is False
  assert host_memory._applied is False


def test_train_and_eval_jobs_apply_the_config(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(host_memory, 'keep_freed_memory',
                      lambda enabled, backend=None: calls.append((enabled, backend)))
  config = tiny_config(1)
  config.keep_host_memory = False
  eval_lib.build(config)  # the eval and infer jobs' set-up
  train.run(config, str(tmp_path))
  assert calls == [(False, 'cpu'), (False, 'cpu')]
