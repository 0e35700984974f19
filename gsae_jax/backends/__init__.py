"""Backend-specific formulations of the training step, chosen by config.

The reference step is gsae_jax.sae.models (the paper's math, differentiated
by JAX). What lives here computes the same numbers faster on some backend and
is chosen explicitly by `config.sae.step_impl`:

  'autodiff'    the reference, differentiated by JAX;
  'custom_vjp'  backends/custom_vjp.py: a hand-written gradient on blocks,
                plain XLA ops (a CPU cache design);
  'auto'        custom_vjp on the CPU backend, autodiff elsewhere: the
                choice docs/benchmarks.md measured ("Choosing step_impl").

This is the one place that looks at jax.default_backend() to pick a step.
"""

from __future__ import annotations

import jax

from gsae_jax.backends import custom_vjp
from gsae_jax.sae import models

STEP_IMPLS = ('auto', 'autodiff', 'custom_vjp')


def resolve_step_impl(step_impl: str, backend: str | None = None) -> str:
  """'autodiff' or 'custom_vjp' for `step_impl` on `backend` (default: JAX's)."""
  if step_impl not in STEP_IMPLS:
    raise ValueError(f'config.sae.step_impl: {step_impl!r} is not one of {STEP_IMPLS}')
  if step_impl != 'auto':
    return step_impl
  backend = backend or jax.default_backend()
  return 'custom_vjp' if backend == 'cpu' else 'autodiff'


def stacked_forward(
    spec: models.SAESpec, params: models.Params, x, l1_coeff, latent_sharding=None
) -> dict:
  """The training forward of a stack of SAEs, by spec.step_impl.

  Same arguments and outputs as gsae_jax.sae.models.stacked_forward.
  """
  if resolve_step_impl(spec.step_impl) == 'custom_vjp':
    return custom_vjp.stacked_forward(spec, params, x, l1_coeff, latent_sharding)
  return models.stacked_forward(spec, params, x, l1_coeff, latent_sharding)
