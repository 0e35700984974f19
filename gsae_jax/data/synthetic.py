"""A synthetic activation source whose true dictionary is known.

x = sum_i a_i d_i + noise, with unit directions d_i [n_features, d_in] and sparse
non-negative coefficients: feature i fires with probability avg_active /
n_features, and when it fires a_i ~ U(magnitude_low, magnitude_high). Firing can
be correlated within groups of features through a Gaussian copula.

Batch k is a pure function of (seed, k): the source's position is the batch
index, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _normal_quantile(p: float) -> float:
  # Inverse standard normal CDF; p is a static float.
  return float(jax.scipy.special.ndtri(jnp.float32(p)))


class SyntheticSource:
  """Batches of synthetic activations [batch_size, d_in] (float32, on device).

  Every process draws the same whole batch (process_rows is False).
  """

  process_rows = False

  def __init__(self, cfg: Any, d_in: int, batch_size: int):
    self.d_in = d_in
    self.batch_size = batch_size
    self.n_features = int(cfg.n_features)
    self.avg_active = float(cfg.avg_active)
    self.low, self.high = float(cfg.magnitude_low), float(cfg.magnitude_high)
    self.noise_std = float(cfg.noise_std)
    self.correlation = float(cfg.correlation)
    self.group = int(cfg.correlation_group)
    key = jax.random.PRNGKey(int(cfg.seed))
    self._dict_key, self._data_key = jax.random.split(key)
    d = jax.random.normal(self._dict_key, (self.n_features, d_in), jnp.float32)
    self.dictionary = d / jnp.linalg.norm(d, axis=-1, keepdims=True)  # [F, d_in]
    p_fire = min(self.avg_active / self.n_features, 1.0)
    self._threshold = _normal_quantile(1.0 - p_fire) if p_fire < 1 else -math.inf
    self.position = 0

  @functools.partial(jax.jit, static_argnums=0)
  def _batch(self, key: jax.Array) -> jax.Array:
    k_own, k_shared, k_mag, k_noise = jax.random.split(key, 4)
    b, f = self.batch_size, self.n_features
    z = jax.random.normal(k_own, (b, f))
    if self.correlation > 0:
      n_groups = -(-f // self.group)
      shared = jax.random.normal(k_shared, (b, n_groups))
      shared = jnp.repeat(shared, self.group, axis=1)[:, :f]
      z = math.sqrt(1 - self.correlation) * z + math.sqrt(self.correlation) * shared
    active = z > self._threshold  # [batch, F]
    mags = jax.random.uniform(k_mag, (b, f), minval=self.low, maxval=self.high)
    coeffs = jnp.where(active, mags, 0.0)
    noise = self.noise_std * jax.random.normal(k_noise, (b, self.d_in))
    return coeffs @ self.dictionary + noise  # [batch, d_in]

  def batch_at(self, index: int) -> jax.Array:
    return self._batch(jax.random.fold_in(self._data_key, index))

  def next_batch(self) -> jax.Array:
    batch = self.batch_at(self.position)
    self.position += 1
    return batch

  def _estimate_batches(self, num_batches: int):
    key = jax.random.fold_in(self._dict_key, 1)  # not a training batch key
    return [self._batch(jax.random.fold_in(key, i)) for i in range(num_batches)]

  def mean_squared_norm(self, num_batches: int) -> float:
    """E||x||^2 estimated on batches drawn apart from the training stream."""
    xs = self._estimate_batches(num_batches)
    return float(np.mean([jnp.mean(jnp.sum(jnp.square(x), axis=-1)) for x in xs]))

  def mean_vector(self, num_batches: int) -> np.ndarray:
    """E[x] [d_in], estimated likewise."""
    xs = self._estimate_batches(num_batches)
    return np.mean([np.asarray(jnp.mean(x, axis=0)) for x in xs], axis=0)

  def heldout_batch(self) -> jax.Array:
    """A fixed batch no training step draws (its key is outside the stream)."""
    return self._batch(jax.random.fold_in(self._dict_key, 2))

  def get_state(self) -> dict:
    return {'position': self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state['position'])

  def close(self) -> None:
    pass


def mean_max_cosine(true_dictionary, decoder) -> float:
  """Dictionary recovery: mean over true features of the best cosine with a row.

  true_dictionary [F, d_in], decoder [d_sae, d_in]; rows need not be unit norm.
  """
  t = np.asarray(true_dictionary, np.float64)
  d = np.asarray(decoder, np.float64)
  t = t / np.linalg.norm(t, axis=-1, keepdims=True)
  d = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-12)
  return float(np.mean(np.max(t @ d.T, axis=1)))
