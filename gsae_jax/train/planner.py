"""Memory and time on paper: bytes per device for a stack on a mesh.

Counts what the training step holds on each device of a (data, model, sweep)
mesh with the default rules (batch -> data, d_sae -> model, stack -> sweep):

  params       n/sw x (2 d_in d_sae/m + 3 d_sae/m + d_in) x 4 B (gated; the
               baseline has 1 d_sae vector, b_enc, not 3)
  adam         2 x params;  gradients  1 x params
  activations  ~6 [n/sw, B/dp, d_sae/m] arrays kept for the backward pass
               (pre-activations, gate, magnitude, latents, two cotangents) in
               the compute dtype, plus the batch and 2 reconstructions
  flops        14 B d_in d_sae per SAE-step (7 matmuls of 2 B d_in d_sae)

A sweep's shared data pass holds every group's params and Adam moments at
once, and one group's gradients and activations at a time (shared_pass_bytes).

These are estimates (XLA's buffer assignment may reuse or add buffers); the
step time is the FLOPs over the chip's peak, a lower bound.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# Peak dense FLOP/s per chip (bf16 / fp32), from the vendors' datasheets.
CHIPS = {
    'tpu-v4': (275e12, 275e12 / 2),
    'tpu-v5e': (197e12, 197e12 / 2),
    'tpu-v5p': (459e12, 459e12 / 2),
    'h100': (989e12, 67e12),
    'a100': (312e12, 19.5e12),
}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device bytes and per-step FLOPs of a stacked run on a mesh."""

  params: int
  adam: int
  gradients: int
  activations: int
  flops_per_step: float  # all devices together
  flops_per_device: float

  @property
  def total(self) -> int:
    return self.params + self.adam + self.gradients + self.activations


def plan(
    d_in: int,
    d_sae: int,
    batch: int,
    n_sae: int = 1,
    mesh: tuple[int, int, int] = (1, 1, 1),
    architecture: str = 'gated',
    compute_bytes: int = 4,
) -> Plan:
  """The estimate for one device of a (data, model, sweep) mesh."""
  dp, mp, sp = mesh
  n_local = math.ceil(n_sae / sp)
  s_local = math.ceil(d_sae / mp)
  b_local = math.ceil(batch / dp)
  vectors = {'gated': 3, 'jumprelu': 2}.get(architecture, 1)
  params = 4 * n_local * (2 * d_in * s_local + vectors * s_local + d_in)
  acts = compute_bytes * 6 * n_local * b_local * s_local
  acts += 4 * b_local * d_in * (1 + 2 * n_local)
  flops = 14.0 * batch * d_in * d_sae * n_sae
  return Plan(
      params=params,
      adam=2 * params,
      gradients=params,
      activations=acts,
      flops_per_step=flops,
      flops_per_device=flops / (dp * mp * sp),
  )


def shared_pass_bytes(plans: Sequence[Plan]) -> int:
  """Peak bytes per device of stacks trained in turn on each batch (a sweep's
  shared data pass): every stack's params and Adam moments stay resident,
  while gradients and activations live only during its own step, so the
  largest of those counts once."""
  if not plans:
    return 0
  resident = sum(p.params + p.adam for p in plans)
  return resident + max(p.gradients + p.activations for p in plans)


def largest_d_sae(
    device_bytes: float,
    d_in: int,
    batch: int,
    n_sae: int = 1,
    mesh: tuple[int, int, int] = (1, 1, 1),
    architecture: str = 'gated',
    compute_bytes: int = 4,
    headroom: float = 0.8,
) -> int:
  """The largest d_sae (a multiple of 256 x model axis) that fits in
  `headroom` x device_bytes."""
  step = 256 * mesh[1]
  lo, hi = 0, step
  fits = lambda d: plan(
      d_in, d, batch, n_sae, mesh, architecture, compute_bytes
  ).total <= (headroom * device_bytes)
  while fits(hi):
    lo, hi = hi, hi * 2
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    if mid in (lo, hi):
      break
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def format_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if n < 1024 or unit == 'TiB':
      return f'{n:.1f} {unit}'
    n /= 1024
  raise AssertionError
