"""The k-th largest value along an axis, for TopK-style activations.

TopK, BatchTopK and Matryoshka SAEs keep the entries at or above a
threshold: the k-th largest pre-activation of a row (TopK), or the
(k x batch)-th largest of the whole batch (BatchTopK). Only the threshold is
needed (the entries are then kept with a mask, differentiably), and k may be a
traced per-SAE array no larger than a static `k_max`, so SAEs with different
k share one compiled program.

Two exact algorithms, chosen by `sae.select_impl` (see
gsae_jax/backends/__init__.py, where 'auto' is resolved):

  'top_k'   jax.lax.top_k(k_max), then the k-th column: what accelerators
            have kernels for (the choice there);
  'bisect'  a bisection on the values' bit patterns (32 counting passes, no
            sort);
  'by_k'    (the CPU's 'auto') bisect from k_max >= BISECT_FROM_K, lax.top_k
            below: XLA's CPU top_k is quick for small k but slows with k, and
            a whole batch's selection (k x batch) is 15-29x faster by
            bisection (docs/benchmarks.md, "Selecting the top k").

Both return the same value (the k-th largest element, ties included), tested
equal in tests/sae/test_architectures.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SELECT_IMPLS = ('auto', 'top_k', 'bisect')
# 'by_k' on the CPU backend: per row, lax.top_k was faster up to k 32 (batch
# 512) and up to k 64 (batch 4096), bisection from k 128 (docs/benchmarks.md).
BISECT_FROM_K = 128


def _sortable_int(x: jax.Array) -> jax.Array:
  """int32 keys ordered as the float32 values x (-0.0 just below +0.0)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  # Negative floats: larger magnitude has larger bits; flip them below 0.
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _from_sortable_int(key: jax.Array) -> jax.Array:
  bits = jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _kth_largest_bisect(x: jax.Array, k: jax.Array) -> jax.Array:
  """Largest key t with count(keys >= t) >= k, per row of x [..., n]."""
  keys = _sortable_int(x)
  lead = x.shape[:-1]
  lo = jnp.full(lead, jnp.iinfo(jnp.int32).min, jnp.int32)  # count(>= lo) = n
  hi = jnp.full(lead, jnp.iinfo(jnp.int32).max, jnp.int32)

  def body(_, lohi):
    lo, hi = lohi
    # Midpoint rounded up, without overflow: lo < mid <= hi while lo < hi.
    mid = (lo >> 1) + (hi >> 1) + ((lo & 1) | (hi & 1))
    enough = jnp.sum(keys >= mid[..., None], axis=-1) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
  return _from_sortable_int(lo)


def kth_largest(x: jax.Array, k: jax.Array, k_max: int, impl: str) -> jax.Array:
  """The k-th largest entry of each row of x [..., n]: [...] (1 <= k <= k_max).

  `k` is an int array broadcastable to x.shape[:-1] (it may be traced);
  `k_max` (static) bounds it. Not differentiable (callers stop gradients).
  """
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  k = jnp.asarray(k, jnp.int32)
  if impl == 'by_k':
    impl = 'bisect' if k_max >= BISECT_FROM_K else 'top_k'
  if impl == 'bisect':
    return _kth_largest_bisect(x, jnp.broadcast_to(k, x.shape[:-1]))
  if impl not in ('top_k', 'auto'):  # 'auto' unresolved: the reference, top_k
    raise ValueError(f'select impl {impl!r} is not one of {SELECT_IMPLS}')
  top = jax.lax.top_k(x, min(int(k_max), x.shape[-1]))[0]  # [..., k_max] descending
  idx = jnp.broadcast_to(k - 1, x.shape[:-1])[..., None]
  return jnp.take_along_axis(top, idx, axis=-1)[..., 0]
