"""Sparse autoencoders and their training losses: the reference.

This module is the papers' math written once, to be read next to them
(docs/design.md §1 restates what the code relies on, with each choice's
section and units). JAX differentiates it; the stop-gradients and the two
straight-through estimators below are the papers' gradient routing. It is the
default step on every backend. Faster formulations of the same step live in
gsae_jax/backends/ and are tested equal to this one.

  G  = Rajamanoharan et al. 2024, Gated SAEs, arXiv 2404.16014 (the paper, [P]);
  J  = Rajamanoharan et al. 2024, JumpReLU SAEs, arXiv 2407.14435;
  T  = Gao et al. 2024, Scaling and evaluating sparse autoencoders (TopK),
       arXiv 2406.04093;
  B  = Bussmann et al. 2024, BatchTopK SAEs, arXiv 2412.06410;
  M  = Bussmann et al. 2025, Matryoshka SAEs, arXiv 2503.17547.

Shapes: x [batch, d_in], latents f [batch, d_sae]; a stack of N SAEs has every
parameter with a leading [N] axis. Parameters are a flat dict of float32 arrays
named as SAELens names them. Every architecture shares one encoder matmul,
pre = (x - b_dec) W_enc, and one decoder, x_hat = f W_dec + b_dec:

  gated      pi_gate = pre + b_gate, pi_mag = exp(r_mag) pre + b_mag,
             f = 1[pi_gate > 0] ReLU(pi_mag)                 [G §3.2, Eq. 7]
  baseline   f = ReLU(pre + b_enc)                            [G §2]
  jumprelu   z = pre + b_enc, f = z H(z - theta), theta = exp(log_threshold),
             L0 penalty sum_i H(z_i - theta_i)               [J §3, Eq. 8-11]
  topk       f = ReLU(z) on the k largest z of each row       [T §2.3]
  batchtopk  f = ReLU(z) on the k x batch largest of the batch; at inference
             a JumpReLU with one global threshold            [B §3]
  matryoshka_batchtopk
             batchtopk latents, a reconstruction loss for each nested prefix
             of the dictionary, summed                        [M §3]

The three TopK architectures add the AuxK loss on dead latents [T App. A.2].
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax.sae import select

Params = dict[str, jax.Array]

ARCHITECTURES = (
    'gated',
    'baseline',
    'jumprelu',
    'topk',
    'batchtopk',
    'matryoshka_batchtopk',
)
# Architectures whose sparsity is set by k (active latents per example).
TOPK_FAMILY = ('topk', 'batchtopk', 'matryoshka_batchtopk')
# Architectures that learn with an L1 penalty (sae.l1_coeff); jumprelu's
# penalty is L0 (sae.l0_coeff); the TopK family's sparsity is k (sae.k).
L1_FAMILY = ('gated', 'baseline')
# The sparsity knob of each architecture: the config field a sweep varies.
SPARSITY_KNOB = {
    'gated': 'l1_coeff',
    'baseline': 'l1_coeff',
    'jumprelu': 'l0_coeff',
    'topk': 'k',
    'batchtopk': 'k',
    'matryoshka_batchtopk': 'k',
}
# The warm-up of each penalised architecture's sparsity coefficient: the config
# field (train.*, sweep.*) that sets its length. The TopK family has none.
SPARSITY_WARMUP = {
    'gated': 'l1_warmup_steps',
    'baseline': 'l1_warmup_steps',
    'jumprelu': 'l0_warmup_steps',
}
# 'l1': the paper's penalty on unit-norm decoder rows, decoder frozen in L_aux.
# 'decoder_norm': penalty weighted by ||W_dec,i||, rows unconstrained, decoder
#   unfrozen in L_aux (freezing it in only one of the two places is worse).
# 'decoder_norm_frozen': the weights ||W_dec,i|| behind a stop-gradient and the
#   decoder frozen in L_aux.
# Architectures other than gated and baseline take 'l1' only, which for them
# means the unit-norm decoder their papers train with.
SPARSITY_PENALTIES = ('l1', 'decoder_norm', 'decoder_norm_frozen')
# 'mean': squared errors divided by d_in (the paper's convention);
# 'sum': plain squared L2 norms.
LOSS_SCALES = ('mean', 'sum')
# dtype of the matmul inputs and latents in training; params, optimizer state
# and accumulation stay float32.
COMPUTE_DTYPES = ('float32', 'bfloat16')
SELECT_IMPLS = select.SELECT_IMPLS

# Which axis of each parameter indexes latents (None: no latent axis). Used to
# resample latents and reset their optimizer state with masks.
LATENT_AXIS = {
    'W_enc': 1,
    'b_enc': 0,
    'b_gate': 0,
    'r_mag': 0,
    'b_mag': 0,
    'log_threshold': 0,
    'W_dec': 0,
    'b_dec': None,
    'threshold': None,
}
# Logical axis names of each parameter, mapped to mesh axes by sharding rules.
LOGICAL_AXES = {
    'W_enc': ('d_in', 'd_sae'),
    'b_enc': ('d_sae',),
    'b_gate': ('d_sae',),
    'r_mag': ('d_sae',),
    'b_mag': ('d_sae',),
    'log_threshold': ('d_sae',),
    'W_dec': ('d_sae', 'd_in'),
    'b_dec': ('d_in',),
    'threshold': (),
}
# Parameters that are running statistics, not trained: their gradient is 0 and
# the step sets them from the forward pass's 'stats' (BatchTopK's threshold).
RUNNING_STATS = ('threshold',)


@dataclasses.dataclass(frozen=True)
class SAESpec:
  """The static description of one SAE (or a stack): what compiled code depends on.

  Thresholds and bandwidths are in the units the SAE sees (activations
  normalised to E||x||^2 = d_in); `from_config` converts the config's paper
  units (E||x||^2 = 1, [J App.]) by sqrt(d_in).
  """

  architecture: str = 'gated'
  d_in: int = 64
  d_sae: int = 512
  sparsity: str = 'l1'
  loss_scale: str = 'mean'
  compute_dtype: str = 'float32'
  # Which formulation of the training forward/backward runs (gsae_jax.backends).
  step_impl: str = 'auto'
  # TopK family: the largest k of the stack (per-SAE k are arrays <= k_max).
  k_max: int = 0
  # AuxK [T App. A.2]: dead latents used (k_aux) and the loss coefficient.
  aux_k: int = 0
  aux_coeff: float = 1 / 32
  # JumpReLU [J §4]: the rectangle kernel's bandwidth and the initial threshold.
  bandwidth: float = 0.0
  init_threshold: float = 0.0
  # BatchTopK [B §3]: the running threshold's update rate per step.
  threshold_rate: float = 0.01
  # Matryoshka [M §3]: the end of each nested prefix (the last is d_sae).
  prefixes: tuple[int, ...] = ()
  # How the top-k threshold is found (gsae_jax/sae/select.py).
  select_impl: str = 'auto'

  @property
  def unit_norm_decoder(self) -> bool:
    return self.sparsity == 'l1'

  @classmethod
  def from_config(cls, sae_config: Any, k_max: int | None = None) -> SAESpec:
    """The spec of `sae_config` (config.sae); `k_max` overrides sae.k for a
    stack whose SAEs have several k (see `for_run`)."""
    c = sae_config
    d_in, d_sae, arch = int(c.d_in), int(c.d_sae), c.architecture
    g = lambda name, default: c.get(name, default)
    spec = dict(
        architecture=arch,
        d_in=d_in,
        d_sae=d_sae,
        sparsity=c.sparsity,
        loss_scale=c.loss_scale,
        compute_dtype=c.compute_dtype,
        step_impl=g('step_impl', 'auto'),
        select_impl=g('select_impl', 'auto'),
    )
    if arch == 'jumprelu':
      unit = math.sqrt(d_in)
      spec.update(
          bandwidth=float(g('jumprelu_bandwidth', 1e-3)) * unit,
          init_threshold=float(g('jumprelu_init_threshold', 1e-3)) * unit,
      )
    if arch in TOPK_FAMILY:
      aux_k = int(g('aux_k', 0)) or d_in // 2
      spec.update(
          k_max=int(k_max if k_max is not None else g('k', 32)),
          aux_k=min(aux_k, d_sae),
          aux_coeff=float(g('aux_coeff', 1 / 32)),
      )
    if arch == 'batchtopk' or arch == 'matryoshka_batchtopk':
      spec['threshold_rate'] = float(g('batchtopk_threshold_rate', 0.01))
    if arch == 'matryoshka_batchtopk':
      spec['prefixes'] = matryoshka_prefixes(g('matryoshka_prefixes', (1.0,)), d_sae)
    return cls(**spec)

  @classmethod
  def for_run(cls, config: Any) -> SAESpec:
    """The spec of a run's whole stack (config.stack may hold several k)."""
    ks = tuple(config.stack.get('k', ())) or (config.sae.get('k', 32),)
    return cls.from_config(config.sae, k_max=max(int(k) for k in ks))


def matryoshka_prefixes(fractions, d_sae: int) -> tuple[int, ...]:
  """Prefix ends [M §3] from fractions of d_sae: increasing, the last d_sae."""
  ends = sorted({max(1, min(d_sae, round(float(f) * d_sae))) for f in fractions})
  if ends[-1] != d_sae:
    ends.append(d_sae)
  return tuple(ends)


def init_params(spec: SAESpec, key: jax.Array) -> Params:
  """Fresh parameters for one SAE (a flat dict of float32 arrays).

  W_dec rows are random unit directions, W_enc starts as W_dec^T ([T §2.4]
  for TopK; common practice for the others, [G App. D]), biases and r_mag
  start at 0, JumpReLU thresholds at `spec.init_threshold` [J App.], and a
  BatchTopK threshold at -1 (not yet estimated: set by the first step). The
  decoder's key is derived from `key` as Flax linen derives a module's first
  parameter key (fold_in of the first 4 bytes of SHA-1 of the counter 1), so
  a seed gives the same SAE as in checkpoints written by v0.1, which
  initialised through linen.
  """
  counter = int.from_bytes(hashlib.sha1(b'\x01').digest()[:4], 'big')
  key = jax.random.fold_in(key, jnp.uint32(counter))
  w_dec = jax.random.normal(key, (spec.d_sae, spec.d_in), jnp.float32)
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  zeros = jnp.zeros((spec.d_sae,), jnp.float32)
  params = {'W_enc': w_dec.T, 'W_dec': w_dec, 'b_dec': jnp.zeros((spec.d_in,))}
  if spec.architecture == 'gated':
    params.update(b_gate=zeros, r_mag=zeros, b_mag=zeros)
    return params
  params['b_enc'] = zeros
  if spec.architecture == 'jumprelu':
    params['log_threshold'] = jnp.full((spec.d_sae,), math.log(spec.init_threshold))
  if spec.architecture in ('batchtopk', 'matryoshka_batchtopk'):
    params['threshold'] = jnp.full((), -1.0, jnp.float32)
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


# ---------------------------------------------------------------------------
# JumpReLU's straight-through estimators [J §4].


def rectangle(u: jax.Array) -> jax.Array:
  """The kernel K(u) = 1[|u| < 1/2] of the pseudo-derivatives [J Eq. 11]."""
  return (jnp.abs(u) < 0.5).astype(u.dtype)


def _sum_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jnp.sum(g, axis=tuple(range(g.ndim - len(shape))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
  """z H(z - theta), with d/dtheta = -(theta / eps) K((z - theta) / eps) [J Eq. 11]
  and d/dz = H(z - theta) (no estimator for z)."""
  return jnp.where(z > theta, z, 0.0)


def _jumprelu_fwd(z, theta, bandwidth):
  return jumprelu(z, theta, bandwidth), (z, theta)


def _jumprelu_bwd(bandwidth, residuals, g):
  z, theta = residuals
  dz = jnp.where(z > theta, g, 0.0)
  dtheta = -(theta / bandwidth) * rectangle((z - theta) / bandwidth) * g
  return dz, _sum_to(dtheta, theta.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
  """H(z - theta), with d/dtheta = -(1 / eps) K((z - theta) / eps) [J Eq. 12]
  and no gradient to z."""
  return (z > theta).astype(z.dtype)


def _heaviside_fwd(z, theta, bandwidth):
  return heaviside(z, theta, bandwidth), (z, theta)


def _heaviside_bwd(bandwidth, residuals, g):
  z, theta = residuals
  dtheta = -(1.0 / bandwidth) * rectangle((z - theta) / bandwidth) * g
  return jnp.zeros_like(z), _sum_to(dtheta, theta.shape)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


# ---------------------------------------------------------------------------
# Latents.


def _topk_rows(spec: SAESpec, z: jax.Array, k) -> jax.Array:
  """ReLU of the k largest entries of each row of z [..., d_sae], others 0 [T]."""
  thr = select.kth_largest(z, k, spec.k_max, spec.select_impl)
  return jnp.where((z >= thr[..., None]) & (z > 0), z, 0.0)


def _topk_batch(spec: SAESpec, z: jax.Array, k) -> jax.Array:
  """The k x batch largest entries of ReLU(z) [batch, d_sae], others 0 [B §3]."""
  a = jax.nn.relu(z)
  rows = a.shape[0]
  thr = select.kth_largest(a.reshape(-1), k * rows, spec.k_max * rows, spec.select_impl)
  return jnp.where((a >= thr) & (a > 0), a, 0.0)


def _threshold_update(spec: SAESpec, theta: jax.Array, f: jax.Array) -> jax.Array:
  """BatchTopK's inference threshold [B §3]: a running mean of the smallest
  positive latent of each training batch (the first batch sets it)."""
  smallest = jnp.min(jnp.where(f > 0, f, jnp.inf))
  new = jnp.where(theta < 0, smallest, theta + spec.threshold_rate * (smallest - theta))
  return jax.lax.stop_gradient(jnp.where(jnp.isfinite(smallest), new, theta))


def latents(
    spec: SAESpec,
    params: Params,
    x: jax.Array,
    dtype: Any = jnp.float32,
    k=None,
    training: bool = True,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """(f, penalised, z) for inputs x [..., d_in]: each [..., d_sae].

  f is the SAE's code. `penalised` is what the sparsity penalty sees per
  latent: ReLU(pi_gate) for a gated SAE (also its auxiliary loss's code)
  [G Eq. 8], f for a baseline SAE, H(z - theta) for a JumpReLU SAE (its L0
  [J Eq. 10]); None for the TopK family. z = pre + b_enc is the encoder
  output before the activation (None for a gated SAE), which AuxK ranks.

  `training` False gives inference-time latents: BatchTopK and Matryoshka
  then use their estimated threshold, f = ReLU(z) 1[z > theta] [B §3].
  `k` (TopK family; default spec.k_max) may be a traced per-SAE value.
  """
  pre = _pre_activations(params, x, dtype)
  arch = spec.architecture
  if arch == 'gated':
    pi_gate = pre + params['b_gate']
    pi_mag = jnp.exp(params['r_mag']) * pre + params['b_mag']
    # The Heaviside gate has zero gradient: L_rec does not reach the gate path.
    f = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)
    return f, jax.nn.relu(pi_gate), None
  z = pre + params['b_enc']
  if arch == 'baseline':
    f = jax.nn.relu(z)
    return f, f, z
  if arch == 'jumprelu':
    theta = jnp.exp(params['log_threshold'])
    f = jumprelu(z, theta, spec.bandwidth)
    return f, heaviside(z, theta, spec.bandwidth), z
  k = spec.k_max if k is None else k
  if arch == 'topk':
    return _topk_rows(spec, z, k), None, z
  if not training:
    theta = params['threshold']
    return jnp.where((z > theta) & (z > 0), z, 0.0), None, z
  return _topk_batch(spec, z, k), None, z


def encode(spec: SAESpec, params: Params, x: jax.Array) -> jax.Array:
  """Inference-time latents f [..., d_sae] for inputs x [..., d_in]."""
  return latents(spec, params, x, training=False)[0]


def decode(
    spec: SAESpec, params: Params, f: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
  """Reconstructions [..., d_in] for latents f [..., d_sae]."""
  del spec  # every architecture decodes alike
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


def _nested_reconstructions(spec: SAESpec, params: Params, f: jax.Array, cd):
  """(x_hat of the whole dictionary, [x_hat of each prefix]) [M §3]: prefix m
  decodes latents [0, prefixes[m]) only."""
  partial = params['b_dec']
  out, start = [], 0
  for end in spec.prefixes:
    partial = partial + matmul(f[..., start:end], params['W_dec'][start:end], cd)
    out.append(partial)
    start = end
  return partial, out


def _auxk_loss(spec: SAESpec, params: Params, x, x_hat, z, dead, cd) -> jax.Array:
  """AuxK [T App. A.2]: the k_aux largest dead latents (by z) reconstruct the
  residual e = x - x_hat (a constant target); 0 when no latent is dead."""
  e = jax.lax.stop_gradient(x - x_hat)
  z_dead = jnp.where(dead, z, -jnp.inf)
  thr = select.kth_largest(z_dead, spec.aux_k, spec.aux_k, spec.select_impl)
  z_aux = jnp.where(dead & (z_dead >= thr[..., None]), z, 0.0)
  e_hat = matmul(z_aux.astype(cd), params['W_dec'], cd)
  return jnp.where(jnp.any(dead), spec.aux_coeff * squared_error(spec, e, e_hat), 0.0)


def forward(
    spec: SAESpec,
    params: Params,
    x: jax.Array,
    sparsity_coeff,
    k=None,
    dead=None,
) -> dict:
  """The training forward pass of one SAE, with the papers' gradient routing.

  `sparsity_coeff` is the L1 coefficient (gated, baseline) or the L0
  coefficient (jumprelu), unused by the TopK family, whose `k` (default
  spec.k_max) sets the sparsity. `dead` [d_sae] (bool) marks the latents
  AuxK may use (TopK family; None = none dead).

  Returns per-example loss terms l_rec, l_sp, l_aux [batch], the latents f
  [batch, d_sae] (in spec.compute_dtype), `fires` [d_sae] (on how many rows
  each latent is > 0), reconstructions x_hat [batch, d_in] and, where the
  SAE has RUNNING_STATS parameters, `stats` (their new values: BatchTopK's
  threshold).

  Gated [G Eq. 8]:
    L_rec = ||x - x_hat||^2     reaches the gate path not at all (Heaviside),
                                so b_gate learns only from L_sp and L_aux;
    L_sp  = lam sum_i w_i ReLU(pi_gate)_i, w_i = 1 (paper) or ||W_dec,i||;
                                never reaches r_mag, b_mag or W_dec (paper form);
    L_aux = ||x - (ReLU(pi_gate) sg(W_dec) + sg(b_dec))||^2: nothing to the
                                decoder; b_dec only through the encoder input.
  Baseline: L_rec + lam sum_i w_i f_i [G §2].
  JumpReLU: L_rec + lam sum_i H(z_i - theta_i), theta learning through the
    straight-through estimators of `jumprelu` and `heaviside` [J §4].
  TopK family: L_rec (Matryoshka: summed over the nested prefixes [M §3]) +
    AuxK [T App. A.2]; no sparsity penalty.
  """
  sg = jax.lax.stop_gradient
  cd = jnp.dtype(spec.compute_dtype)
  arch = spec.architecture
  f, penalised, z = latents(spec, params, x, cd, k)
  f = f.astype(cd)
  zeros = jnp.zeros(x.shape[:-1], jnp.float32)
  coeff = jnp.asarray(sparsity_coeff, jnp.float32)
  stats = {}
  if arch == 'matryoshka_batchtopk':
    x_hat, prefixes = _nested_reconstructions(spec, params, f, cd)
    l_rec = sum(squared_error(spec, x, p) for p in prefixes)
  else:
    x_hat = decode(spec, params, f, cd)
    l_rec = squared_error(spec, x, x_hat)
  l_sp, l_aux = zeros, zeros
  if arch in L1_FAMILY:
    weights = sparsity_weights(spec, params['W_dec'])
    if spec.sparsity == 'decoder_norm_frozen':
      weights = sg(weights)
    l_sp = coeff * (penalised @ weights)
  elif arch == 'jumprelu':
    l_sp = coeff * jnp.sum(penalised, axis=-1)
  if arch == 'gated':
    # The 'decoder_norm' variant unfreezes the decoder in L_aux (see
    # SPARSITY_PENALTIES); the paper's form freezes it.
    unfrozen = spec.sparsity == 'decoder_norm'
    w_aux = params['W_dec'] if unfrozen else sg(params['W_dec'])
    b_aux = params['b_dec'] if unfrozen else sg(params['b_dec'])
    x_aux = matmul(penalised.astype(cd), w_aux, cd) + b_aux
    l_aux = squared_error(spec, x, x_aux)
  elif arch in TOPK_FAMILY and dead is not None:
    l_aux = _auxk_loss(spec, params, x, x_hat, z, dead, cd)
  if 'threshold' in params:
    stats['threshold'] = _threshold_update(spec, params['threshold'], f)
  out = {
      'f': f,
      'fires': jnp.sum(f > 0, axis=0, dtype=jnp.float32),
      'x_hat': x_hat,
      'l_rec': l_rec,
      'l_sp': l_sp,
      'l_aux': l_aux,
  }
  if stats:
    out['stats'] = stats
  return out


def stacked_forward(
    spec: SAESpec,
    params: Params,
    x: jax.Array,
    sparsity_coeff: jax.Array,
    latent_sharding=None,
    k=None,
    dead=None,
) -> dict:
  """`forward` of a stack of N SAEs on one shared batch, under jax.vmap.

  params are stacked ([N, ...] each), x [batch, d_in] is shared,
  sparsity_coeff and k are [N], dead [N, d_sae]; every output gains a leading
  [N] axis. `latent_sharding` (optional) pins the [N, batch, d_sae] latents to
  a sharding on a device mesh.
  """
  coeff = jnp.asarray(sparsity_coeff, jnp.float32)
  n = coeff.shape[0]
  k = jnp.full((n,), spec.k_max, jnp.int32) if k is None else jnp.asarray(k, jnp.int32)
  dead_axis = None if dead is None else 0
  out = jax.vmap(functools.partial(forward, spec), in_axes=(0, None, 0, 0, dead_axis))(
      params, x, coeff, k, dead
  )
  if latent_sharding is not None:
    out['f'] = jax.lax.with_sharding_constraint(out['f'], latent_sharding)
  return out


def loss_terms(
    spec: SAESpec, params: Params, x: jax.Array, sparsity_coeff, k=None, dead=None
) -> dict:
  """Batch-mean loss terms {'l_rec', 'l_sp', 'l_aux'} (scalars) of one SAE."""
  out = forward(spec, params, x, sparsity_coeff, k, dead)
  return {name: jnp.mean(out[name]) for name in ('l_rec', 'l_sp', 'l_aux')}


def jumprelu_threshold(params: Params) -> jax.Array:
  """Threshold theta of the JumpReLU equal to a gated encoder [G App. E].

  f_i = pi_mag_i * 1[pi_mag_i > theta_i] with theta = b_mag - exp(r_mag) b_gate,
  because pi_gate > 0  <=>  pi_mag > theta when the paths are tied.
  """
  return params['b_mag'] - jnp.exp(params['r_mag']) * params['b_gate']


def fold_normalisation(params: Params, scale: float) -> dict[str, np.ndarray]:
  """Parameters acting on raw activations, for a model trained on x * scale.

  encode(x * s) with (W_enc, b_dec) equals encode(x) with (s W_enc, b_dec / s),
  and decode(f) / s equals decode with (W_dec / s, b_dec / s). Pre-activations
  keep their values, so thresholds and encoder biases are unchanged.
  """
  out = {k: np.asarray(v, np.float32) for k, v in params.items()}
  s = np.float32(scale)
  out['W_enc'] = out['W_enc'] * s
  out['W_dec'] = out['W_dec'] / s
  out['b_dec'] = out['b_dec'] / s
  return out
