"""train/step.py: the compiled step and resampling, on a stack of SAEs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from gsae_jax import train
from gsae_jax.data import sources
from gsae_jax.sae import models, optim


def _stacked_hparams(config, l1s):
  n = len(l1s)
  full = lambda v: jnp.full((n,), v, jnp.float32)
  return optim.HParams(
      l1_coeff=jnp.asarray(l1s, jnp.float32),
      l0_coeff=full(config.sae.l0_coeff),
      k=jnp.full((n,), config.sae.k, jnp.int32),
      lr=full(config.train.lr),
      lr_warmup_steps=full(config.train.lr_warmup_steps),
      l1_warmup_steps=full(config.train.l1_warmup_steps),
  )


@pytest.mark.parametrize('arch', models.ARCHITECTURES)
def test_decoder_rows_stay_unit_norm_after_every_step(arch):
  c = tiny_config(sae__architecture=arch, train__lr=3e-2)
  source = sources.make_source(c)
  state = train.init_state(
      c, train.hparams_from_config(c), jnp.zeros(1, jnp.uint32), 1.0
  )
  step = jax.jit(train.make_train_step(c))
  before = np.asarray(state.params['W_dec'])
  for _ in range(10):
    state, _ = step(state, source.next_batch())
    norms = np.linalg.norm(np.asarray(state.params['W_dec'], np.float64), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
  assert not np.allclose(np.asarray(state.params['W_dec']), before)  # it did move


# Each architecture's own sparsity knob, three values of it.
KNOB_VALUES = {
    'l1_coeff': (1e-3, 1e-2, 1e-1),
    'l0_coeff': (1e-3, 1e-2, 3e-2),
    'k': (2, 4, 8),
}


@pytest.mark.parametrize('arch', models.ARCHITECTURES)
def test_stacked_step_equals_separate_steps(arch):
  """Three SAEs with different sparsity knobs under one vmap == three runs of
  one (AuxK's dead latents and BatchTopK's threshold included)."""
  knob = models.SPARSITY_KNOB[arch]
  values, seeds = KNOB_VALUES[knob], (3, 4, 5)
  # A 2-step dead window, so that AuxK has dead latents within the 5 steps.
  c = tiny_config(sae__architecture=arch, train__dead_window_tokens=128)
  source = sources.make_source(c)
  batches = [source.batch_at(i) for i in range(5)]
  stacked_c = c.copy_and_resolve_references()
  stacked_c.stack[knob], stacked_c.stack.seed = values, seeds
  step = jax.jit(train.make_train_step(stacked_c))
  stacked = train.init_state(
      stacked_c,
      train.hparams_from_config(stacked_c),
      jnp.asarray(seeds, jnp.uint32),
      1.5,
  )
  for x in batches:
    stacked, metrics = step(stacked, x)
  if arch in models.TOPK_FAMILY:
    assert float(jnp.max(metrics['l_aux'])) > 0  # AuxK ran
  for i, value in enumerate(values):
    one_c = c.copy_and_resolve_references()
    one_c.sae[knob], one_c.seed = value, seeds[i]
    one_step = jax.jit(train.make_train_step(one_c))
    one = train.init_state(
        one_c,
        train.hparams_from_config(one_c),
        jnp.asarray([seeds[i]], jnp.uint32),
        1.5,
    )
    for x in batches:
      one, _ = one_step(one, x)
    for name, value in one.params.items():
      np.testing.assert_allclose(
          stacked.params[name][i], value[0], rtol=1e-5, atol=1e-6, err_msg=name
      )


def test_resampling_touches_only_dead_latents_of_each_sae():
  c = tiny_config(resample__enabled=True)
  state = train.init_state(
      c, _stacked_hparams(c, [1e-3, 1e-3]), jnp.asarray([0, 1], jnp.uint32), 1.0
  )
  dead = np.zeros((2, c.sae.d_sae), bool)
  dead[0, [2, 7]] = True  # SAE 1 has no dead latents
  window = train.dead_window_steps(c)
  state = state.replace(
      steps_since_fired=jnp.asarray(np.where(dead, window, 0), jnp.int32),
      step=jnp.asarray(100, jnp.int32),
      opt_state=jax.tree.map(jnp.ones_like, state.opt_state),
  )
  before = jax.tree.map(np.asarray, state)
  x = sources.make_source(c).batch_at(0)
  after, n_dead = jax.jit(train.make_resample(c))(state, x)
  np.testing.assert_array_equal(np.asarray(n_dead), [2, 0])
  w_dec = np.asarray(after.params['W_dec'])
  for name, old in before.params.items():
    axis = models.LATENT_AXIS[name]
    new = np.asarray(after.params[name])
    np.testing.assert_array_equal(new[1], old[1])  # the other SAE is untouched
    if axis is None:
      np.testing.assert_array_equal(new[0], old[0])
      continue
    live0 = np.take(new[0], np.flatnonzero(~dead[0]), axis=axis)
    np.testing.assert_array_equal(
        live0, np.take(old[0], np.flatnonzero(~dead[0]), axis)
    )
  assert not np.allclose(w_dec[0, [2, 7]], before.params['W_dec'][0, [2, 7]])
  np.testing.assert_allclose(np.linalg.norm(w_dec[0, [2, 7]], axis=-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(after.opt_state.nu['W_dec'][0, 2]).max()) == 0.0
  assert float(after.opt_state.nu['W_dec'][0, 3].min()) == 1.0
  np.testing.assert_array_equal(np.asarray(after.last_resample), [100, -(10**9)])
  # The lr of SAE 0 dips to 0.1x and climbs back on a cosine; SAE 1's does not.
  sched = optim.Schedule.from_config(c)
  hp = jax.tree.map(lambda v: v[0], after.hparams)
  lr = lambda s, i: float(optim.learning_rate(sched, hp, s, after.last_resample[i]))
  np.testing.assert_allclose(lr(100, 0), 0.1 * c.train.lr, rtol=1e-5)
  np.testing.assert_allclose(lr(100, 1), c.train.lr, rtol=1e-5)
  np.testing.assert_allclose(lr(100 + 500, 0), 0.55 * c.train.lr, rtol=1e-4)
  np.testing.assert_allclose(lr(100 + 1000, 0), c.train.lr, rtol=1e-5)
