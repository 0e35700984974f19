"""Linear probes for the interpretability evals: logistic regression in float64.

Two small solvers, written once and shared by evaluate/probing.py and
evaluate/absorption.py (definitions: docs/design.md §2):

  fit_logistic     L2-regularised binary logistic regression by Newton's
                   method (full batch, NumPy float64), with optional sample
                   weights; the penalty is scikit-learn's LogisticRegression
                   default (C = 1: sum of weighted log-losses + ||w||^2 / 2,
                   intercept unpenalised), the probe SAEBench trains.
  fit_l1_logistic  L1-regularised one-vs-rest logistic probes for many labels
                   at once by proximal gradient descent (FISTA), used only to
                   rank latents (SAEBench's k-sparse probing).

Scores are logits: a probe says "positive" where score > 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Probe:
  """A linear probe: score(x) = x @ weight + bias."""

  weight: np.ndarray  # [d]
  bias: float

  def score(self, x: np.ndarray) -> np.ndarray:
    """Logits [n] of inputs x [n, d]."""
    return np.asarray(x, np.float64) @ self.weight + self.bias


def balanced_weights(y: np.ndarray) -> np.ndarray:
  """Per-example weights n / (2 n_class), scikit-learn's class_weight='balanced'."""
  y = np.asarray(y, bool)
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError(
        f'a probe needs both classes in its training set, got {n_pos} positive '
        f'and {n_neg} negative examples'
    )
  return np.where(y, y.size / (2 * n_pos), y.size / (2 * n_neg))


def _log1pexp(z: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, z)


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    *,
    l2: float = 1.0,
    sample_weight: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-8,
) -> Probe:
  """L2-regularised logistic regression by Newton's method (float64).

  Minimises sum_i s_i [log(1 + e^z_i) - y_i z_i] + l2 / 2 ||w||^2 with
  z = x w + b (b unpenalised), s the sample weights (default 1). Each step
  solves the Newton system and backtracks until the loss decreases; it stops
  when the largest gradient entry is below tol x (1 + sum s).

  Args:
    x: features [n, d].
    y: labels [n] (bool or 0/1).
    l2: the ridge coefficient (1 / C in scikit-learn's terms); > 0.
    sample_weight: [n] non-negative weights.
    max_iter: Newton steps at most.
    tol: relative gradient tolerance.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  n, d = x.shape
  s = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
  xb = np.concatenate([x, np.ones((n, 1))], axis=1)  # [n, d + 1]
  ridge = np.full(d + 1, float(l2))
  ridge[-1] = 1e-12  # the intercept is unpenalised (jitter keeps H definite)
  theta = np.zeros(d + 1)

  def loss(t):
    z = xb @ t
    return float(s @ (_log1pexp(z) - y * z) + 0.5 * (ridge * t) @ t)

  current = loss(theta)
  for _ in range(max_iter):
    p = 0.5 * (1.0 + np.tanh(0.5 * (xb @ theta)))  # sigmoid, overflow-free
    grad = xb.T @ (s * (p - y)) + ridge * theta
    if np.max(np.abs(grad)) < tol * (1.0 + s.sum()):
      break
    hess = (xb * (s * p * (1.0 - p))[:, None]).T @ xb + np.diag(ridge)
    step = np.linalg.solve(hess, grad)
    t = 1.0
    while t > 1e-10:
      trial = loss(theta - t * step)
      if trial <= current:
        break
      t *= 0.5
    else:
      break  # no decrease along the Newton direction: at the optimum
    theta, current = theta - t * step, trial
  return Probe(weight=theta[:-1], bias=float(theta[-1]))


def fit_l1_logistic(
    x: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    *,
    l1: float = 0.01,
    n_iter: int = 300,
) -> np.ndarray:
  """One-vs-rest L1-regularised logistic probes, one per label (FISTA).

  Per label c: minimises the mean over examples of the class-balanced
  log-loss (positives weighted n_neg / n_pos, as a BCE pos_weight) plus
  l1 ||w_c||_1, intercept unpenalised. Only the ranking of the weights is
  used (SAEBench ranks a latent for a letter by this probe's weight).

  Args:
    x: features [n, d] (SAE latents).
    labels: [n] ints in [0, n_labels).
    n_labels: number of labels.
    l1: the L1 coefficient.
    n_iter: proximal gradient steps.

  Returns:
    weights [n_labels, d].
  """
  x = np.asarray(x, np.float64)
  n, d = x.shape
  y = np.asarray(labels)[:, None] == np.arange(n_labels)[None, :]  # [n, c]
  n_pos = np.maximum(y.sum(axis=0), 1)
  pos_weight = (n - n_pos) / n_pos  # [c]
  s = np.where(y, pos_weight[None, :], 1.0)  # [n, c]
  xb = np.concatenate([x, np.ones((n, 1))], axis=1)
  # Lipschitz constant of the mean weighted log-loss gradient.
  lipschitz = max(float(s.max()), 1.0) * np.linalg.norm(xb, 2) ** 2 / (4 * n)
  lr = 1.0 / max(lipschitz, 1e-12)
  theta = np.zeros((d + 1, n_labels))
  momentum, t = theta, 1.0
  for _ in range(n_iter):
    p = 0.5 * (1.0 + np.tanh(0.5 * (xb @ momentum)))
    grad = xb.T @ (s * (p - y)) / n
    new = momentum - lr * grad
    new[:-1] = np.sign(new[:-1]) * np.maximum(np.abs(new[:-1]) - lr * l1, 0.0)
    t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
    momentum = new + (t - 1.0) / t_new * (new - theta)
    theta, t = new, t_new
  return theta[:-1].T


def accuracy(probe: Probe, x: np.ndarray, y: np.ndarray) -> float:
  """Fraction of examples whose sign(score) matches the label."""
  return float(np.mean((probe.score(x) > 0) == np.asarray(y, bool)))


def f1_score(predicted: np.ndarray, y: np.ndarray) -> float:
  """F1 of boolean predictions against boolean labels (0 if no true positive)."""
  predicted, y = np.asarray(predicted, bool), np.asarray(y, bool)
  tp = int(np.sum(predicted & y))
  if tp == 0:
    return 0.0
  precision, recall = tp / int(predicted.sum()), tp / int(y.sum())
  return 2 * precision * recall / (precision + recall)
