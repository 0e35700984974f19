"""The paper's two claims on data whose dictionary is known [P §4].

Trains the shipped experiments/synthetic.py config (3000 steps at batch 2048,
about a minute per SAE on 2 cores) as a gated and as a baseline SAE, and
measures both on a held-out synthetic batch.
"""

import jax
import numpy as np
import pytest

from experiments import synthetic as synthetic_exp
from gsae_jax import train
from gsae_jax.data import sources, synthetic
from gsae_jax.sae import models


def _train_and_measure(arch: str) -> dict:
  c = synthetic_exp.get_config()
  c.sae.architecture = arch
  source = sources.make_source(c)
  scale = float(np.sqrt(c.sae.d_in / source.mean_squared_norm(8)))
  state = train.init_state(
      c, train.hparams_from_config(c), train.seeds_from_config(c), scale
  )
  step = jax.jit(train.make_train_step(c), donate_argnums=0)
  for _ in range(c.train.num_steps):
    state, _ = step(state, source.next_batch())
  params = train.host_params(state)
  x = source.batch_at(10**6) * scale  # never a training batch
  metrics = train.batch_metrics(
      x, models.forward(models.SAESpec.from_config(c.sae), params, x, 0.0)
  )
  out = {k: float(v) for k, v in metrics.items()}
  out['mmcs'] = synthetic.mean_max_cosine(source.dictionary, params['W_dec'])
  print(arch, out)
  return out


@pytest.fixture(scope='module')
def gated():
  return _train_and_measure('gated')


@pytest.fixture(scope='module')
def baseline():
  return _train_and_measure('baseline')


def test_gated_recovers_the_dictionary_without_shrinkage(gated):
  assert gated['mmcs'] >= 0.95
  assert abs(gated['shrinkage_gamma'] - 1.0) <= 0.05
  assert 3 <= gated['l0'] <= 20  # sparse: ~5 true features active per input


def test_baseline_shrinks_and_reconstructs_worse_at_similar_l0(gated, baseline):
  assert abs(baseline['l0'] - gated['l0']) <= 0.5 * gated['l0']  # similar sparsity
  assert baseline['shrinkage_gamma'] < 0.8
  assert baseline['fvu'] > gated['fvu'] * 1.3
