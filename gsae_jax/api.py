"""The public door to trained SAEs: `load(path)` -> SAE objects.

This is a stable contract (analysis notebooks, exporters and the evaluation CLI
go through it): `SAE.config`, `.architecture`, `.params` (float32 NumPy arrays
named as SAELens names them, in raw activation units) and `.encode` /
`.decode` on raw activations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gsae_jax import checkpoints, models


class SAE:
  """One trained SAE acting on raw LM activations (normalisation folded in)."""

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      params: dict[str, np.ndarray],
      *,
      step: int | None = None,
      index: int = 0,
      norm_scale: float = 1.0,
  ):
    self.config = config
    self.architecture: str = config.sae.architecture
    self.params = params
    self.step = step
    self.index = index
    self.norm_scale = norm_scale
    self.spec = models.SAESpec.from_config(config.sae)
    self._jparams = {k: jnp.asarray(v) for k, v in params.items()}

  @property
  def d_in(self) -> int:
    return self.spec.d_in

  @property
  def d_sae(self) -> int:
    return self.spec.d_sae

  @functools.cached_property
  def _encode(self):
    return jax.jit(functools.partial(models.encode, self.spec))

  @functools.cached_property
  def _decode(self):
    return jax.jit(functools.partial(models.decode, self.spec))

  def encode(self, x):
    """Latents [..., d_sae] of raw activations x [..., d_in]."""
    out = self._encode(self._jparams, jnp.asarray(x, jnp.float32))
    return np.asarray(out) if isinstance(x, np.ndarray) else out

  def decode(self, f):
    """Raw-unit reconstructions [..., d_in] of latents f [..., d_sae]."""
    out = self._decode(self._jparams, jnp.asarray(f, jnp.float32))
    return np.asarray(out) if isinstance(f, np.ndarray) else out

  def __repr__(self) -> str:
    return (
        f'SAE({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, '
        f'l1_coeff={self.config.sae.l1_coeff}, step={self.step}, index={self.index})'
    )


def load(path: str, step: int | None = None, index: int | None = None):
  """SAE(s) from a run's workdir.

  Args:
    path: a run's workdir.
    step: the checkpoint step; None reads the newest complete checkpoint.
    index: which SAE of a stacked run; None returns the only SAE of a run of
      one, or a list of all SAEs of a stack.
  """
  state, meta, step = checkpoints.read(path, step)
  config = checkpoints.config_of(meta)
  scale = float(meta['norm_scale'])
  params = state['params']
  n_sae = next(iter(params.values())).shape[0]

  def one(i: int) -> SAE:
    if not 0 <= i < n_sae:
      raise IndexError(f'index {i} out of range: {path} holds {n_sae} SAE(s)')
    p = models.fold_normalisation({k: v[i] for k, v in params.items()}, scale)
    return SAE(config, p, step=step, index=i, norm_scale=scale)

  if index is not None:
    return one(index)
  if n_sae == 1:
    return one(0)
  return [one(i) for i in range(n_sae)]
