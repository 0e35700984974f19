"""The memory planner against the real state's sizes."""

import jax
import numpy as np
import pytest

from experiments import synthetic as synthetic_exp
from gsae_jax import train
from gsae_jax.train import planner


@pytest.mark.parametrize('arch', ['gated', 'baseline'])
def test_param_and_adam_bytes_match_the_state(arch):
  c = synthetic_exp.get_config('test')
  c.sae.architecture = arch
  c.stack.seed = (0, 1, 2)
  state = jax.eval_shape(
      lambda: train.init_state(
          c, train.hparams_from_config(c), train.seeds_from_config(c), 1.0
      )
  )
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  p = planner.plan(c.sae.d_in, c.sae.d_sae, c.train.batch_size, 3, architecture=arch)
  assert p.params == nbytes(state.params)
  moments = nbytes(state.opt_state.mu) + nbytes(state.opt_state.nu)
  assert p.adam == moments
  # The model axis divides the dictionary, the sweep axis the stack.
  sharded = planner.plan(c.sae.d_in, c.sae.d_sae, 64, 4, (1, 8, 2), arch)
  whole = planner.plan(c.sae.d_in, c.sae.d_sae, 64, 4, (1, 1, 1), arch)
  d_in = c.sae.d_in
  assert sharded.params == 4 * 2 * (
      2 * d_in * 4 + (3 if arch == 'gated' else 1) * 4 + d_in
  )
  assert whole.flops_per_step == 14 * 64 * d_in * c.sae.d_sae * 4


def test_largest_d_sae_fits_and_the_next_does_not():
  budget = 2**30
  d = planner.largest_d_sae(budget, 512, 4096, mesh=(1, 4, 1))
  assert d % (256 * 4) == 0 and d > 0
  fits = lambda d: planner.plan(512, d, 4096, mesh=(1, 4, 1)).total <= 0.8 * budget
  assert fits(d) and not fits(d + 1024)
  assert planner.largest_d_sae(budget, 512, 4096, mesh=(1, 8, 1)) > d
  np.testing.assert_allclose(
      planner.plan(512, 4096, 4096).flops_per_step, 14 * 4096 * 512 * 4096
  )
