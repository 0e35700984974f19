"""Backend-specific formulations of the training step, chosen by config.

The reference step is gsae_jax.sae.models (the paper's math, differentiated
by JAX). What lives here computes the same numbers faster on some backend and
is chosen explicitly by `config.sae.step_impl`:

  'autodiff'    the reference, differentiated by JAX;
  'custom_vjp'  backends/custom_vjp.py: a hand-written gradient on blocks,
                plain XLA ops (a CPU cache design);
  'auto'        custom_vjp on the CPU backend, autodiff elsewhere: the
                choice docs/benchmarks.md measured ("Choosing step_impl").
                custom_vjp covers gated and baseline SAEs; the other
                architectures always run the reference.

`sae.select_impl` likewise picks how the TopK family finds its k-th largest
value (gsae_jax/sae/select.py): 'auto' is 'by_k' on the CPU backend (bisection
for large k and whole-batch selections, lax.top_k for small k) and lax.top_k
elsewhere (docs/benchmarks.md, "Selecting the top k").

This is the one place that looks at jax.default_backend() to pick a step.
`sae.compute_dtype` stays float32 by default on every backend:
bfloat16 matmuls are about 2x float32 on accelerators and on CPUs with
bfloat16 units, but slower on CPUs without them (docs/benchmarks.md); the
training loop says so when bfloat16 is asked for on such a CPU
(`slow_dtype_warning`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from gsae_jax.backends import custom_vjp
from gsae_jax.sae import models

STEP_IMPLS = ('auto', 'autodiff', 'custom_vjp')


def resolve_step_impl(
    step_impl: str, backend: str | None = None, architecture: str = 'gated'
) -> str:
  """'autodiff' or 'custom_vjp' for `step_impl` on `backend` (default: JAX's)."""
  if step_impl not in STEP_IMPLS:
    raise ValueError(f'config.sae.step_impl: {step_impl!r} is not one of {STEP_IMPLS}')
  if step_impl != 'auto':
    return step_impl
  if architecture not in models.L1_FAMILY:
    return 'autodiff'
  backend = backend or jax.default_backend()
  return 'custom_vjp' if backend == 'cpu' else 'autodiff'


def resolve_select_impl(select_impl: str, backend: str | None = None) -> str:
  """'top_k', 'bisect' or 'by_k' for `select_impl` on `backend` (default: JAX's)."""
  if select_impl not in models.SELECT_IMPLS:
    raise ValueError(
        f'config.sae.select_impl: {select_impl!r} is not one of {models.SELECT_IMPLS}'
    )
  if select_impl != 'auto':
    return select_impl
  return 'by_k' if (backend or jax.default_backend()) == 'cpu' else 'top_k'


def resolve(spec: models.SAESpec) -> models.SAESpec:
  """`spec` with its step_impl and select_impl chosen for this backend."""
  return dataclasses.replace(
      spec,
      step_impl=resolve_step_impl(spec.step_impl, architecture=spec.architecture),
      select_impl=resolve_select_impl(spec.select_impl),
  )


def stacked_forward(
    spec: models.SAESpec,
    params: models.Params,
    x,
    sparsity_coeff,
    latent_sharding=None,
    k=None,
    dead=None,
) -> dict:
  """The training forward of a stack of SAEs, by spec.step_impl.

  Same arguments and outputs as gsae_jax.sae.models.stacked_forward.
  """
  spec = resolve(spec)
  if spec.step_impl == 'custom_vjp':
    return custom_vjp.stacked_forward(spec, params, x, sparsity_coeff, latent_sharding)
  return models.stacked_forward(
      spec, params, x, sparsity_coeff, latent_sharding, k, dead
  )


@functools.lru_cache(maxsize=1)
def cpu_has_bfloat16_units() -> bool | None:
  """Whether this CPU multiplies bfloat16 natively (AVX512-BF16, AMX-BF16 or
  Arm's BF16); None if /proc/cpuinfo cannot tell."""
  try:
    with open('/proc/cpuinfo') as f:
      text = f.read()
  except OSError:
    return None
  flags = set()
  for line in text.splitlines():
    if line.startswith(('flags', 'Features')):
      flags.update(line.split(':', 1)[1].split())
  return bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})


def slow_dtype_warning(spec: models.SAESpec) -> str | None:
  """A one-line warning when spec.compute_dtype is likely slower than float32."""
  if spec.compute_dtype != 'bfloat16' or jax.default_backend() != 'cpu':
    return None
  if cpu_has_bfloat16_units() is False:
    return (
        'WARNING: sae.compute_dtype=bfloat16 on a CPU without bfloat16 units '
        '(no avx512_bf16/amx_bf16/bf16 in /proc/cpuinfo): expect it slower '
        'than float32'
    )
  return None
