"""train/loop.py: logs, checkpoints, resume, held-out metrics, config errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

import gsae_jax
from gsae_jax import train
from gsae_jax.data import sources
from gsae_jax.sae import models
from gsae_jax.train import checkpoints


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


@pytest.mark.parametrize('arch', ['gated', 'jumprelu', 'topk', 'matryoshka_batchtopk'])
def test_resume_matches_uninterrupted_run(tmp_path, arch):
  c = tiny_config(train__num_steps=20, sae__architecture=arch, sae__k=4)
  straight = train.train_and_evaluate(c, str(tmp_path / 'a'))
  half = tiny_config(train__num_steps=10, sae__architecture=arch, sae__k=4)
  train.train_and_evaluate(half, str(tmp_path / 'b'))
  resumed = train.train_and_evaluate(c, str(tmp_path / 'b'))
  assert int(resumed.step) == 20
  for name in straight.params:
    np.testing.assert_array_equal(
        np.asarray(resumed.params[name]), np.asarray(straight.params[name]), name
    )
  steps = [r['step'] for r in train.load_metrics(str(tmp_path / 'b'))]
  assert steps == [5, 10, 15, 20]
  # The loaded SAE names its architecture and encodes raw activations as the
  # trained one does at inference (BatchTopK: through its threshold).
  sae = gsae_jax.load(str(tmp_path / 'b'))
  assert sae.architecture == arch
  x = np.asarray(sources.make_source(c).batch_at(7))
  spec = models.SAESpec.from_config(c.sae)
  f = models.encode(spec, train.host_params(resumed), x * float(resumed.norm_scale))
  np.testing.assert_allclose(sae.encode(x), f, rtol=1e-4, atol=1e-5)
  assert 0 < np.mean(np.asarray(f) > 0) < 1


def test_checkpoint_of_another_format_is_refused_and_kept(tmp_path):
  c = tiny_config(train__num_steps=10)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  meta_dir = os.path.join(checkpoints.checkpoint_dir(workdir), '10', 'meta')
  (meta_file,) = [
      os.path.join(meta_dir, f)
      for f in os.listdir(meta_dir)
      if '"format_version"' in open(os.path.join(meta_dir, f)).read()
  ]
  text = open(meta_file).read()
  assert '"format_version": 2' in text
  with open(meta_file, 'w') as f:
    f.write(text.replace('"format_version": 2', '"format_version": 1'))
  with pytest.raises(ValueError, match='format version 1.*gsae_jax.load'):
    train.train_and_evaluate(tiny_config(train__num_steps=20), workdir)
  assert checkpoints.steps(workdir) == [10]  # not moved aside
  assert gsae_jax.load(workdir).step == 10  # and still loads


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
  c.sae.architecture = 'sparse_coding'
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
