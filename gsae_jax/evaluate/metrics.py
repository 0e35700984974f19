"""Evaluation metrics from float64 dataset sums: means first, ratios second.

Every metric is a ratio of dataset means (never a mean of per-batch or
per-token ratios): batches add float64 sums (NumPy) to a `Sums` per SAE, and
`summary` divides at the end (definitions: docs/design.md, "Metrics").

  L0                 E ||f||_0
  MSE                E ||x - x_hat||^2 / d_in
  FVU                E ||x - x_hat||^2 / E ||x - E[x]||^2
  shrinkage gamma    E ||x_hat||^2 / E [x . x_hat]          (1 = no shrinkage)
  dead fraction      latents that never fired on the whole evaluation set
  dense fraction     latents firing on more than 10% of its tokens
  firing frequency   per latent, for the log10 density histogram
  CE clean / SAE / zero, loss recovered = (CE_zero - CE_sae) / (CE_zero -
  CE_clean), delta LM loss = CE_sae - CE_clean
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction is dense


def batch_stats(
    x: jax.Array, x_hat: jax.Array, f: jax.Array, mask: jax.Array, top_k: int = 0
) -> dict[str, jax.Array]:
  """Per-token and per-latent quantities of one batch (jittable).

  Args:
    x: activations [n, d_in].
    x_hat: reconstructions [n, d_in].
    f: latents [n, d_sae].
    mask: [n] weights, 1 for tokens that count and 0 for the others.
    top_k: also return each latent's top_k activations over the batch.

  Returns:
    l0, sq_err, x_sq, x_hat_sq, x_dot_x_hat: [n] (unmasked; `Sums.add_batch`
    weighs them); fire_count [d_sae] int32 over the counted tokens; with
    top_k, top_values and top_rows [d_sae, top_k] (values -1 where masked).
  """
  fired = f > 0
  counted = mask > 0
  out = {
      'l0': jnp.sum(fired, axis=-1).astype(jnp.float32),
      'sq_err': jnp.sum(jnp.square(x - x_hat), axis=-1),
      'x_sq': jnp.sum(jnp.square(x), axis=-1),
      'x_hat_sq': jnp.sum(jnp.square(x_hat), axis=-1),
      'x_dot_x_hat': jnp.sum(x * x_hat, axis=-1),
      'fire_count': jnp.sum(fired & counted[:, None], axis=0, dtype=jnp.int32),
  }
  if top_k:
    masked = jnp.where(counted[:, None], f, -1.0)  # [n, d_sae]
    out['top_values'], out['top_rows'] = jax.lax.top_k(masked.T, top_k)
  return out


_jit_batch_stats = jax.jit(batch_stats, static_argnames='top_k')


@dataclasses.dataclass
class Sums:
  """Float64 dataset sums of one SAE's evaluation (means come at the end)."""

  d_in: int
  d_sae: int
  n_tokens: int = 0
  l0: float = 0.0
  sq_err: float = 0.0
  x_sq: float = 0.0
  x_hat_sq: float = 0.0
  x_dot_x_hat: float = 0.0
  sum_x: np.ndarray = None  # [d_in]
  fire_count: np.ndarray = None  # [d_sae] int64
  n_ce: int = 0
  ce_clean: float = 0.0
  ce_sae: float = 0.0
  ce_zero: float = 0.0

  def __post_init__(self):
    if self.sum_x is None:
      self.sum_x = np.zeros(self.d_in, np.float64)
    if self.fire_count is None:
      self.fire_count = np.zeros(self.d_sae, np.int64)

  def add_batch(self, x: Any, stats: dict, mask: Any) -> None:
    """Adds one batch: activations x [n, d_in], `batch_stats` output, mask [n]."""
    m = np.asarray(mask, np.float64)
    keep = m > 0
    self.n_tokens += int(keep.sum())
    for name in ('l0', 'sq_err', 'x_sq', 'x_hat_sq', 'x_dot_x_hat'):
      value = float(np.dot(np.asarray(stats[name], np.float64), m))
      setattr(self, name, getattr(self, name) + value)
    self.sum_x += np.asarray(x, np.float64)[keep].sum(axis=0)
    self.fire_count += np.asarray(stats['fire_count'], np.int64)

  def add_ce(self, ce_clean: Any, ce_sae: Any, ce_zero: Any) -> None:
    """Adds per-token cross-entropies (same shape, nats) of the three runs."""
    clean = np.asarray(ce_clean, np.float64)
    self.n_ce += clean.size
    self.ce_clean += float(clean.sum())
    self.ce_sae += float(np.asarray(ce_sae, np.float64).sum())
    self.ce_zero += float(np.asarray(ce_zero, np.float64).sum())

  @classmethod
  def from_arrays(cls, x: Any, x_hat: Any, f: Any, mask: Any = None) -> Sums:
    """Sums of one batch of (x, x_hat, f) arrays; mask [n] defaults to all."""
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.ones(x.shape[0], jnp.float32) if mask is None else jnp.asarray(mask)
    stats = _jit_batch_stats(x, jnp.asarray(x_hat, jnp.float32), jnp.asarray(f), mask)
    sums = cls(d_in=x.shape[-1], d_sae=np.shape(f)[-1])
    sums.add_batch(np.asarray(x), jax.device_get(stats), np.asarray(mask))
    return sums


def _ratio(num: float, den: float) -> float:
  return num / den if den != 0 else math.nan


def loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
  """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = as good as the clean LM,
  0 = as bad as zero-ablating the site; can exceed 1."""
  return _ratio(ce_zero - ce_sae, ce_zero - ce_clean)


def firing_frequency(sums: Sums) -> np.ndarray:
  """Fraction of evaluated tokens on which each latent fired [d_sae]."""
  return sums.fire_count / max(sums.n_tokens, 1)


def summary(sums: Sums, dense_threshold: float = DENSE_THRESHOLD) -> dict[str, float]:
  """The metrics of docs/design.md from dataset sums: means first, ratios second."""
  n = sums.n_tokens
  if n == 0:
    raise ValueError('no tokens were evaluated (all masked out?)')
  mean_x = sums.sum_x / n
  variance = sums.x_sq / n - float(mean_x @ mean_x)  # E||x - E[x]||^2
  freq = firing_frequency(sums)
  out = {
      'num_tokens': n,
      'l0': sums.l0 / n,
      'mse': sums.sq_err / n / sums.d_in,
      'fvu': _ratio(sums.sq_err / n, variance),
      'shrinkage_gamma': _ratio(sums.x_hat_sq / n, sums.x_dot_x_hat / n),
      'dead_fraction': float(np.mean(sums.fire_count == 0)),
      'dense_fraction': float(np.mean(freq > dense_threshold)),
  }
  if sums.n_ce:
    clean, sae, zero = (
        sums.ce_clean / sums.n_ce,
        sums.ce_sae / sums.n_ce,
        sums.ce_zero / sums.n_ce,
    )
    out.update(
        num_ce_tokens=sums.n_ce,
        ce_clean=clean,
        ce_sae=sae,
        ce_zero=zero,
        loss_recovered=loss_recovered(clean, sae, zero),
        delta_lm_loss=sae - clean,
    )
  return out


class TopExamples:
  """The k largest activations of every latent, with their token positions.

  Tokens are global ids: context * context_len + position.
  """

  def __init__(self, d_sae: int, k: int):
    self.values = np.full((d_sae, k), -np.inf, np.float32)
    self.tokens = np.full((d_sae, k), -1, np.int64)

  def add(self, values: np.ndarray, tokens: np.ndarray) -> None:
    """Merges candidates values/tokens [d_sae, k'] (values <= 0 are ignored)."""
    values = np.where(values > 0, values, -np.inf).astype(np.float32)
    all_values = np.concatenate([self.values, values], axis=1)
    all_tokens = np.concatenate([self.tokens, tokens], axis=1)
    k = self.values.shape[1]
    order = np.argsort(-all_values, axis=1, kind='stable')[:, :k]
    self.values = np.take_along_axis(all_values, order, axis=1)
    self.tokens = np.take_along_axis(all_tokens, order, axis=1)
    self.tokens[~np.isfinite(self.values)] = -1
