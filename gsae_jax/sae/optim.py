"""Optimisation: Adam, schedules, the unit-norm decoder, latent resampling.

Per-SAE hyperparameters (sparsity coefficients and k, learning rate, warm-up
lengths) are
arrays in `HParams`, so a stack of SAEs trained under one jax.vmap can differ in
all of them; schedules are pure functions of (step, hparams).
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gsae_jax.sae import models


@flax.struct.dataclass
class HParams:
  """Hyperparameters of one SAE (scalars), or of a stack ([n_sae] arrays)."""

  l1_coeff: jax.Array
  l0_coeff: jax.Array
  k: jax.Array  # int32: active latents per example (TopK family)
  lr: jax.Array
  lr_warmup_steps: jax.Array
  # Warm-up of the sparsity coefficient: train.l1_warmup_steps, or
  # train.l0_warmup_steps for jumprelu (named before the split; checkpoints
  # store it under this name).
  l1_warmup_steps: jax.Array


@flax.struct.dataclass
class Schedule:
  """Static settings of the schedules shared by every SAE of a run."""

  num_steps: int = flax.struct.field(pytree_node=False)
  lr_decay: str = flax.struct.field(pytree_node=False, default='constant')
  lr_decay_fraction: float = flax.struct.field(pytree_node=False, default=0.2)
  resample_warmup_steps: int = flax.struct.field(pytree_node=False, default=1000)

  @classmethod
  def from_config(cls, config: Any) -> Schedule:
    return cls(
        num_steps=int(config.train.num_steps),
        lr_decay=config.train.lr_decay,
        lr_decay_fraction=float(config.train.lr_decay_fraction),
        resample_warmup_steps=int(config.resample.lr_warmup_steps),
    )


def adam(config: Any) -> optax.GradientTransformation:
  """Adam's moment scaling; the learning rate is applied per SAE afterwards."""
  t = config.train
  return optax.scale_by_adam(b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps)


def _ramp(step: jax.Array, length: jax.Array) -> jax.Array:
  """Linear warm-up factor in (0, 1]: (step + 1) / length, 1 if length == 0."""
  length = jnp.maximum(length, 1)
  return jnp.minimum(1.0, (step + 1.0) / length)


def learning_rate(
    schedule: Schedule, hp: HParams, step: jax.Array, last_resample: jax.Array
) -> jax.Array:
  """lr at `step`: warm-up, optional decay, and the post-resampling dip.

  After latents are resampled the lr drops to 0.1x and returns to 1x on a cosine
  over `resample_warmup_steps` [P App. D].
  """
  lr = hp.lr * _ramp(step, hp.lr_warmup_steps)
  if schedule.lr_decay != 'constant':
    decay_len = max(int(schedule.num_steps * schedule.lr_decay_fraction), 1)
    start = schedule.num_steps - decay_len
    t = jnp.clip((step - start) / decay_len, 0.0, 1.0)
    if schedule.lr_decay == 'linear':
      lr = lr * (1.0 - t)
    else:
      lr = lr * 0.5 * (1.0 + jnp.cos(math.pi * t))
  since = (step - last_resample).astype(jnp.float32)
  length = float(max(schedule.resample_warmup_steps, 1))
  t = jnp.clip(since / length, 0.0, 1.0)
  dip = 0.1 + 0.9 * 0.5 * (1.0 - jnp.cos(math.pi * t))
  return lr * jnp.where(since < length, dip, 1.0)


def sparsity_coefficient(hp: HParams, step: jax.Array, architecture: str) -> jax.Array:
  """The penalty's coefficient at `step`, warmed up linearly: the L0
  coefficient for jumprelu, the L1 coefficient otherwise (unused by the TopK
  family)."""
  coeff = hp.l0_coeff if architecture == 'jumprelu' else hp.l1_coeff
  return coeff * _ramp(step, hp.l1_warmup_steps)


def remove_parallel_component(grad_w_dec: jax.Array, w_dec: jax.Array) -> jax.Array:
  """Projects out of each decoder row's gradient its component along the row.

  With unit-norm rows this keeps the step tangent to the sphere; the rows are
  renormalised after the step as well.
  """
  parallel = jnp.sum(grad_w_dec * w_dec, axis=-1, keepdims=True)  # [d_sae, 1]
  return grad_w_dec - parallel * w_dec


def normalise_rows(w_dec: jax.Array) -> jax.Array:
  return w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)


def _latent_mask(name: str, mask: jax.Array, like: jax.Array) -> jax.Array:
  """Broadcasts a [d_sae] mask onto parameter `name`'s latent axis."""
  axis = models.LATENT_AXIS[name]
  if axis is None:
    return jnp.zeros_like(like, dtype=bool)
  shape = [1] * like.ndim
  shape[axis] = mask.shape[0]
  return jnp.broadcast_to(mask.reshape(shape), like.shape)


def reset_latents(tree: dict, mask: jax.Array, new: dict | None = None) -> dict:
  """Entries of latents where `mask` [d_sae] is set are replaced (default 0)."""
  out = {}
  for name, value in tree.items():
    m = _latent_mask(name, mask, value)
    repl = jnp.zeros_like(value) if new is None else new[name]
    out[name] = jnp.where(m, repl, value)
  return out


def resample_params(
    spec: models.SAESpec,
    params: models.Params,
    dead: jax.Array,
    x: jax.Array,
    key: jax.Array,
    encoder_scale: float,
) -> models.Params:
  """New parameters for the `dead` latents [d_sae], aimed at badly fit inputs.

  Inputs are sampled with probability proportional to their squared
  reconstruction loss; each dead latent's decoder row becomes the normalised
  sampled input, its encoder column that direction scaled to `encoder_scale`
  times the mean norm of the live encoder columns, its biases (and r_mag)
  become 0 and a JumpReLU threshold its initial value. Live latents keep their parameters (everything is masked, so this
  works per SAE under vmap).
  """
  out = models.forward(spec, params, x, 0.0)
  loss = jnp.sum(jnp.square(x - out['x_hat']), axis=-1)  # [batch]
  logits = jnp.log(jnp.square(loss) + 1e-30)
  idx = jax.random.categorical(key, logits, shape=(spec.d_sae,))  # [d_sae]
  directions = x[idx] - params['b_dec']  # [d_sae, d_in]
  directions = directions / jnp.maximum(
      jnp.linalg.norm(directions, axis=-1, keepdims=True), 1e-12
  )
  enc_norms = jnp.linalg.norm(params['W_enc'], axis=0)  # [d_sae]
  live = jnp.logical_not(dead)
  mean_live = jnp.sum(enc_norms * live) / jnp.maximum(jnp.sum(live), 1)
  new = {name: jnp.zeros_like(v) for name, v in params.items()}
  new['W_dec'] = directions
  new['W_enc'] = directions.T * (encoder_scale * mean_live)
  if 'log_threshold' in params:
    new['log_threshold'] = jnp.full_like(
        params['log_threshold'], math.log(spec.init_threshold)
    )
  return reset_latents(params, dead, new)
