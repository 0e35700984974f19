"""Random SAE parameters of every architecture, for tests/sae."""

import numpy as np

from gsae_jax.sae import models

D_IN, D_SAE, BATCH = 12, 24, 16


def random_params(
    arch: str, seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE
) -> dict:
  """Random float32 parameters of any architecture, every path active."""
  rng = np.random.default_rng(seed)
  w_dec = rng.normal(size=(d_sae, d_in))
  w_dec /= np.linalg.norm(w_dec, axis=-1, keepdims=True)
  p = {
      'W_enc': rng.normal(size=(d_in, d_sae)) * 0.5,
      'W_dec': w_dec,
      'b_dec': rng.normal(size=(d_in,)) * 0.1,
  }
  if arch == 'gated':
    for name in ('b_gate', 'r_mag', 'b_mag'):
      p[name] = rng.normal(size=(d_sae,)) * 0.3
  else:
    p['b_enc'] = rng.normal(size=(d_sae,)) * 0.3
  if arch == 'jumprelu':
    p['log_threshold'] = np.log(rng.uniform(0.2, 0.8, size=(d_sae,)))
  if arch in ('batchtopk', 'matryoshka_batchtopk'):
    p['threshold'] = np.asarray(0.4)
  return {k: np.asarray(v, np.float32) for k, v in p.items()}


def spec_of(arch: str, **kw) -> models.SAESpec:
  base = dict(
      k_max=5 if arch in models.TOPK_FAMILY else 0,
      aux_k=6,
      aux_coeff=0.25,
      bandwidth=0.5,  # wide, so many z fall inside the kernel
      init_threshold=0.1,
      prefixes=(4, 10, D_SAE) if arch == 'matryoshka_batchtopk' else (),
      step_impl='autodiff',
  )
  base.update(kw)
  return models.SAESpec(arch, D_IN, D_SAE, **base)
