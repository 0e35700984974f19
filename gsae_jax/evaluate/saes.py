"""The SAEs as the evaluations read them: the resolved spec and device params.

Shared by the core evaluation (runner.py) and the probing and absorption
evaluations, which the runner calls: a module of its own keeps the import
graph acyclic.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gsae_jax import backends
from gsae_jax.sae import models


def spec_of(sae: Any) -> models.SAESpec:
  """The SAE's resolved model spec (its step formulation chosen)."""
  return getattr(sae, 'spec', None) or backends.resolve(
      models.SAESpec.from_config(sae.config.sae)
  )


def device_params(sae: Any) -> dict[str, jax.Array]:
  """The SAE's parameters as float32 device arrays."""
  return {k: jnp.asarray(v, jnp.float32) for k, v in sae.params.items()}
