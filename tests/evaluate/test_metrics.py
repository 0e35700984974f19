"""evaluate/metrics.py: closed forms, and ratios of dataset means."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax import evaluate


def test_closed_forms_of_reconstruction_metrics():
  rng = np.random.default_rng(0)
  x = rng.normal(1.0, 2.0, (200, 8)).astype(np.float32)
  f = np.zeros((200, 4), np.float32)
  f[:, 1] = 1.0  # fires on every token: dense
  f[:10, 2] = 3.0  # 5% of tokens: neither dense nor dead; latent 0, 3 dead
  perfect = evaluate.summary(evaluate.Sums.from_arrays(x, x, f))
  assert perfect['fvu'] == 0.0 and perfect['mse'] == 0.0
  assert perfect['shrinkage_gamma'] == pytest.approx(1.0, abs=1e-7)
  assert perfect['l0'] == pytest.approx(1.05)
  assert perfect['dead_fraction'] == 0.5 and perfect['dense_fraction'] == 0.25
  np.testing.assert_allclose(
      evaluate.firing_frequency(evaluate.Sums.from_arrays(x, x, f)),
      [0.0, 1.0, 0.05, 0.0],
  )
  half = evaluate.summary(evaluate.Sums.from_arrays(x, 0.5 * x, f))
  assert half['shrinkage_gamma'] == pytest.approx(0.5, rel=1e-6)
  x64 = x.astype(np.float64)
  variance = np.mean(np.sum((x64 - x64.mean(0)) ** 2, axis=1))
  want = 0.25 * np.mean(np.sum(x64**2, axis=1)) / variance
  assert half['fvu'] == pytest.approx(want, rel=1e-6)
  zero = evaluate.summary(evaluate.Sums.from_arrays(x, np.zeros_like(x), f))
  assert zero['fvu'] == pytest.approx(np.mean(np.sum(x64**2, 1)) / variance)


def test_metrics_are_ratios_of_dataset_means_across_batches():
  rng = np.random.default_rng(1)
  xs = [rng.normal(0, s, (n, 6)).astype(np.float32) for s, n in ((1, 50), (5, 7))]
  x_hats = [x + rng.normal(0, 0.3, x.shape).astype(np.float32) for x in xs]
  fs = [np.abs(rng.normal(size=(x.shape[0], 3))).astype(np.float32) for x in xs]
  masks = [np.ones(len(xs[0])), (np.arange(len(xs[1])) < 5).astype(np.float32)]
  sums = evaluate.Sums(d_in=6, d_sae=3)
  for x, x_hat, f, m in zip(xs, x_hats, fs, masks, strict=True):
    stats = jax.device_get(evaluate.batch_stats(x, x_hat, f, jnp.asarray(m)))
    sums.add_batch(x, stats, m)
  keep = np.concatenate(masks) > 0
  x, x_hat = np.concatenate(xs)[keep], np.concatenate(x_hats)[keep]
  x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
  m = evaluate.summary(sums)
  assert m['num_tokens'] == 55
  want = np.mean(np.sum((x - x_hat) ** 2, 1)) / np.mean(np.sum((x - x.mean(0)) ** 2, 1))
  assert m['fvu'] == pytest.approx(want, rel=1e-5)
  want = np.mean(np.sum(x_hat**2, 1)) / np.mean(np.sum(x * x_hat, 1))
  assert m['shrinkage_gamma'] == pytest.approx(want, rel=1e-5)


def test_loss_recovered_closed_forms():
  assert evaluate.loss_recovered(3.0, 3.0, 10.0) == 1.0
  assert evaluate.loss_recovered(3.0, 10.0, 10.0) == 0.0
  assert evaluate.loss_recovered(3.0, 6.5, 10.0) == 0.5
  assert evaluate.loss_recovered(3.0, 2.3, 10.0) == pytest.approx(1.1)  # can be >1
  sums = evaluate.Sums(d_in=1, d_sae=1, n_tokens=1)
  sums.add_ce([3.0, 3.0], [4.0, 5.0], [10.0, 10.0])
  m = evaluate.summary(sums)
  assert m['delta_lm_loss'] == 1.5 and m['loss_recovered'] == pytest.approx(5.5 / 7)
