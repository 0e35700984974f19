"""The training forward of a stack of SAEs with a hand-written gradient.

The same function as `gsae_jax.sae.models.stacked_forward` (the reference,
which JAX differentiates), with its gradient written by hand as a custom VJP
so that a step does only the must-do matmuls -- 7 of batch x d_in x d_sae for
a gated SAE, 5 for a baseline -- all of them with inputs in
spec.compute_dtype and float32 accumulation, and so that no [batch, d_sae]
intermediate makes a round trip to memory: the forward runs on blocks of batch
rows, the backward on blocks of latents, each block's elementwise work done
while its matmul outputs are in cache. Plain XLA ops only, no native code.

That is a CPU design: it is what sae.step_impl='auto' picks on the CPU
backend, from the measurements in docs/benchmarks.md; elsewhere 'auto' runs
the reference. tests/sae/test_models.py checks it equal to the reference
(values and gradients, every architecture, sparsity variant and dtype).

Gradient routing [P Eq. 8] is the reference's:
  - L_rec does not reach the gate path (the Heaviside gate has zero gradient),
    so b_gate learns only from L_sp and L_aux while W_enc also learns through
    the tied magnitude path;
  - L_aux uses stop_gradient(W_dec), stop_gradient(b_dec): it reaches b_dec
    only through the encoder input;
  - L_sp reaches neither r_mag, b_mag nor W_dec in the paper form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gsae_jax.sae import models
from gsae_jax.sae.models import Params, SAESpec


def stacked_forward(
    spec: SAESpec,
    params: Params,
    x: jax.Array,
    l1_coeff: jax.Array,
    latent_sharding=None,
    block_elements: int | None = None,
) -> dict:
  """models.stacked_forward's outputs, differentiated by the custom VJP below.

  The latents f [N, batch, d_sae] (in spec.compute_dtype) hold -0.0 where a
  gated SAE's gate is closed (see `_CLOSED`); otherwise every output equals
  the reference's. `block_elements`: about how many [batch, d_sae] elements a
  block holds (default BLOCK_ELEMENTS; tests use small ones to run tiny
  shapes in blocks).
  """
  l1_coeff = jnp.asarray(l1_coeff, jnp.float32)
  block_elements = int(block_elements or BLOCK_ELEMENTS)
  return _stack(spec, latent_sharding, block_elements, params, x, l1_coeff)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _stack(spec: SAESpec, latent_sharding, blocks: int, params: Params, x, l1_coeff):
  return _stack_forward(spec, latent_sharding, blocks, params, x, l1_coeff)[0]


# Blocks hold about this many [batch, d_sae] elements (16 MiB in float32):
# at batch 4096, d_sae 4096, 1024 rows forward and 1024 latents backward
# (the block sizes measured: docs/benchmarks.md, "The custom VJP").
BLOCK_ELEMENTS = 1 << 22


def _block_size(length: int, other: int, latent_sharding, blocks: int) -> int:
  """Block length along an axis of `length` for [length, other] blocks.

  `length` itself means no blocks: when the whole array is small, when its
  axis has no divisor near the target, or when it is sharded over devices.
  """
  target = max(1, blocks // other)
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
  into the concatenation, which reads `a` column by column (docs/benchmarks.md).
  """
  a_t = jax.lax.optimization_barrier(jnp.swapaxes(a, -1, -2).astype(dtype))
  if row is None:
    return a_t
  return jnp.concatenate([a_t, row[..., None, :].astype(dtype)], axis=-2)


def _constrain(a: jax.Array, sharding) -> jax.Array:
  return a if sharding is None else jax.lax.with_sharding_constraint(a, sharding)


def _whole(n: int, batch: int, d_sae: int, latent_sharding, blocks: int) -> bool:
  """Whether the stack runs as one block: small, or sharded over devices.

  Blocks are a CPU cache measure; on a GPU the loop's small sequential
  products cost more than they save (docs/benchmarks.md).
  """
  return latent_sharding is not None or n * batch * d_sae <= 2 * blocks


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


def _stack_forward(
    spec: SAESpec, latent_sharding, blocks: int, params: Params, x, l1_coeff
):
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
  weights = models.sparsity_weights(spec, w_dec)  # [N, S]
  inputs = {
      'x': x,
      'w_enc': w_enc.astype(cd),
      'w_dec': w_dec.astype(cd),
      'weights': weights,
      'enc_bias': enc_bias,
  }
  names = ('b_gate', 'r_mag', 'b_mag') if gated else ('b_enc',)
  inputs.update({name: params[name] for name in names})

  def block(b: dict, sae, start) -> dict:  # rows of x, N' SAEs -> [N', rows, S]
    del sae, start  # a block of rows needs no position
    rows, n_b = b['x'].shape[0], b['w_enc'].shape[0]
    # [d_in, N'*S]: the encoders side by side, one wide matmul.
    wide = jnp.transpose(b['w_enc'], (1, 0, 2)).reshape(d_in, n_b * d_sae)
    pre = _dot(b['x'], wide, ((1,), (0,)), dtype=cd).reshape(rows, n_b, d_sae)
    pre = jnp.transpose(pre, (1, 0, 2)) - b['enc_bias'][:, None, :]
    pre = _constrain(pre, latent_sharding)
    col = lambda name: b[name][:, None, :]  # [N', 1, S]
    # sum_i a_i weights_i [N', rows]: a mat-vec on the decoder's input as it
    # lies in memory, not a 513th decoder column (odd-sized products are slower).
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
    # float32): the reduction does not fuse with its producer, so half the
    # bytes written and read make it faster.
    out['fires'] = jnp.sum((f > 0).astype(jnp.bfloat16), axis=1, dtype=jnp.float32)
    return out

  if _whole(n, batch, d_sae, latent_sharding, blocks):
    out = {k: _bits(v) for k, v in block(inputs, 0, 0).items()}
  else:
    in_axes = {k: (None, 0) if k == 'x' else (0, None) for k in inputs}
    out_axes = {k: (0, 1) for k in ('f', 'acts', 'x_hat', 'x_aux', 'sparse')}
    out_axes['fires'] = (0, None)
    rows = _block_size(batch, d_sae, latent_sharding, blocks)
    out = _sae_blocks(block, inputs, in_axes, out_axes, n, batch, rows)
  f_bits, acts_bits, sparse_sum = out['f'], out.get('acts'), out['sparse']
  x_hat = out['x_hat'] + b_dec[:, None, :]
  x_aux = out['x_aux'] + b_dec[:, None, :] if gated else None
  l1 = jnp.asarray(l1_coeff, jnp.float32)
  out = {
      'f': _from_bits(f_bits, cd),
      'fires': out['fires'],
      'x_hat': x_hat,
      'l_rec': models.squared_error(spec, x, x_hat),
      'l_sp': l1[:, None] * sparse_sum,
      'l_aux': models.squared_error(spec, x, x_aux) if gated else jnp.zeros((n, batch)),
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


def _stack_fwd(spec: SAESpec, latent_sharding, blocks: int, params, x, l1_coeff):
  values = jax.custom_derivatives.custom_vjp_primal_tree_values
  return _stack_forward(
      spec, latent_sharding, blocks, values(params), values(x), values(l1_coeff)
  )


def _stack_backward(spec: SAESpec, latent_sharding, blocks: int, residuals, ct: dict):
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
  add('f', f_bits, 2)
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

  if _whole(n, batch, d_sae, latent_sharding, blocks):
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
    cs = _block_size(d_sae, batch, latent_sharding, blocks)
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
