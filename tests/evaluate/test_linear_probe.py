"""evaluate/linear_probe.py: the logistic regressions against independent references."""

import numpy as np
import pytest
from scipy import optimize

from gsae_jax.evaluate import linear_probe


def _data(seed=0, n=120, d=5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * np.array([3.0, 1.0, 0.5, 2.0, 1.0])
  y = (x @ np.array([1.0, -2.0, 0.0, 0.5, 0.0]) + rng.normal(size=n)) > 0.3
  return x, y


def test_fit_logistic_matches_a_generic_optimiser_on_the_same_objective():
  x, y = _data()
  s = linear_probe.balanced_weights(y)
  assert s[y].sum() == pytest.approx(s[~y].sum())  # balanced: equal class mass
  probe = linear_probe.fit_logistic(x, y, l2=0.7, sample_weight=s)

  def objective(theta):
    z = x @ theta[:-1] + theta[-1]
    return np.sum(s * (np.logaddexp(0, z) - y * z)) + 0.35 * theta[:-1] @ theta[:-1]

  ref = optimize.minimize(
      objective, np.zeros(6), method='BFGS', options={'gtol': 1e-10}
  )
  np.testing.assert_allclose(probe.weight, ref.x[:-1], rtol=1e-5, atol=1e-6)
  assert probe.bias == pytest.approx(ref.x[-1], abs=1e-6)
  assert linear_probe.accuracy(probe, x, y) == np.mean((probe.score(x) > 0) == y)


def test_fit_logistic_on_separable_data_stays_finite():
  x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
  y = np.array([0, 0, 1, 1])
  probe = linear_probe.fit_logistic(x, y)
  # Symmetric data: b = 0 and the optimum of 2 log(1+e^-w) + 2 log(1+e^-2w)
  # + w^2 / 2, i.e. e^-w/(1+e^-w) + 2 e^-2w/(1+e^-2w) = w / 2.
  w = probe.weight[0]
  assert probe.bias == pytest.approx(0.0, abs=1e-9)
  lhs = 1 / (1 + np.exp(w)) + 2 / (1 + np.exp(2 * w))
  assert lhs == pytest.approx(w / 2, rel=1e-9)


def test_balanced_weights_needs_both_classes():
  with pytest.raises(ValueError, match='both classes'):
    linear_probe.balanced_weights(np.ones(4, bool))


def test_l1_probe_meets_its_optimality_conditions():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 8))
  labels = rng.integers(0, 3, size=200)
  x[:, 0] += 2.0 * (labels == 0)  # column 0 carries label 0, column 1 label 2
  x[:, 1] += 2.0 * (labels == 2)
  l1 = 0.02
  weights = linear_probe.fit_l1_logistic(x, labels, 3, l1=l1, n_iter=3000)
  assert np.argmax(weights[0]) == 0 and np.argmax(weights[2]) == 1
  assert np.sum(weights == 0) >= 6  # the lasso zeroes noise columns
  # Subgradient conditions of the mean balanced log-loss + l1 |w|_1 (with the
  # optimal intercept, found per label by a 1-D solve).
  for c in range(3):
    y = labels == c
    s = np.where(y, (y.size - y.sum()) / y.sum(), 1.0)
    z0 = x @ weights[c]

    def d_bias(b, z0=z0, s=s, y=y):
      return np.mean(s * (1 / (1 + np.exp(-(z0 + b))) - y))

    b = optimize.brentq(d_bias, -20, 20)
    p = 1 / (1 + np.exp(-(z0 + b)))
    grad = x.T @ (s * (p - y)) / y.size
    on = weights[c] != 0
    np.testing.assert_allclose(grad[on], -l1 * np.sign(weights[c][on]), atol=2e-3)
    assert np.all(np.abs(grad[~on]) <= l1 + 2e-3)


def test_f1_score():
  predicted = np.array([1, 1, 0, 0, 1], bool)
  y = np.array([1, 0, 1, 0, 1], bool)
  # tp 2, precision 2/3, recall 2/3.
  assert linear_probe.f1_score(predicted, y) == pytest.approx(2 / 3)
  assert linear_probe.f1_score(np.zeros(5, bool), y) == 0.0
