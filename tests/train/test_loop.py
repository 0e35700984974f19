"""The training step, the loop, resume, and config errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsae_jax
from experiments import synthetic as synthetic_exp
from gsae_jax import config as config_lib
from gsae_jax import train
from gsae_jax.data import sources
from gsae_jax.sae import models, optim
from gsae_jax.train import checkpoints


def tiny_config(**overrides):
  """A seconds-long synthetic run (d_in 16, d_sae 32, batch 64), overridden."""
  c = synthetic_exp.get_config('test')
  for name, value in overrides.items():
    section, field = name.split('__')
    c[section][field] = value
  return c


def _stacked_hparams(config, l1s):
  n = len(l1s)
  full = lambda v: jnp.full((n,), v, jnp.float32)
  return optim.HParams(
      l1_coeff=jnp.asarray(l1s, jnp.float32),
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


def test_stacked_step_equals_separate_steps():
  """Three SAEs with different l1 under one vmap == three runs of one."""
  c = tiny_config()
  l1s = [1e-3, 1e-2, 1e-1]
  source = sources.make_source(c)
  batches = [source.batch_at(i) for i in range(5)]
  step = jax.jit(train.make_train_step(c))
  seeds = jnp.asarray([3, 4, 5], jnp.uint32)
  stacked = train.init_state(c, _stacked_hparams(c, l1s), seeds, 1.5)
  for x in batches:
    stacked, _ = step(stacked, x)
  for i, l1 in enumerate(l1s):
    one = train.init_state(c, _stacked_hparams(c, [l1]), seeds[i : i + 1], 1.5)
    for x in batches:
      one, _ = step(one, x)
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


def test_loop_logs_checkpoints_and_loads(tmp_path):
  c = tiny_config(log__tensorboard=True)
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(c, workdir)
  assert int(state.step) == 20
  records = train.load_metrics(workdir)
  assert [r['step'] for r in records] == [5, 10, 15, 20]
  for key in (
      'loss',
      'l_rec',
      'l_sp',
      'l_aux',
      'l0',
      'fvu',
      'shrinkage_gamma',
      'dead_fraction',
      'lr',
  ):
    assert np.all(np.isfinite(records[-1][key])), key
  tb = os.path.join(workdir, 'tensorboard')
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tb))
  assert checkpoints.steps(workdir) == [10, 20]

  sae = gsae_jax.load(workdir)
  assert sae.architecture == 'gated' and sae.step == 20
  assert set(sae.params) == {'W_enc', 'b_gate', 'r_mag', 'b_mag', 'W_dec', 'b_dec'}
  assert all(v.dtype == np.float32 for v in sae.params.values())
  assert sae.config.sae.l1_coeff == c.sae.l1_coeff
  # load() folds the normalisation in: raw x gives the training-time latents.
  x = np.asarray(sources.make_source(c).batch_at(7))
  spec = models.SAESpec.from_config(c.sae)
  f_train = models.encode(spec, train.host_params(state), x * float(state.norm_scale))
  np.testing.assert_allclose(sae.encode(x), f_train, rtol=1e-4, atol=1e-5)
  x_hat = models.decode(spec, train.host_params(state), f_train) / float(
      state.norm_scale
  )
  np.testing.assert_allclose(sae.decode(sae.encode(x)), x_hat, rtol=1e-4, atol=1e-5)
  assert isinstance(sae.encode(x), np.ndarray)
  assert isinstance(sae.encode(jnp.asarray(x)), jax.Array)
  assert gsae_jax.load(workdir, step=10).step == 10
  with pytest.raises(FileNotFoundError, match='step 11'):
    gsae_jax.load(workdir, step=11)
  with pytest.raises(IndexError, match='holds 1 SAE'):
    gsae_jax.load(workdir, index=3)


def test_resume_matches_uninterrupted_run(tmp_path):
  c = tiny_config(train__num_steps=20)
  straight = train.train_and_evaluate(c, str(tmp_path / 'a'))
  half = tiny_config(train__num_steps=10)
  train.train_and_evaluate(half, str(tmp_path / 'b'))
  resumed = train.train_and_evaluate(c, str(tmp_path / 'b'))
  assert int(resumed.step) == 20
  for name in straight.params:
    np.testing.assert_array_equal(
        np.asarray(resumed.params[name]), np.asarray(straight.params[name]), name
    )
  steps = [r['step'] for r in train.load_metrics(str(tmp_path / 'b'))]
  assert steps == [5, 10, 15, 20]


def _fails_before_writing(config, workdir, match):
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(workdir))
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def test_bad_configs_fail_naming_the_field(tmp_path):
  c = tiny_config()
  c.sae.d_sae = 0
  _fails_before_writing(c, tmp_path / 'a', r'config\.sae\.d_sae: must be > 0')
  c = tiny_config()
  c.sae.l1_coeff = -1.0
  _fails_before_writing(c, tmp_path / 'b', r'config\.sae\.l1_coeff: must be >= 0')
  c = tiny_config()
  c.sae.l1_coef = 1e-3  # a typo is an unknown field, not silently ignored
  _fails_before_writing(c, tmp_path / 'c', r'config\.sae\.l1_coef: unknown field')
  c = tiny_config()
  c.sae.architecture = 'topk'
  _fails_before_writing(c, tmp_path / 'd', r'config\.sae\.architecture')
  assert not os.listdir(tmp_path)  # nothing at all was written


def test_workdir_of_another_config_is_refused(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(train__num_steps=10), workdir)
  before = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(ValueError, match=r'sae\.l1_coeff: 0\.003 \(stored\) vs 0\.01'):
    train.train_and_evaluate(tiny_config(sae__l1_coeff=0.01), workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == before
  assert checkpoints.steps(workdir) == [10]
  # Longer training of the same run is a resume, not another config.
  state = train.train_and_evaluate(tiny_config(train__num_steps=15), workdir)
  assert int(state.step) == 15


def test_config_round_trips_through_json():
  c = synthetic_exp.get_config()
  back = config_lib.from_json(config_lib.to_json(c))
  assert config_lib.incompatible_fields(c, back) == []
  assert json.loads(config_lib.to_json(back)) == json.loads(config_lib.to_json(c))


def test_heldout_metrics_during_training(tmp_path):
  c = tiny_config(eval__every_steps=10)
  state = train.train_and_evaluate(c, str(tmp_path / 'run'))
  records = {r['step']: r for r in train.load_metrics(str(tmp_path / 'run'))}
  assert 'heldout_fvu' in records[10] and 'heldout_fvu' not in records[5]
  source = sources.make_source(c)
  x = np.asarray(source.heldout_batch()) * float(state.norm_scale)
  spec = models.SAESpec.from_config(c.sae)
  out = models.forward(spec, train.host_params(state), x, 0.0)
  err = np.sum((x - np.asarray(out['x_hat'], np.float64)) ** 2)
  fvu = err / np.sum((x - x.mean(0)) ** 2)
  np.testing.assert_allclose(records[20]['heldout_fvu'], [fvu], rtol=1e-4)
  c = tiny_config(eval__every_steps=7)
  with pytest.raises(ValueError, match=r'config\.eval\.every_steps'):
    train.train_and_evaluate(c, str(tmp_path / 'bad'))
