"""Fused CPU kernels for the gated SAE step's elementwise passes (XLA FFI).

XLA on CPU writes each elementwise pass over a [rows, d_sae] block to memory
and hands every reduction to a library call that cannot fuse its producer:
the step's gates, latents, fire counts and bias sums cost a dozen passes over
16 MiB blocks. `cpu_kernels.cc` does each direction's work in one pass,
registered as XLA FFI custom calls (`jax.ffi`), and `models.py` calls them from
its blocks of the gated step on CPU, in float32 and bfloat16.

The source is compiled on first use with the machine's C++ compiler ($CXX or
c++) against the headers jaxlib ships, for this CPU (-march=native), into a
cache directory ($GSAE_JAX_KERNEL_CACHE, else $XDG_CACHE_HOME/gsae_jax or
~/.cache/gsae_jax), keyed by the source, jaxlib version, flags and CPU model
(a home directory shared by different machines gets one library each); the
file appears atomically, so concurrent processes never load half a library.
Without a compiler, or with GSAE_JAX_CPU_KERNELS=0, `available()` is False
and models.py runs the same math as plain XLA (tests/test_cpu_kernels.py
checks that both agree).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib
from absl import logging

_SOURCE = pathlib.Path(__file__).with_name('cpu_kernels.cc')
_FLAGS = (
    '-O3',
    '-march=native',
    '-ffp-contract=off',  # no fused multiply-adds: the same rounding as XLA
    '-fopenmp-simd',
    '-std=c++17',
    '-shared',
    '-fPIC',
)
_TARGETS = (
    'gsae_gated_forward_f32',
    'gsae_gated_forward_bf16',
    'gsae_gated_backward_f32',
    'gsae_gated_backward_bf16',
)
_ENV = 'GSAE_JAX_CPU_KERNELS'
_LOCK = threading.Lock()  # one build and registration per process


def _cache_dir() -> pathlib.Path:
  if os.environ.get('GSAE_JAX_KERNEL_CACHE'):
    return pathlib.Path(os.environ['GSAE_JAX_KERNEL_CACHE'])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache'
  )
  return pathlib.Path(base) / 'gsae_jax'


def _cpu_id() -> bytes:
  """What -march=native compiles for: the CPU's model and feature flags."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      lines = [
          line for line in f if line.startswith(('model name', 'flags', 'Features'))
      ]
    return ''.join(sorted(set(lines))).encode()
  except OSError:
    return f'{platform.machine()} {platform.processor()}'.encode()


def build() -> pathlib.Path:
  """Compiles cpu_kernels.cc (once per source, jaxlib, flags and CPU); its path.

  Raises RuntimeError, naming the compiler and its output, if it fails.
  """
  compiler = os.environ.get('CXX', 'c++')
  if shutil.which(compiler) is None:
    raise RuntimeError(f'no C++ compiler {compiler!r} on PATH (set $CXX)')
  include = jax.ffi.include_dir()
  source = _SOURCE.read_bytes()
  key = hashlib.sha256(
      b'\0'.join(
          [source, jaxlib.__version__.encode(), ' '.join(_FLAGS).encode(), _cpu_id()]
      )
  ).hexdigest()[:16]
  target = _cache_dir() / f'cpu_kernels_{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=target.parent, suffix='.so.partial')
  os.close(fd)
  logging.info('gsae_jax: compiling the fused CPU kernels into %s', target)
  try:
    command = [compiler, *_FLAGS, f'-I{include}', str(_SOURCE), '-o', partial]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
      raise RuntimeError(
          f'{" ".join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}'
      )
    os.replace(partial, target)  # atomic: readers see all of it or nothing
  finally:
    if os.path.exists(partial):
      os.unlink(partial)
  return target


def available() -> bool:
  """Whether the kernels are built, loaded and registered with XLA (CPU)."""
  with _LOCK:
    return _load()


@functools.cache
def _load() -> bool:
  if os.environ.get(_ENV, '1').strip().lower() in ('0', 'false', 'no'):
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
    for name in _TARGETS:
      capsule = jax.ffi.pycapsule(getattr(library, name))
      jax.ffi.register_ffi_target(name, capsule, platform='cpu')
  except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
    logging.warning(
        'gsae_jax: fused CPU kernels unavailable, using plain XLA passes: %s', e
    )
    return False
  return True


# compute dtype -> (the kernels' name suffix, how they store it)
_STORAGE = {
    jnp.dtype(jnp.float32): ('f32', jnp.float32),
    jnp.dtype(jnp.bfloat16): ('bf16', jnp.uint16),
}


def _storage(dtype) -> tuple[str, type]:
  try:
    return _STORAGE[jnp.dtype(dtype)]
  except KeyError:
    raise ValueError(f'no fused CPU kernel for compute dtype {dtype}') from None


def _as_storage(a: jax.Array, dtype) -> jax.Array:
  """bfloat16 is passed as its uint16 bits (the kernels round themselves)."""
  if jnp.dtype(dtype) == jnp.bfloat16 and a.dtype != jnp.uint16:
    return jax.lax.bitcast_convert_type(a, jnp.uint16)
  return a


def _from_storage(a: jax.Array, dtype) -> jax.Array:
  if a.dtype == jnp.uint16:
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16)
  return a


def gated_forward(pre_raw, enc_bias, b_gate, exp_r_mag, b_mag, weights, dtype):
  """One forward block of one SAE; pre_raw [rows, S] = x W_enc (float32).

  Returns f [rows, S] (a closed gate's zero is -0.0) and acts = ReLU(pi_gate)
  [rows, S], both in `dtype`; fires [S] (rows with f > 0) and the penalty
  acts . weights [rows], float32.
  """
  rows, d_sae = pre_raw.shape
  suffix, storage = _storage(dtype)
  out = (
      jax.ShapeDtypeStruct((rows, d_sae), storage),
      jax.ShapeDtypeStruct((rows, d_sae), storage),
      jax.ShapeDtypeStruct((d_sae,), jnp.float32),
      jax.ShapeDtypeStruct((rows,), jnp.float32),
  )
  vectors = (enc_bias, b_gate, exp_r_mag, b_mag, weights)
  f, acts, fires, penalty = jax.ffi.ffi_call(
      f'gsae_gated_forward_{suffix}', out, vmap_method='sequential'
  )(pre_raw.astype(jnp.float32), *(v.astype(jnp.float32) for v in vectors))
  return _from_storage(f, dtype), _from_storage(acts, dtype), fires, penalty


def gated_backward(d_f, d_acts, f_all, sae, start, lam, weights, exp_r_mag, dtype):
  """One backward block: latents [start, start + cs) of SAE `sae`.

  d_f, d_acts [B, cs] float32 (the decoder-input products); f_all [N, B, S]
  in `dtype` (or its uint16 bits); lam [B]; weights, exp_r_mag [cs]. Returns
  d_pre [B, cs] in `dtype`, the bias sums b_mag, b_gate [cs] (float32) and
  the block of f [B, cs] in `dtype`, contiguous.
  """
  batch, cs = d_f.shape
  suffix, storage = _storage(dtype)
  out = (
      jax.ShapeDtypeStruct((batch, cs), storage),
      jax.ShapeDtypeStruct((cs,), jnp.float32),
      jax.ShapeDtypeStruct((cs,), jnp.float32),
      jax.ShapeDtypeStruct((batch, cs), storage),
  )
  position = jnp.stack([sae, start]).astype(jnp.int32)
  d_pre, b_mag, b_gate, f_block = jax.ffi.ffi_call(
      f'gsae_gated_backward_{suffix}', out, vmap_method='sequential'
  )(
      d_f.astype(jnp.float32),
      d_acts.astype(jnp.float32),
      _as_storage(f_all, dtype),
      position,
      lam.astype(jnp.float32),
      weights.astype(jnp.float32),
      exp_r_mag.astype(jnp.float32),
  )
  return _from_storage(d_pre, dtype), b_mag, b_gate, _from_storage(f_block, dtype)
