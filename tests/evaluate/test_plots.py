"""evaluate/plots.py."""

import numpy as np

from gsae_jax.evaluate import plots


def test_pareto_frontier():
  x = [1.0, 2.0, 3.0, 2.5, 4.0, np.nan]
  y = [0.5, 0.7, 0.6, 0.9, 0.95, 1.0]
  assert plots.pareto_frontier(x, y).tolist() == [0, 1, 3, 4]
