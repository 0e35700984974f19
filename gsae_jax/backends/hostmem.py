"""Host memory: let XLA's CPU temporaries reuse freed memory, not fresh pages.

XLA on CPU allocates each execution's temporaries with malloc. glibc serves
blocks above its mmap threshold (32 MiB at most) with fresh `mmap`s and
unmaps them when they are freed, so every training step page-faults its
temporaries in again: at d_in 512, d_sae 4096, batch 4096 that is ~41,000
faults (160 MB) and ~80 ms of system time a step, 10% of it (and more for
code that materialises more). `keep_host_memory()` tells glibc to serve every
block from one heap and to keep freed memory mapped -- what
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:...` does
at startup -- so later steps reuse pages already faulted in. The cost: the
process's resident memory stays at its peak instead of shrinking.

Only the CPU backend allocates its buffers this way, so the launchers call
`keep_host_memory_on_cpu()` first thing (launch/cli.py), which does nothing
when JAX will run on an accelerator. It is never an import side effect. Set
GSAE_JAX_KEEP_HOST_MEMORY=0 to opt out. It must run before the first JAX
computation: threads that the CPU backend starts then keep their own arenas.
Measured on the main job end to end: docs/benchmarks.md, "Host memory".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_ENV = 'GSAE_JAX_KEEP_HOST_MEMORY'


def keep_host_memory() -> bool:
  """Keeps freed host memory mapped for reuse; True if it took effect.

  A no-op (False) without glibc, or when GSAE_JAX_KEEP_HOST_MEMORY=0.
  """
  if os.environ.get(_ENV, '1').strip().lower() in ('0', 'false', 'no'):
    return False
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  settings = (
      (_M_ARENA_MAX, 1),  # one heap: threads' heaps are capped at 64 MiB
      (_M_MMAP_MAX, 0),  # no block of its own mmap, however large
      (_M_TRIM_THRESHOLD, 2**31 - 1),  # never hand the heap's top back
  )
  return all(mallopt(param, value) == 1 for param, value in settings)


def jax_will_use_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, decided without starting
  JAX (jax.distributed.initialize must come before any backend starts).

  JAX_PLATFORMS decides when set; otherwise the CPU is the default exactly
  when no accelerator plugin (CUDA/ROCm via the jax_plugins entry points, or
  libtpu) is installed.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return False
  return not list(importlib.metadata.entry_points(group='jax_plugins'))


def keep_host_memory_on_cpu() -> bool:
  """`keep_host_memory()` when JAX will run on the CPU; True if it took effect."""
  return jax_will_use_cpu() and keep_host_memory()
