"""Keeps freed host memory mapped, so that XLA:CPU's per-step buffers do not page-fault.

XLA:CPU allocates each step's large temporaries (attention scores, MLP activations: tens of MB)
with malloc and frees them at the end of the step. Whenever glibc hands such memory back to the
kernel, the next step touches every page of it for the first time again: one page fault per
4 KiB, zero-filled by the kernel. Three of glibc's habits do that, and three settings stop them:

- blocks above the mmap threshold (at most 32 MiB) are fresh mmap()s, unmapped on free:
  M_MMAP_MAX = 0 serves them from the heap (writing a new 50 MB float32 buffer: ~19 -> ~4 ms);
- the heap's free top is trimmed: M_TRIM_THRESHOLD = -1 never trims (the largest positive value,
  INT_MAX, still let a T5.1.1-small float32 step give back its 2+ GiB top every step: ~740,000
  faults per step, 4.3 s instead of 3.3 s);
- XLA's worker threads allocate from per-thread arenas, whose heaps are unmapped when they empty
  and whose blocks beyond 64 MiB are mmapped whatever M_MMAP_MAX says: M_ARENA_MAX = 1 puts
  every thread on the main heap (T5.1.1-small bfloat16 step: ~530,000 faults and 2.2-2.5 s ->
  none and 1.8-2.0 s). It only binds threads that have not allocated yet, so train and eval call
  this before JAX starts its CPU client; with no backend named, "CPU" is read off the
  configuration (jax_platforms) or the absence of an accelerator plugin, without starting one.

The process's resident memory then stays at its peak instead of shrinking between steps (the
trade GPU frameworks make with their caching allocators). For any process (HuggingFace's too)
the environment does the same: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615
MALLOC_ARENA_MAX=1. Only for the CPU backend (on GPU/TPU the big buffers live on the device),
only with glibc; `config.keep_host_memory = False` turns it off.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import pkgutil
import sys

import jax

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # M_TRIM_THRESHOLD = -1: never trim (mallopt(3))
_applied = False


def keep_freed_memory(enabled: bool = True, backend: str | None = None) -> bool:
  """Applies the malloc settings above when `enabled`, the backend is CPU and libc is glibc;
  returns whether they are in effect. Settings are process-wide and applied once. `backend`
  None: the platform JAX will pick, judged without starting it (call this before JAX's first
  computation, for the arena limit to take)."""
  global _applied
  if _applied or not enabled:
    return _applied
  if (backend or _expected_platform()) != 'cpu' or not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
    logging.info('keep_host_memory: no glibc mallopt here; allocator left as it is')
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success; the settings only help together, so all or none counts.
  _applied = (mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER) == 1
              and mallopt(_M_ARENA_MAX, 1) == 1)
  if not _applied:
    logging.warning('keep_host_memory: glibc mallopt refused the settings; allocator unchanged')
  return _applied


def _expected_platform() -> str:
  """'cpu' when JAX will run on the CPU: jax_platforms (JAX_PLATFORMS) names it first, or, unset,
  no accelerator plugin is installed (JAX picks an accelerator when it has one); else 'other'."""
  platforms = _configured_platforms()
  if platforms:
    return 'cpu' if platforms.split(',')[0].strip() == 'cpu' else 'other'
  plugins = [m.name for m in pkgutil.iter_modules(_namespace_path('jax_plugins'))]
  plugins += [e.name for e in importlib.metadata.entry_points(group='jax_plugins')]
  if plugins or importlib.util.find_spec('libtpu') is not None:
    return 'other'
  return 'cpu'


def _configured_platforms() -> str | None:
  return jax.config.jax_platforms


def _namespace_path(name: str) -> list[str]:
  spec = importlib.util.find_spec(name)
  return list(spec.submodule_search_locations or []) if spec else []
