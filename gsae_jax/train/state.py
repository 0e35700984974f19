"""The train state of a stack of SAEs, and how a fresh one is made.

The state always holds a stack of SAEs on a leading axis (one SAE is a stack of
one); it is a pytree, created already sharded by train/placement.py.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gsae_jax import config as config_lib
from gsae_jax.sae import models, optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer steps taken
  params: dict  # each [n_sae, ...]
  opt_state: Any  # Adam moments, each [n_sae, ...]
  hparams: optim.HParams  # each [n_sae]
  steps_since_fired: jax.Array  # [n_sae, d_sae] int32
  last_resample: jax.Array  # [n_sae] int32: step of the last resampling
  norm_scale: jax.Array  # [] float32: x is multiplied by this before the SAE
  rng: jax.Array  # [n_sae, 2] uint32: per-SAE keys (resampling)
  # First step whose loss was NaN/Inf, per SAE (-1: none); with
  # train.on_nonfinite='freeze' such an SAE stops updating from then on.
  bad_step: jax.Array  # [n_sae] int32
  bad_input_step: jax.Array  # [] int32: first step with a non-finite batch


def hparams_from_config(config: ml_collections.ConfigDict) -> optim.HParams:
  """The per-SAE hyperparameters of the run's stack ([n_sae] arrays)."""
  f32 = lambda name: jnp.asarray(config_lib.stack_values(config, name), jnp.float32)
  return optim.HParams(
      l1_coeff=f32('l1_coeff'),
      l0_coeff=f32('l0_coeff'),
      k=jnp.asarray(config_lib.stack_values(config, 'k'), jnp.int32),
      lr=f32('lr'),
      lr_warmup_steps=f32('lr_warmup_steps'),
      # The warm-up of this architecture's own coefficient (L1, or L0 for
      # jumprelu). The field keeps its first name so checkpoints still load.
      l1_warmup_steps=f32(
          models.SPARSITY_WARMUP.get(config.sae.architecture, 'l1_warmup_steps')
      ),
  )


def seeds_from_config(config: ml_collections.ConfigDict) -> jax.Array:
  """The per-SAE initialisation seeds of the run's stack ([n_sae] uint32)."""
  return jnp.asarray(config_lib.stack_values(config, 'seed'), jnp.uint32)


def init_state(
    config: ml_collections.ConfigDict,
    hparams: optim.HParams,
    seeds: jax.Array,
    norm_scale: float,
) -> TrainState:
  """A fresh state for a stack of SAEs, SAE i initialised from seeds[i]."""
  spec = models.SAESpec.for_run(config)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
  params = jax.vmap(functools.partial(models.init_params, spec))(keys)
  if config.train.w_enc_init == 'random':
    params['W_enc'] = jax.vmap(functools.partial(_random_encoder, spec))(keys)
  opt_state = jax.vmap(optim.adam(config).init)(params)
  n_sae = keys.shape[0]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=opt_state,
      hparams=hparams,
      steps_since_fired=jnp.zeros((n_sae, spec.d_sae), jnp.int32),
      last_resample=jnp.full((n_sae,), -(10**9), jnp.int32),
      norm_scale=jnp.asarray(norm_scale, jnp.float32),
      rng=jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys),
      bad_step=jnp.full((n_sae,), -1, jnp.int32),
      bad_input_step=jnp.full((), -1, jnp.int32),
  )


def _random_encoder(spec: models.SAESpec, key: jax.Array) -> jax.Array:
  """W_enc [d_in, d_sae] with random unit columns drawn apart from W_dec's."""
  key = jax.random.fold_in(key, 2)  # not the decoder's key (models.init_params)
  w = jax.random.normal(key, (spec.d_in, spec.d_sae), jnp.float32)
  return w / jnp.linalg.norm(w, axis=0, keepdims=True)


def dead_window_steps(config: ml_collections.ConfigDict) -> int:
  return max(1, math.ceil(config.train.dead_window_tokens / config.train.batch_size))


def summary(state: TrainState) -> dict:
  """JSON-able per-SAE facts about a state (for sweep indexes and tests)."""
  return {'step': int(state.step), 'norm_scale': float(state.norm_scale)}


def host_params(state: TrainState, index: int = 0) -> dict[str, np.ndarray]:
  """SAE `index`'s parameters as NumPy (normalised units)."""
  return {k: np.asarray(v[index]) for k, v in state.params.items()}
