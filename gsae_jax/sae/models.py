"""Gated and baseline sparse autoencoders and their training losses: the reference.

This module is the paper's math written once, to be read next to it (P =
Rajamanoharan et al. 2024, arXiv 2404.16014; docs/design.md restates what the
code relies on). JAX differentiates it; the stop-gradients below are the
paper's gradient routing. It is the default step on every backend. Faster
formulations of the same step live in gsae_jax/backends/ and are tested equal
to this one.

Shapes: x [batch, d_in], latents f [batch, d_sae]; a stack of N SAEs has every
parameter with a leading [N] axis. Parameters are a flat dict of float32 arrays
named as SAELens names them.

Gated SAE [P §3.2, App. G]:
  pre     = (x - b_dec) W_enc                   one encoder matmul, shared
  pi_gate = pre + b_gate            f_gate = 1[pi_gate > 0]
  pi_mag  = exp(r_mag) * pre + b_mag            weight tying [P Eq. 7]
  f       = f_gate * ReLU(pi_mag);  x_hat = f W_dec + b_dec
Baseline SAE [P §2]:  f = ReLU((x - b_dec) W_enc + b_enc).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, jax.Array]

ARCHITECTURES = ('gated', 'baseline')
# 'l1': the paper's penalty on unit-norm decoder rows, decoder frozen in L_aux.
# 'decoder_norm': penalty weighted by ||W_dec,i||, rows unconstrained, decoder
#   unfrozen in L_aux (freezing it in only one of the two places is worse).
# 'decoder_norm_frozen': the weights ||W_dec,i|| behind a stop-gradient and the
#   decoder frozen in L_aux.
SPARSITY_PENALTIES = ('l1', 'decoder_norm', 'decoder_norm_frozen')
# 'mean': squared errors divided by d_in (the paper's convention);
# 'sum': plain squared L2 norms.
LOSS_SCALES = ('mean', 'sum')
# dtype of the matmul inputs and latents in training; params, optimizer state
# and accumulation stay float32.
COMPUTE_DTYPES = ('float32', 'bfloat16')

# Which axis of each parameter indexes latents (None: no latent axis). Used to
# resample latents and reset their optimizer state with masks.
LATENT_AXIS = {
    'W_enc': 1,
    'b_enc': 0,
    'b_gate': 0,
    'r_mag': 0,
    'b_mag': 0,
    'W_dec': 0,
    'b_dec': None,
}
# Logical axis names of each parameter, mapped to mesh axes by sharding rules.
LOGICAL_AXES = {
    'W_enc': ('d_in', 'd_sae'),
    'b_enc': ('d_sae',),
    'b_gate': ('d_sae',),
    'r_mag': ('d_sae',),
    'b_mag': ('d_sae',),
    'W_dec': ('d_sae', 'd_in'),
    'b_dec': ('d_in',),
}


@dataclasses.dataclass(frozen=True)
class SAESpec:
  """The static description of one SAE: what the compiled code depends on."""

  architecture: str = 'gated'
  d_in: int = 64
  d_sae: int = 512
  sparsity: str = 'l1'
  loss_scale: str = 'mean'
  compute_dtype: str = 'float32'
  # Which formulation of the training forward/backward runs (gsae_jax.backends).
  step_impl: str = 'auto'

  @property
  def unit_norm_decoder(self) -> bool:
    return self.sparsity == 'l1'

  @classmethod
  def from_config(cls, sae_config: Any) -> SAESpec:
    return cls(
        architecture=sae_config.architecture,
        d_in=int(sae_config.d_in),
        d_sae=int(sae_config.d_sae),
        sparsity=sae_config.sparsity,
        loss_scale=sae_config.loss_scale,
        compute_dtype=sae_config.compute_dtype,
        step_impl=sae_config.get('step_impl', 'auto'),
    )


def init_params(spec: SAESpec, key: jax.Array) -> Params:
  """Fresh parameters for one SAE (a flat dict of float32 arrays).

  W_dec rows are random unit directions, W_enc starts as W_dec^T, biases and
  r_mag start at 0 (common practice, [P App. D]). The decoder's key is derived
  from `key` as Flax linen derives a module's first parameter key (fold_in of
  the first 4 bytes of SHA-1 of the counter 1), so a seed gives the same SAE
  as in checkpoints written by v0.1, which initialised through linen.
  """
  counter = int.from_bytes(hashlib.sha1(b'\x01').digest()[:4], 'big')
  key = jax.random.fold_in(key, jnp.uint32(counter))
  w_dec = jax.random.normal(key, (spec.d_sae, spec.d_in), jnp.float32)
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  zeros = jnp.zeros((spec.d_sae,), jnp.float32)
  params = {'W_enc': w_dec.T, 'W_dec': w_dec, 'b_dec': jnp.zeros((spec.d_in,))}
  if spec.architecture == 'gated':
    params.update(b_gate=zeros, r_mag=zeros, b_mag=zeros)
  else:
    params['b_enc'] = zeros
  return params


def matmul(a: jax.Array, b: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """a @ b with inputs in `dtype` (mixed precision), accumulated in float32."""
  return jnp.matmul(
      a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32
  )


def _pre_activations(params: Params, x: jax.Array, dtype: Any) -> jax.Array:
  """(x - b_dec) W_enc  [..., d_sae].

  Computed as x W_enc - b_dec W_enc: the same value, but the gradient to b_dec
  through the encoder is then a mat-vec on the batch-summed cotangent, not a
  second [batch, d_sae] x [d_sae, d_in] product.
  """
  return matmul(x, params['W_enc'], dtype) - params['b_dec'] @ params['W_enc']


def latents(
    spec: SAESpec, params: Params, x: jax.Array, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array]:
  """(f, penalised) for inputs x [..., d_in]: both [..., d_sae].

  f is the SAE's code. `penalised` is what the sparsity penalty and a gated
  SAE's auxiliary loss see: ReLU(pi_gate) for a gated SAE [P Eq. 8], f itself
  for a baseline SAE.
  """
  pre = _pre_activations(params, x, dtype)
  if spec.architecture == 'baseline':
    f = jax.nn.relu(pre + params['b_enc'])
    return f, f
  pi_gate = pre + params['b_gate']
  pi_mag = jnp.exp(params['r_mag']) * pre + params['b_mag']
  # The Heaviside gate has zero gradient: L_rec does not reach the gate path.
  f = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)
  return f, jax.nn.relu(pi_gate)


def encode(spec: SAESpec, params: Params, x: jax.Array) -> jax.Array:
  """Latents f [..., d_sae] for inputs x [..., d_in]."""
  return latents(spec, params, x)[0]


def decode(
    spec: SAESpec, params: Params, f: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
  """Reconstructions [..., d_in] for latents f [..., d_sae]."""
  del spec  # both architectures decode alike
  return matmul(f, params['W_dec'], dtype) + params['b_dec']


def squared_error(spec: SAESpec, x: jax.Array, y: jax.Array) -> jax.Array:
  """||x - y||^2 per example [...], divided by d_in under loss_scale 'mean'."""
  se = jnp.sum(jnp.square(x - y), axis=-1)
  return se / spec.d_in if spec.loss_scale == 'mean' else se


def sparsity_weights(spec: SAESpec, w_dec: jax.Array) -> jax.Array:
  """Per-latent weights [..., d_sae] of the sparsity penalty: 1, or ||W_dec,i||."""
  if spec.sparsity == 'l1':
    return jnp.ones(w_dec.shape[:-1], jnp.float32)
  return jnp.linalg.norm(w_dec, axis=-1)


def forward(spec: SAESpec, params: Params, x: jax.Array, l1_coeff) -> dict:
  """The training forward pass of one SAE, with the paper's gradient routing.

  Returns per-example loss terms l_rec, l_sp, l_aux [batch] [P Eq. 8], the
  latents f [batch, d_sae] (in spec.compute_dtype), `fires` [d_sae] (on how
  many rows each latent is > 0) and reconstructions x_hat [batch, d_in].

    L_rec = ||x - x_hat||^2     reaches the gate path not at all (Heaviside),
                                so b_gate learns only from L_sp and L_aux;
    L_sp  = lam sum_i w_i ReLU(pi_gate)_i, w_i = 1 (paper) or ||W_dec,i||;
                                never reaches r_mag, b_mag or W_dec (paper form);
    L_aux = ||x - (ReLU(pi_gate) sg(W_dec) + sg(b_dec))||^2: nothing to the
                                decoder; b_dec only through the encoder input.
  """
  sg = jax.lax.stop_gradient
  cd = jnp.dtype(spec.compute_dtype)
  f, penalised = latents(spec, params, x, cd)
  f = f.astype(cd)
  x_hat = decode(spec, params, f, cd)
  weights = sparsity_weights(spec, params['W_dec'])
  if spec.sparsity == 'decoder_norm_frozen':
    weights = sg(weights)
  l_aux = jnp.zeros(x.shape[:-1], jnp.float32)
  if spec.architecture == 'gated':
    # The 'decoder_norm' variant unfreezes the decoder in L_aux (see
    # SPARSITY_PENALTIES); the paper's form freezes it.
    unfrozen = spec.sparsity == 'decoder_norm'
    w_aux = params['W_dec'] if unfrozen else sg(params['W_dec'])
    b_aux = params['b_dec'] if unfrozen else sg(params['b_dec'])
    x_aux = matmul(penalised.astype(cd), w_aux, cd) + b_aux
    l_aux = squared_error(spec, x, x_aux)
  return {
      'f': f,
      'fires': jnp.sum(f > 0, axis=0, dtype=jnp.float32),
      'x_hat': x_hat,
      'l_rec': squared_error(spec, x, x_hat),
      'l_sp': jnp.asarray(l1_coeff, jnp.float32) * (penalised @ weights),
      'l_aux': l_aux,
  }


def stacked_forward(
    spec: SAESpec,
    params: Params,
    x: jax.Array,
    l1_coeff: jax.Array,
    latent_sharding=None,
) -> dict:
  """`forward` of a stack of N SAEs on one shared batch, under jax.vmap.

  params are stacked ([N, ...] each), x [batch, d_in] is shared, l1_coeff is
  [N]; every output gains a leading [N] axis. `latent_sharding` (optional)
  pins the [N, batch, d_sae] latents to a sharding on a device mesh.
  """
  l1_coeff = jnp.asarray(l1_coeff, jnp.float32)
  out = jax.vmap(forward, in_axes=(None, 0, None, 0))(spec, params, x, l1_coeff)
  if latent_sharding is not None:
    out['f'] = jax.lax.with_sharding_constraint(out['f'], latent_sharding)
  return out


def loss_terms(spec: SAESpec, params: Params, x: jax.Array, l1_coeff) -> dict:
  """Batch-mean loss terms {'l_rec', 'l_sp', 'l_aux'} (scalars) of one SAE."""
  out = forward(spec, params, x, l1_coeff)
  return {k: jnp.mean(out[k]) for k in ('l_rec', 'l_sp', 'l_aux')}


def jumprelu_threshold(params: Params) -> jax.Array:
  """Threshold theta of the JumpReLU equal to a gated encoder [P App. E].

  f_i = pi_mag_i * 1[pi_mag_i > theta_i] with theta = b_mag - exp(r_mag) b_gate,
  because pi_gate > 0  <=>  pi_mag > theta when the paths are tied.
  """
  return params['b_mag'] - jnp.exp(params['r_mag']) * params['b_gate']


def fold_normalisation(params: Params, scale: float) -> dict[str, np.ndarray]:
  """Parameters acting on raw activations, for a model trained on x * scale.

  encode(x * s) with (W_enc, b_dec) equals encode(x) with (s W_enc, b_dec / s),
  and decode(f) / s equals decode with (W_dec / s, b_dec / s).
  """
  out = {k: np.asarray(v, np.float32) for k, v in params.items()}
  s = np.float32(scale)
  out['W_enc'] = out['W_enc'] * s
  out['W_dec'] = out['W_dec'] / s
  out['b_dec'] = out['b_dec'] / s
  return out
