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
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax import cpu_kernels

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
  sharding on a device mesh. Returns per-example loss terms l_rec, l_sp, l_aux
  [N, batch], latents f [N, batch, d_sae] (in spec.compute_dtype; a gated
  SAE's closed gates hold -0.0, see `_CLOSED`), `fires` [N, d_sae] (on how
  many rows each latent is > 0) and reconstructions x_hat [N, batch, d_in]
  (float32).

  Every SAE sees the same x: a small stack (or one sharded over devices) runs
  its N encoders as ONE wide matmul x @ [W_enc_1 | ... | W_enc_N], which XLA
  runs faster on CPU than N small batched ones; a large one runs in blocks of
  one SAE each (below), big enough to keep the matmuls efficient.

  Gradient routing [P Eq. 8] is built in:
    - L_rec does not reach the gate path (the Heaviside gate has zero gradient),
      so b_gate learns only from L_sp and L_aux while W_enc also learns through
      the tied magnitude path;
    - L_aux uses stop_gradient(W_dec), stop_gradient(b_dec): it reaches b_dec
      only through the encoder input;
    - L_sp reaches neither r_mag, b_mag nor W_dec in the paper form.

  The gradient is written by hand (a custom VJP: `_stack_forward`,
  `_stack_backward`) so that a step does only the must-do matmuls -- 7 of
  batch x d_in x d_sae for a gated SAE, 5 for a baseline -- all of them with
  inputs in spec.compute_dtype and float32 accumulation, and so that no
  [batch, d_sae] intermediate makes a round trip to memory: the forward runs
  on blocks of batch rows, the backward on blocks of latents, each block's
  elementwise work done while its matmul outputs are in cache -- for a gated
  SAE in one pass a block each way, in fused CPU kernels (`cpu_kernels`; plain
  XLA ops where they cannot build). That is a CPU design: on other backends
  the same forward is differentiated by JAX (`_autodiff_forward`), which an
  H200 ran 1.3x faster than the custom VJP.
  """
  l1_coeff = jnp.asarray(l1_coeff, jnp.float32)
  if jax.default_backend() != 'cpu':
    return _autodiff_forward(spec, params, x, l1_coeff, latent_sharding)
  return _stack(spec, latent_sharding, params, x, l1_coeff)


def _autodiff_forward(spec: SAESpec, params: Params, x, l1_coeff, latent_sharding):
  """stacked_forward in plain JAX, for jax.grad; the routing by stop_gradient.

  Products take inputs in spec.compute_dtype and accumulate in float32.
  """
  cd = jnp.dtype(spec.compute_dtype)
  sg = jax.lax.stop_gradient
  w_enc, w_dec, b_dec = params['W_enc'], params['W_dec'], params['b_dec']
  gated = spec.architecture == 'gated'
  mm = lambda eq, a, b: jnp.einsum(
      eq, a.astype(cd), b.astype(cd), preferred_element_type=jnp.float32
  )
  x = jnp.asarray(x)
  pre = mm('bi,nis->nbs', x, w_enc)
  pre = _constrain(
      pre - jnp.einsum('ni,nis->ns', b_dec, w_enc)[:, None], latent_sharding
  )
  col = lambda name: params[name][:, None, :]  # [N, 1, S]
  if gated:
    pi_gate = pre + col('b_gate')
    pi_mag = jnp.exp(col('r_mag')) * pre + col('b_mag')
    # No gradient to the gate; closed gates hold -0.0, as on the CPU path.
    f = jnp.where(pi_gate > 0, jnp.where(pi_mag > 0, pi_mag, 0.0), _CLOSED)
    acts = jax.nn.relu(pi_gate)
  else:
    f = acts = jax.nn.relu(pre + col('b_enc'))
  f = _constrain(f.astype(cd), latent_sharding)
  weights = _sparsity_weights(spec, w_dec)
  if spec.sparsity == 'decoder_norm_frozen':
    weights = sg(weights)
  x_hat = mm('nbs,nsd->nbd', f, w_dec) + b_dec[:, None, :]
  out = {
      'f': f,
      'fires': jnp.sum(f > 0, axis=1, dtype=jnp.float32),
      'x_hat': x_hat,
      'l_rec': _squared_error(spec, x, x_hat),
      'l_sp': l1_coeff[:, None] * jnp.einsum('nbs,ns->nb', acts, weights),
      'l_aux': jnp.zeros(x_hat.shape[:2]),
  }
  if gated:
    # L_aux trains the decoder only in the 'decoder_norm' variant.
    w_aux, b_aux = (
        (w_dec, b_dec) if spec.sparsity == 'decoder_norm' else (sg(w_dec), sg(b_dec))
    )
    out['l_aux'] = _squared_error(
        spec, x, mm('nbs,nsd->nbd', acts, w_aux) + b_aux[:, None, :]
    )
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stack(spec: SAESpec, latent_sharding, params: Params, x, l1_coeff) -> dict:
  return _stack_forward(spec, latent_sharding, params, x, l1_coeff)[0]


# Blocks hold about this many [batch, d_sae] elements (16 MiB in float32):
# at batch 4096, d_sae 4096, 1024 rows forward and 1024 latents backward.
# Larger blocks keep the products nearer their full-size speed; in timings
# on 2 cores (benchmarks/bench_step.py), 1024-blocks beat 512 by 1-3 points
# of ceiling A, and 2048 gained nothing more.
_BLOCK_ELEMENTS = 1 << 22


def _block_size(length: int, other: int, latent_sharding) -> int:
  """Block length along an axis of `length` for [length, other] blocks.

  `length` itself means no blocks: when the whole array is small, when its
  axis has no divisor near the target, or when it is sharded over devices.
  """
  target = max(1, _BLOCK_ELEMENTS // other)
  if latent_sharding is not None or length <= target:
    return length
  size = max(r for r in range(1, target + 1) if length % r == 0)
  return size if size * 4 >= target else length


# A gated SAE's latent is 0 where its gate is closed, and also where the gate is
# open but ReLU(pi_mag) is 0. The forward pass stores the first zero as -0.0
# and the second as +0.0: f stays the same numbers (-0.0 == 0, f > 0 and
# matmuls are unchanged), and its sign bit carries the gate mask pi_gate > 0
# that the backward pass needs, so no second [N, batch, d_sae] array is kept.
_CLOSED = -0.0


def _bits(a: jax.Array) -> jax.Array:
  """bfloat16 viewed as uint16, to be sliced and updated in loops.

  XLA on CPU runs a bfloat16 dynamic-(update-)slice in float32, converting
  the whole array there and back at every step of a loop.
  """
  if a.dtype == jnp.bfloat16:
    return jax.lax.bitcast_convert_type(a, jnp.uint16)
  return a


def _from_bits(a: jax.Array, dtype) -> jax.Array:
  return a if a.dtype == dtype else jax.lax.bitcast_convert_type(a, dtype)


def _dot(a, b, contract, batch=((), ()), dtype=jnp.float32) -> jax.Array:
  """dot_general of a and b cast to `dtype`, accumulated and returned in float32."""
  return jax.lax.dot_general(
      a.astype(dtype),
      b.astype(dtype),
      (contract, batch),
      preferred_element_type=jnp.float32,
  )


def _bmm(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """[N, i, k] @ [N, k, j] -> [N, i, j] (one matmul per SAE)."""
  return _dot(a, b, ((2,), (1,)), ((0,), (0,)), dtype)


def _bmm_nt(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """[N, i, k] x [N, j, k] -> [N, i, j]: a b^T, b read as it lies in memory."""
  return _dot(a, b, ((2,), (2,)), ((0,), (0,)), dtype)


def _transposed(a: jax.Array, dtype, row: jax.Array | None = None) -> jax.Array:
  """[..., B, k] -> [..., k, B] in `dtype`, with `row` [..., B] below if given.

  The matmuls that contract the batch read this small operand transposed in
  memory (reading [B, k] transposed inside the matmul is slower). The barrier
  keeps XLA from folding the transpose back into the matmul: it stays a
  layout copy, which XLA's transpose emitter does at memory speed. A row
  rides along as one more row of the product (a ones row sums the other
  operand over the batch), but costs a slower copy: XLA fuses the transpose
  into the concatenation, which reads `a` column by column (at k = 512,
  float32: 5.7 vs 0.9 ms for [4096, 512]).
  """
  a_t = jax.lax.optimization_barrier(jnp.swapaxes(a, -1, -2).astype(dtype))
  if row is None:
    return a_t
  return jnp.concatenate([a_t, row[..., None, :].astype(dtype)], axis=-2)


def _constrain(a: jax.Array, sharding) -> jax.Array:
  return a if sharding is None else jax.lax.with_sharding_constraint(a, sharding)


def _sparsity_weights(spec: SAESpec, w_dec: jax.Array) -> jax.Array:
  """Per-latent weights [N, S] of the sparsity penalty: 1, or ||W_dec,i||."""
  if spec.sparsity == 'l1':
    return jnp.ones(w_dec.shape[:2], jnp.float32)
  return jnp.linalg.norm(w_dec, axis=-1)


def _whole(n: int, batch: int, d_sae: int, latent_sharding) -> bool:
  """Whether the stack runs as one block: small, sharded over devices, or not
  on CPU.

  Blocks are a CPU cache measure. On a GPU the loop's small sequential
  products cost more than they save: an H200 ran the step at d_sae 4096,
  batch 4096 in 1.66 ms whole and 1.98 ms in blocks (float32; bfloat16 1.19
  vs 1.31 ms).
  """
  if latent_sharding is not None or jax.default_backend() != 'cpu':
    return True
  return n * batch * d_sae <= 2 * _BLOCK_ELEMENTS


def _fused(spec: SAESpec, latent_sharding, cd) -> bool:
  """Whether a gated step's blocks run their elementwise work in the fused
  CPU kernels (`cpu_kernels`): one pass a block instead of XLA's dozen."""
  return (
      spec.architecture == 'gated'
      and latent_sharding is None
      and cd in (jnp.float32, jnp.bfloat16)
      and cpu_kernels.available()
  )


def _sae_blocks(block, inputs: dict, in_axes: dict, out_axes: dict, n, length, size):
  """block() in a loop over blocks of `size` along an axis of `length`, of one
  SAE at a time.

  in_axes[name] = (stack axis or None, blocked axis or None): each input is
  sliced to SAE i (a stack axis of 1 stays) and to the block ((None, None):
  passed whole). block(dict, sae, start) returns a dict; out_axes[name] =
  (stack axis, blocked axis) places an entry in a full array (N along the
  stack axis, `length` along the blocked one; a blocked axis of None sums it
  over each SAE's blocks), None sums it over all blocks. Returns the full
  arrays, bfloat16 as uint16 (`_bits`).
  """
  per_sae = length // size
  dtypes = {k: v.dtype for k, v in inputs.items()}
  inputs = {k: _bits(v) for k, v in inputs.items()}

  def start_of(axes, ndim, sae, start):
    starts = [0] * ndim
    if axes[0] is not None:
      starts[axes[0]] = sae
    if axes[1] is not None:
      starts[axes[1]] = start
    return starts

  def blocks(i):
    sae, start = i // per_sae, (i % per_sae) * size
    out = {}
    for name, a in inputs.items():
      stack, axis = in_axes[name]
      sizes = list(a.shape)
      if stack is not None:
        sizes[stack] = 1
      if axis is not None:
        sizes[axis] = size
      starts = start_of(in_axes[name], a.ndim, sae, start)
      out[name] = _from_bits(jax.lax.dynamic_slice(a, starts, sizes), dtypes[name])
    return sae, start, out

  def full(name, like):
    if out_axes[name] is None:
      return jnp.zeros(like.shape, like.dtype)
    shape = list(like.shape)
    stack, axis = out_axes[name]
    shape[stack] = n
    if axis is not None:
      shape[axis] = length
    return _bits(jnp.zeros(shape, like.dtype))

  def body(i, acc):
    sae, start, b = blocks(i)
    new = {}
    for name, value in block(b, sae, start).items():
      if out_axes[name] is None:
        new[name] = acc[name] + value
      else:
        starts = start_of(out_axes[name], value.ndim, sae, start)
        if out_axes[name][1] is None:  # summed over this SAE's blocks
          old = jax.lax.dynamic_slice(acc[name], starts, value.shape)
          value = _from_bits(old, value.dtype) + value
        new[name] = jax.lax.dynamic_update_slice(acc[name], _bits(value), starts)
    return new

  likes = jax.eval_shape(lambda: block(blocks(0)[2], 0, 0))
  init = {k: full(k, v) for k, v in likes.items()}
  return jax.lax.fori_loop(0, n * per_sae, body, init)


def _stack_forward(spec: SAESpec, latent_sharding, params: Params, x, l1_coeff):
  """stacked_forward's outputs, and the residuals its backward pass needs.

  Blocks of batch rows of one SAE: each block's pre-activations become
  latents, and the latents are decoded, while in cache; the penalty
  sum_i acts_i weights_i is a mat-vec on the decoder's input.
  """
  cd = jnp.dtype(spec.compute_dtype)
  x = jnp.asarray(x)
  w_enc, w_dec, b_dec = params['W_enc'], params['W_dec'], params['b_dec']
  n, d_in, d_sae = w_enc.shape
  batch = x.shape[0]
  gated = spec.architecture == 'gated'
  # The backward pass needs a gated SAE's gate only as a mask, which f's sign
  # bit carries, unless L_aux trains the decoder (then it needs acts itself).
  keep_acts = gated and spec.sparsity == 'decoder_norm'
  # (x - b_dec) W_enc, with b_dec's term a mat-vec, not a second matmul.
  enc_bias = jnp.einsum('ni,nis->ns', b_dec, w_enc)  # [N, S]
  weights = _sparsity_weights(spec, w_dec)  # [N, S]
  inputs = {
      'x': x,
      'w_enc': w_enc.astype(cd),
      'w_dec': w_dec.astype(cd),
      'weights': weights,
      'enc_bias': enc_bias,
  }
  names = ('b_gate', 'r_mag', 'b_mag') if gated else ('b_enc',)
  inputs.update({name: params[name] for name in names})

  fused = _fused(spec, latent_sharding, cd) and not keep_acts

  def block(b: dict, sae, start) -> dict:  # rows of x, N' SAEs -> [N', rows, S]
    del sae, start  # a block of rows needs no position
    rows, n_b = b['x'].shape[0], b['w_enc'].shape[0]
    if fused and n_b == 1:  # gates, latents, fires and penalty in one pass
      one = {k: v[0] for k, v in b.items() if k != 'x'}
      f, acts, fires, penalty = cpu_kernels.gated_forward(
          _dot(b['x'], one['w_enc'], ((1,), (0,)), dtype=cd),
          one['enc_bias'],
          one['b_gate'],
          jnp.exp(one['r_mag']),
          one['b_mag'],
          one['weights'],
          cd,
      )
      f, acts = f[None], acts[None]
      return {
          'f': f,
          'x_hat': _bmm(f, b['w_dec'], cd),
          'x_aux': _bmm(acts, b['w_dec'], cd),
          'sparse': penalty[None],
          'fires': fires[None],
      }
    # [d_in, N'*S]: the encoders side by side, one wide matmul.
    wide = jnp.transpose(b['w_enc'], (1, 0, 2)).reshape(d_in, n_b * d_sae)
    pre = _dot(b['x'], wide, ((1,), (0,)), dtype=cd).reshape(rows, n_b, d_sae)
    pre = jnp.transpose(pre, (1, 0, 2)) - b['enc_bias'][:, None, :]
    pre = _constrain(pre, latent_sharding)
    col = lambda name: b[name][:, None, :]  # [N', 1, S]
    # sum_i a_i weights_i [N', rows]: a mat-vec on the decoder's input as it
    # lies in memory, not a 513th decoder column (an odd-sized product runs
    # ~3 ms a block slower).
    penalty = lambda a: _dot(a, b['weights'], ((2,), (1,)), ((0,), (0,)), cd)
    if gated:
      pi_gate = pre + col('b_gate')
      pi_mag = jnp.exp(col('r_mag')) * pre + col('b_mag')
      # A closed gate's zero is -0.0 (see `_CLOSED`), an open one's is +0.0.
      f = jnp.where(pi_gate > 0, jnp.where(pi_mag > 0, pi_mag, 0.0), _CLOSED)
      f = _constrain(f.astype(cd), latent_sharding)
      acts = jax.nn.relu(pi_gate).astype(cd)  # what L_sp and L_aux see
      acts = _constrain(acts, latent_sharding)
      out = {
          'f': f,
          'x_hat': _bmm(f, b['w_dec'], cd),
          'x_aux': _bmm(acts, b['w_dec'], cd),
          'sparse': penalty(acts),
      }
      if keep_acts:
        out['acts'] = acts
    else:
      f = _constrain(jax.nn.relu(pre + col('b_enc')).astype(cd), latent_sharding)
      out = {'f': f, 'x_hat': _bmm(f, b['w_dec'], cd), 'sparse': penalty(f)}
    # How many rows each latent fires on: the metrics' L0 and the dead-latent
    # counters, counted while f is in cache.
    # The 0/1 indicator is summed from bfloat16 (exact; accumulated in
    # float32): the reduction does not fuse with its producer, and half the
    # bytes written and read make it ~2 ms a block faster.
    out['fires'] = jnp.sum((f > 0).astype(jnp.bfloat16), axis=1, dtype=jnp.float32)
    return out

  if _whole(n, batch, d_sae, latent_sharding):
    out = {k: _bits(v) for k, v in block(inputs, 0, 0).items()}
  else:
    in_axes = {k: (None, 0) if k == 'x' else (0, None) for k in inputs}
    out_axes = {k: (0, 1) for k in ('f', 'acts', 'x_hat', 'x_aux', 'sparse')}
    out_axes['fires'] = (0, None)
    rows = _block_size(batch, d_sae, latent_sharding)
    out = _sae_blocks(block, inputs, in_axes, out_axes, n, batch, rows)
  f_bits, acts_bits, sparse_sum = out['f'], out.get('acts'), out['sparse']
  x_hat = out['x_hat'] + b_dec[:, None, :]
  x_aux = out['x_aux'] + b_dec[:, None, :] if gated else None
  l1 = jnp.asarray(l1_coeff, jnp.float32)
  out = {
      'f': _from_bits(f_bits, cd),
      'fires': out['fires'],
      'x_hat': x_hat,
      'l_rec': _squared_error(spec, x, x_hat),
      'l_sp': l1[:, None] * sparse_sum,
      'l_aux': _squared_error(spec, x, x_aux) if gated else jnp.zeros((n, batch)),
  }
  residuals = (
      params,
      x,
      l1,
      f_bits,
      acts_bits,
      x_hat,
      x_aux,
      sparse_sum,
      weights,
  )
  return out, residuals


def _stack_fwd(spec: SAESpec, latent_sharding, params, x, l1_coeff):
  values = jax.custom_derivatives.custom_vjp_primal_tree_values
  return _stack_forward(
      spec, latent_sharding, values(params), values(x), values(l1_coeff)
  )


def _stack_backward(spec: SAESpec, latent_sharding, residuals, ct: dict):
  """Gradients of stacked_forward: the must-do products only, in compute_dtype.

  Blocks of latents (columns of the [batch, d_sae] arrays): for each, the
  decoder-input products d_f = d_x_hat W_dec^T and d_acts = d_x_aux W_dec^T
  (plus the penalty's gradient lam_b weights_i, added in the elementwise
  pass rather than as an odd-sized product's extra column), the
  elementwise pass (masks, bias sums) and then that block's columns of the
  encoder-weight product x^T d_pre and of the decoder-weight product
  d_x_hat^T f -- complete for the block, so nothing [batch, d_sae] is ever
  written out. b_dec's encoder-side gradient is a mat-vec on the batch-summed
  cotangent; r_mag's comes from the decoder-weight product:
  sum_b d_mag f = sum_b d_f f = rowsum(W_dec * f^T d_x_hat).
  """
  params, x, l1, f_bits, acts_bits, x_hat, x_aux, sparse_sum, weights = residuals
  symbolic_zero = jax.custom_derivatives.SymbolicZero
  ct = {k: (None if isinstance(v, symbolic_zero) else v) for k, v in ct.items()}
  cd = jnp.dtype(spec.compute_dtype)
  w_enc, w_dec, b_dec = params['W_enc'], params['W_dec'], params['b_dec']
  n, d_in, d_sae = w_enc.shape
  batch = x.shape[0]
  gated = spec.architecture == 'gated'
  learn_weights = spec.sparsity == 'decoder_norm'
  aux_learns_decoder = gated and learn_weights
  k = 2.0 / d_in if spec.loss_scale == 'mean' else 2.0
  per_example = lambda name: (  # [N, B]
      jnp.zeros((n, batch)) if ct[name] is None else ct[name]
  )
  d_rec = k * per_example('l_rec')[:, :, None] * (x_hat - x)  # [N, B, d_in]
  d_xhat = d_rec if ct['x_hat'] is None else d_rec + ct['x_hat']
  lam = l1[:, None] * per_example('l_sp')  # [N, B]: d loss / d sparse_sum
  x_t = _transposed(x, cd)  # [d_in, B]

  # Per-SAE inputs of a block (stack axis first), and where its latent axis is.
  latent_axis = {}

  def add(name, value, axis=None):
    inputs[name] = value
    latent_axis[name] = axis

  inputs = {}
  # The fused kernel reads its block of f from the whole array, and hands
  # the decoder-weight product a contiguous copy.
  fused = _fused(spec, latent_sharding, cd) and acts_bits is None and ct['f'] is None
  add('f', f_bits, 'whole' if fused else 2)
  add('w_dec', w_dec.astype(cd), 1)
  add('w_enc', w_enc, 2)
  add('lam', lam)
  add('weights', weights, 1)
  if gated:
    d_aux = k * per_example('l_aux')[:, :, None] * (x_aux - x)
    if acts_bits is not None:
      add('acts', acts_bits, 2)
    add('d_xhat', d_xhat)
    add('d_aux', d_aux)
    add('d_xhat_t', _transposed(d_xhat, cd))  # [N, d_in, B]
    if aux_learns_decoder:
      add('d_aux_t', _transposed(d_aux, cd, lam))
    add('exp_r_mag', jnp.exp(params['r_mag']), 1)
  else:
    d_aux = None
    add('d_xhat', d_xhat)
    add('d_xhat_t', _transposed(d_xhat, cd, lam if learn_weights else None))
  if ct['f'] is not None:
    add('ct_f', _bits(ct['f']), 2)

  def block(b: dict, sae, start) -> dict:
    """One block of latents: b's arrays are [N', ...] with `cs` latents."""
    if fused and b['w_dec'].shape[0] == 1:  # masks and bias sums in one pass
      d_f = _bmm_nt(b['d_xhat'], b['w_dec'], cd)[0]  # [B, cs]
      d_acts = _bmm_nt(b['d_aux'], b['w_dec'], cd)[0]
      vectors = [b[k][0] for k in ('lam', 'weights', 'exp_r_mag')]
      d_pre, b_mag, b_gate, f = cpu_kernels.gated_backward(
          d_f, d_acts, b['f'], sae, start, *vectors, cd
      )
      out = {'b_mag': b_mag[None], 'b_gate': b_gate[None]}
      return weight_products(out, d_pre[None], f[None], b)
    f = _from_bits(b['f'], cd)  # [N', B, cs]
    # The penalty's gradient, lam_b weights_i, added where it is used (no
    # matmul column: an odd-sized product costs more than the add).
    d_sp = b['lam'][:, :, None] * b['weights'][:, None, :]
    d_f = _bmm_nt(b['d_xhat'], b['w_dec'], cd)  # [N', B, cs]
    if gated:
      d_acts = _bmm_nt(b['d_aux'], b['w_dec'], cd) + d_sp
    else:
      d_f = d_f + d_sp
    ct_f = _from_bits(b['ct_f'], cd) if 'ct_f' in b else None
    if ct_f is not None:
      d_f = d_f + ct_f
    d_f = _constrain(d_f, latent_sharding)
    out = {}
    if gated:
      acts = _from_bits(b['acts'], cd) if 'acts' in b else None
      gate = ~jnp.signbit(f) if acts is None else acts > 0  # pi_gate > 0
      d_mag = jnp.where(f > 0, d_f, 0.0)  # through the magnitude path only
      d_gate = jnp.where(gate, _constrain(d_acts, latent_sharding), 0.0)
      d_pre = b['exp_r_mag'][:, None, :] * d_mag + d_gate
      out['b_mag'], out['b_gate'] = jnp.sum(d_mag, 1), jnp.sum(d_gate, 1)
      if ct_f is not None:
        f32 = lambda a: a.astype(jnp.float32)
        out['ct_f'] = jnp.sum(jnp.where(f > 0, f32(ct_f) * f32(f), 0.0), 1)
      if aux_learns_decoder:
        out['g_aux'] = _bmm(b['d_aux_t'], acts, cd)  # [N', d_in + 1, cs]
    else:
      d_pre = jnp.where(f > 0, d_f, 0.0)
      out['b_enc'] = jnp.sum(d_pre, 1)
    d_pre = _constrain(d_pre.astype(cd), latent_sharding)
    return weight_products(out, d_pre, f, b)

  def weight_products(out: dict, d_pre, f, b: dict) -> dict:
    # x^T d_pre for the block's columns of every SAE in it: [d_in (+ 1), N', cs].
    out['g_enc'] = _dot(x_t, d_pre, ((1,), (1,)), dtype=cd)
    out['g_dec'] = _bmm(b['d_xhat_t'], f, cd)  # [N', d_in (+ 1), cs]
    # x is data in training; XLA drops this when nothing asks for it.
    out['d_x'] = jnp.einsum(
        'nbs,nis->bi', d_pre, b['w_enc'].astype(cd), preferred_element_type=jnp.float32
    )
    return out

  if _whole(n, batch, d_sae, latent_sharding):
    out = block(
        {
            k: _from_bits(v, cd) if v.dtype == jnp.uint16 else v
            for k, v in inputs.items()
        },
        0,
        0,
    )
  else:
    in_axes = {
        k: (None, None) if axis == 'whole' else (0, axis)
        for k, axis in latent_axis.items()
    }
    out_axes = {k: (0, 1) for k in ('b_mag', 'b_gate', 'b_enc', 'ct_f')}
    out_axes.update({'g_dec': (0, 2), 'g_aux': (0, 2), 'g_enc': (1, 2), 'd_x': None})
    cs = _block_size(d_sae, batch, latent_sharding)
    out = _sae_blocks(block, inputs, in_axes, out_axes, n, d_sae, cs)

  grads = {}
  if gated:
    grads['b_mag'], grads['b_gate'] = out['b_mag'], out['b_gate']
    d_pre_sum = jnp.exp(params['r_mag']) * out['b_mag'] + out['b_gate']  # [N, S]
  else:
    grads['b_enc'] = d_pre_sum = out['b_enc']
  # Encoder weight: x^T d_pre, and the -b_dec term as an outer product with
  # the batch-summed cotangent.
  grads['W_enc'] = (
      jnp.transpose(out['g_enc'][:d_in], (1, 0, 2))
      - b_dec[:, :, None] * d_pre_sum[:, None, :]
  )
  # Decoder weight: (d_x_hat^T f)^T, the penalty's part riding along when the
  # decoder learns from it (and L_aux's part when it learns from L_aux).
  g_dec = jnp.swapaxes(out['g_dec'][:, :d_in], 1, 2)  # [N, S, d_in]
  if gated:
    # d pi_mag / d r_mag = exp(r_mag) pre = pi_mag - b_mag = f where d_mag != 0.
    mag_f = jnp.sum(w_dec * g_dec, axis=-1)  # = sum_b d_mag f (when ct_f = 0)
    if ct['f'] is not None:
      mag_f = mag_f + out['ct_f']
    grads['r_mag'] = mag_f - params['b_mag'] * out['b_mag']
  if aux_learns_decoder:
    g_dec = g_dec + jnp.swapaxes(out['g_aux'][:, :d_in], 1, 2)
    d_weights = out['g_aux'][:, d_in]
  elif learn_weights:
    d_weights = out['g_dec'][:, d_in]
  grads['W_dec'] = g_dec
  if learn_weights:  # d||w|| / dw = w / ||w||
    grads['W_dec'] = g_dec + (d_weights / weights)[:, :, None] * w_dec
  d_b_dec = jnp.sum(d_xhat, axis=1) - jnp.einsum('ns,nis->ni', d_pre_sum, w_enc)
  if aux_learns_decoder:
    d_b_dec = d_b_dec + jnp.sum(d_aux, axis=1)
  grads['b_dec'] = d_b_dec

  d_direct = d_rec if d_aux is None else d_rec + d_aux
  d_x = out['d_x'] - jnp.sum(d_direct, axis=0)
  d_l1 = jnp.sum(per_example('l_sp') * sparse_sum, axis=1)
  return grads, d_x.astype(x.dtype), d_l1


_stack.defvjp(_stack_fwd, _stack_backward, symbolic_zeros=True)


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
