"""Gated and baseline sparse autoencoders, and their training losses.

The modules are Flax linen modules used purely: `init_params` returns a plain
dict of arrays named as SAELens names them, and every function here takes
`(params, x)`. Shapes: x [batch, d_in], latents [batch, d_sae].

Gated SAE [P §3.2, App. G] (P = Rajamanoharan et al. 2024, arXiv 2404.16014):
  pre     = (x - b_dec) W_enc                   one encoder matmul, shared
  pi_gate = pre + b_gate            f_gate = 1[pi_gate > 0]
  pi_mag  = exp(r_mag) * pre + b_mag            weight tying [P Eq. 7]
  f       = f_gate * ReLU(pi_mag);  x_hat = f W_dec + b_dec

The encoder input is formed as x W_enc - b_dec W_enc: the same numbers, but the
gradient to b_dec through the encoder becomes a mat-vec over the batch-summed
cotangent instead of a second [batch, d_in] x [d_in, d_sae] product.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
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
  # dtype of the matmul inputs and latents in training; params, optimizer
  # state and accumulation stay float32 ('float32' | 'bfloat16').
  compute_dtype: str = 'float32'

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
    )


def _unit_rows_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  w = jax.random.normal(key, shape, dtype)
  return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


class GatedSAE(nn.Module):
  """Gated SAE with the magnitude path tied to the gate path [P Eq. 7]."""

  d_in: int
  d_sae: int

  def setup(self):
    # W_dec rows are random unit directions; W_enc starts as W_dec^T; biases
    # and r_mag start at 0 (common practice, [P App. D]).
    self.W_dec = self.param('W_dec', _unit_rows_init, (self.d_sae, self.d_in))
    self.W_enc = self.param('W_enc', lambda _: self.W_dec.T)
    self.b_gate = self.param('b_gate', nn.initializers.zeros, (self.d_sae,))
    self.r_mag = self.param('r_mag', nn.initializers.zeros, (self.d_sae,))
    self.b_mag = self.param('b_mag', nn.initializers.zeros, (self.d_sae,))
    self.b_dec = self.param('b_dec', nn.initializers.zeros, (self.d_in,))

  def pre_activations(self, x: jax.Array) -> jax.Array:
    # (x - b_dec) W_enc, formed so that b_dec's gradient is a mat-vec.
    return x @ self.W_enc - self.b_dec @ self.W_enc  # [batch, d_sae]

  def gates(self, pre: jax.Array) -> tuple[jax.Array, jax.Array]:
    pi_gate = pre + self.b_gate
    pi_mag = jnp.exp(self.r_mag) * pre + self.b_mag
    return pi_gate, pi_mag

  def encode(self, x: jax.Array) -> jax.Array:
    pi_gate, pi_mag = self.gates(self.pre_activations(x))
    return jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)

  def decode(self, f: jax.Array) -> jax.Array:
    return f @ self.W_dec + self.b_dec

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decode(self.encode(x))


class BaselineSAE(nn.Module):
  """The ReLU SAE the paper compares against [P §2]."""

  d_in: int
  d_sae: int

  def setup(self):
    self.W_dec = self.param('W_dec', _unit_rows_init, (self.d_sae, self.d_in))
    self.W_enc = self.param('W_enc', lambda _: self.W_dec.T)
    self.b_enc = self.param('b_enc', nn.initializers.zeros, (self.d_sae,))
    self.b_dec = self.param('b_dec', nn.initializers.zeros, (self.d_in,))

  def pre_activations(self, x: jax.Array) -> jax.Array:
    return x @ self.W_enc - self.b_dec @ self.W_enc + self.b_enc

  def encode(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.pre_activations(x))

  def decode(self, f: jax.Array) -> jax.Array:
    return f @ self.W_dec + self.b_dec

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decode(self.encode(x))


def module(spec: SAESpec) -> nn.Module:
  cls = {'gated': GatedSAE, 'baseline': BaselineSAE}[spec.architecture]
  return cls(d_in=spec.d_in, d_sae=spec.d_sae)


def init_params(spec: SAESpec, key: jax.Array) -> Params:
  """Fresh parameters for one SAE (a flat dict of float32 arrays)."""
  m = module(spec)
  x = jnp.zeros((1, spec.d_in), jnp.float32)
  return dict(m.init(key, x)['params'])


def encode(spec: SAESpec, params: Params, x: jax.Array) -> jax.Array:
  """Latents f [..., d_sae] for inputs x [..., d_in]."""
  return module(spec).apply({'params': params}, x, method='encode')


def decode(spec: SAESpec, params: Params, f: jax.Array) -> jax.Array:
  """Reconstructions [..., d_in] for latents f [..., d_sae]."""
  return module(spec).apply({'params': params}, f, method='decode')


def jumprelu_threshold(params: Params) -> jax.Array:
  """Threshold theta of the JumpReLU equal to a gated encoder [P App. E].

  f_i = pi_mag_i * 1[pi_mag_i > theta_i] with theta = b_mag - exp(r_mag) b_gate,
  because pi_gate > 0  <=>  pi_mag > theta when the paths are tied.
  """
  return params['b_mag'] - jnp.exp(params['r_mag']) * params['b_gate']


def _squared_error(spec: SAESpec, x: jax.Array, y: jax.Array) -> jax.Array:
  se = jnp.sum(jnp.square(x - y), axis=-1)  # [batch]
  return se / spec.d_in if spec.loss_scale == 'mean' else se


def stacked_forward(
    spec: SAESpec,
    params: Params,
    x: jax.Array,
    l1_coeff: jax.Array,
    latent_sharding=None,
) -> dict:
  """The training forward pass of a stack of N SAEs on one shared batch.

  params are stacked ([N, ...] each), x [batch, d_in] is shared and l1_coeff is
  [N]. `latent_sharding` (optional) pins the [N, batch, d_sae] latents to a
  sharding on a device mesh. Returns per-example loss terms l_rec, l_sp, l_aux [N, batch], latents f
  [N, batch, d_sae] and reconstructions x_hat [N, batch, d_in].

  Every SAE sees the same x, so the N encoders run as ONE wide matmul
  x @ [W_enc_1 | ... | W_enc_N] (and their weight gradients as one wide
  x^T @ cotangent) instead of N small batched ones, which XLA runs slowly on
  CPU; only the decoders are a batched matmul.

  Gradient routing [P Eq. 8] is built in:
    - L_rec does not reach the gate path (the Heaviside gate has zero gradient),
      so b_gate learns only from L_sp and L_aux while W_enc also learns through
      the tied magnitude path;
    - L_aux uses stop_gradient(W_dec), stop_gradient(b_dec): it reaches b_dec
      only through the encoder input;
    - L_sp reaches neither r_mag, b_mag nor W_dec in the paper form.
  """
  sg = jax.lax.stop_gradient
  w_enc, w_dec, b_dec = params['W_enc'], params['W_dec'], params['b_dec']
  n, d_in, d_sae = w_enc.shape
  batch = x.shape[0]
  wide = jnp.transpose(w_enc, (1, 0, 2)).reshape(d_in, n * d_sae)
  pre = jnp.transpose((x @ wide).reshape(batch, n, d_sae), (1, 0, 2))
  # (x - b_dec) W_enc, with b_dec's gradient a mat-vec, not a second matmul.
  pre = pre - jnp.einsum('ni,nis->ns', b_dec, w_enc)[:, None, :]  # [N, B, S]
  if latent_sharding is not None:  # keep the latents sharded as the weights
    pre = jax.lax.with_sharding_constraint(pre, latent_sharding)
  col = lambda name: params[name][:, None, :]  # [N, 1, S]

  if spec.architecture == 'gated':
    pi_gate = pre + col('b_gate')
    pi_mag = jnp.exp(col('r_mag')) * pre + col('b_mag')
    f = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)
    sparse_acts = jax.nn.relu(pi_gate)
  else:
    f = jax.nn.relu(pre + col('b_enc'))
    sparse_acts = f
  x_hat = jnp.einsum('nbs,nsd->nbd', f, w_dec) + b_dec[:, None, :]

  if spec.sparsity == 'l1':
    sparse_sum = jnp.sum(sparse_acts, axis=-1)  # [N, B]
  else:
    norms = jnp.linalg.norm(w_dec, axis=-1)  # [N, S]
    if spec.sparsity == 'decoder_norm_frozen':
      norms = sg(norms)
    sparse_sum = jnp.einsum('nbs,ns->nb', sparse_acts, norms)
  out = {
      'f': f,
      'x_hat': x_hat,
      'l_rec': _squared_error(spec, x, x_hat),
      'l_sp': jnp.asarray(l1_coeff)[:, None] * sparse_sum,
  }
  if spec.architecture == 'gated':
    if spec.sparsity == 'decoder_norm':
      w_aux, b_aux = w_dec, b_dec
    else:
      w_aux, b_aux = sg(w_dec), sg(b_dec)
    x_aux = jnp.einsum('nbs,nsd->nbd', sparse_acts, w_aux) + b_aux[:, None, :]
    out['l_aux'] = _squared_error(spec, x, x_aux)
  else:
    out['l_aux'] = jnp.zeros_like(out['l_rec'])
  return out


def forward(spec: SAESpec, params: Params, x: jax.Array, l1_coeff) -> dict:
  """`stacked_forward` for one SAE: terms [batch], f [batch, d_sae], x_hat."""
  stack = {k: v[None] for k, v in params.items()}
  out = stacked_forward(spec, stack, x, jnp.reshape(l1_coeff, (1,)))
  return {k: v[0] for k, v in out.items()}


def loss_terms(spec: SAESpec, params: Params, x: jax.Array, l1_coeff) -> dict:
  """Batch-mean loss terms {'l_rec', 'l_sp', 'l_aux'} (scalars)."""
  out = forward(spec, params, x, l1_coeff)
  return {k: jnp.mean(out[k]) for k in ('l_rec', 'l_sp', 'l_aux')}


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
