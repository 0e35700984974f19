"""The papers' claims on data whose dictionary is known [P §4].

Trains the shipped experiments/synthetic.py config (3000 steps at batch 2048,
about a minute per SAE on 2 cores) as a gated and as a baseline SAE, and the
newer architectures at half the steps and batch (enough for them), and
measures each on a held-out synthetic batch (inference-time latents).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import synthetic as synthetic_exp
from gsae_jax import train
from gsae_jax.data import sources, synthetic
from gsae_jax.sae import models


def _train_and_measure(arch: str, **overrides) -> dict:
  c = synthetic_exp.get_config()
  c.sae.architecture = arch
  for name, value in overrides.items():
    section, field = name.split('__')
    c[section][field] = value
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
  spec = models.SAESpec.from_config(c.sae)
  f = models.encode(spec, params, x)
  metrics = train.batch_metrics(
      x, {'x_hat': models.decode(spec, params, f), 'fires': jnp.sum(f > 0, axis=0)}
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


# The newer architectures at an L0 near the truth (~5 active features): k = 5,
# or JumpReLU's L0 coefficient 0.01. Seen under the shipped schedule (lr 1e-2,
# no lr warm-up; half the steps and batch): jumprelu 0.990 (L0 5.0; 0.985 at
# full length), topk 0.993, batchtopk 0.914, matryoshka_batchtopk 0.844. At full
# length gated 0.989 (L0 7.8), baseline 0.997 (L0 9.9, gamma 0.71).
HALF = dict(train__num_steps=1500, train__batch_size=1024)
NEWER = {
    'jumprelu': (dict(sae__l0_coeff=0.01, **HALF), 0.95),
    'topk': (dict(sae__k=5, **HALF), 0.95),
    'batchtopk': (dict(sae__k=5, **HALF), 0.9),
    'matryoshka_batchtopk': (dict(sae__k=5, **HALF), 0.8),
}


@pytest.mark.parametrize('arch', list(NEWER))
def test_newer_architectures_recover_the_dictionary(arch):
  overrides, min_mmcs = NEWER[arch]
  m = _train_and_measure(arch, **overrides)
  assert m['mmcs'] >= min_mmcs
  assert 3 <= m['l0'] <= 10
  if arch != 'matryoshka_batchtopk':  # the shrinkage-free ones [J, T, B]
    assert abs(m['shrinkage_gamma'] - 1.0) <= 0.05
