"""The public door to trained SAEs: `load(path)` -> SAE objects.

This is a stable contract (analysis notebooks, exporters and the evaluation CLI
go through it): `SAE.config`, `.architecture`, `.params` (float32 NumPy arrays
named as SAELens names them, in raw activation units) and `.encode` /
`.decode` on raw activations.
"""

from __future__ import annotations

import copy
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gsae_jax import backends
from gsae_jax import config as config_lib
from gsae_jax.sae import models
from gsae_jax.train import checkpoints
from gsae_jax.train import sweep as sweep_lib


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
    self.spec = backends.resolve(models.SAESpec.from_config(config.sae))
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

  @property
  def sparsity(self) -> tuple[str, float]:
    """(name, value) of the knob that set this SAE's sparsity: l1_coeff,
    l0_coeff or k."""
    name = models.SPARSITY_KNOB[self.architecture]
    return name, self.config.sae[name]

  def __repr__(self) -> str:
    knob, value = self.sparsity
    return (
        f'SAE({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, '
        f'{knob}={value}, step={self.step}, index={self.index})'
    )


def _member_config(
    config: ml_collections.ConfigDict, position: int
) -> ml_collections.ConfigDict:
  """The config of SAE `position` of a stacked run, as if it ran alone."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for name in config_lib.STACK_FIELDS:
      value = config_lib.stack_values(config, name)[position]
      section, _, field = config_lib.STACK_FIELD_HOME[name].rpartition('.')
      if section:
        c[section][field] = value
      else:
        c[field] = value
      c.stack[name] = ()
  return c


def _matches(config: ml_collections.ConfigDict, where: dict) -> bool:
  for name, want in where.items():
    if name == 'site':
      have = config.harvest.site
    elif name == 'architecture':
      have = config.sae.architecture
    elif name == 'd_sae':
      have = config.sae.d_sae
    elif name in config_lib.STACK_FIELD_HOME:
      section, _, field = config_lib.STACK_FIELD_HOME[name].rpartition('.')
      have = config[section][field] if section else config[field]
    else:
      raise TypeError(
          f'load() got an unknown hyperparameter {name!r}; filter by one of '
          f'site, architecture, d_sae, {", ".join(config_lib.STACK_FIELDS)}'
      )
    if isinstance(want, str) or isinstance(have, str):
      if want != have:
        return False
    elif not np.isclose(float(have), float(want), rtol=1e-6, atol=0):
      return False
  return True


def _load_run(path: str, step: int | None) -> list[SAE]:
  """Every SAE of one run's checkpoint (a stack of one or more)."""
  state, meta, step = checkpoints.read(path, step)
  config = checkpoints.config_of(meta)
  scale = float(meta['norm_scale'])
  params = state['params']
  n_sae = next(iter(params.values())).shape[0]
  return [
      SAE(
          _member_config(config, i),
          models.fold_normalisation({k: v[i] for k, v in params.items()}, scale),
          step=step,
          index=i,
          norm_scale=scale,
      )
      for i in range(n_sae)
  ]


def load(path: str, step: int | None = None, index: int | None = None, **where):
  """SAE(s) from a run's or a sweep's workdir.

  Args:
    path: a run's workdir (launch.train) or a sweep's (launch.sweep).
    step: the checkpoint step; None reads the newest complete checkpoint.
    index: which SAE: its position in a stacked run, or its row in a sweep's
      index (sweep.csv).
    **where: hyperparameter filters, e.g. l1_coeff=3e-4, architecture='gated',
      site='blocks.5.hook_resid_post' (floats match to a relative 1e-6).

  Returns:
    One SAE when `index` is given, or when the run holds one SAE, or when the
    filters select exactly one; otherwise a list of SAEs in index order.
  """
  if os.path.exists(os.path.join(path, sweep_lib.INDEX_JSON)):
    rows = sweep_lib.read_index(path)['rows']
    if index is not None:
      rows = [r for r in rows if r['index'] == index]
      if not rows:
        raise IndexError(f'index {index} out of range for the sweep in {path}')
    saes = []
    loaded: dict[str, list[SAE]] = {}
    for row in rows:
      if row['workdir'] not in loaded:
        loaded[row['workdir']] = _load_run(os.path.join(path, row['workdir']), step)
      sae = loaded[row['workdir']][row['position']]
      sae.index = row['index']
      saes.append(sae)
  else:
    saes = _load_run(path, step)
    if index is not None:
      if not 0 <= index < len(saes):
        raise IndexError(f'index {index} out of range: {path} holds {len(saes)} SAE(s)')
      saes = [saes[index]]
  if where:
    saes = [s for s in saes if _matches(s.config, where)]
    if not saes:
      raise LookupError(f'no SAE in {path} has {where}')
  if index is not None or len(saes) == 1:
    return saes[0]
  return saes
