"""Evaluation metrics, LM splicing, plots, reports and export (SAELens, JumpReLU)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsae_jax
from experiments import synthetic as synthetic_exp
from gsae_jax import api, evaluate
from gsae_jax import config as config_lib
from gsae_jax.evaluate import export, plots, report
from gsae_jax.sae import models
from gsae_jax.train import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SITE = 'blocks.15.hook_resid_post'


def lm_config(architecture, d_in, d_sae):
  c = config_lib.default_config()
  c.data.source = 'cache'
  c.sae.architecture, c.sae.d_in, c.sae.d_sae = architecture, d_in, d_sae
  c.harvest.site = SITE
  c.harvest.context_len = 16
  c.harvest.lm_batch_size = 2
  return c


def scaled_identity_sae(d_in, scale, index=0):
  """A baseline SAE with x_hat = scale * x exactly: W_enc = [I, -I] and
  W_dec = scale [I; -I], so ReLU(x) - ReLU(-x) = x."""
  eye = np.eye(d_in, dtype=np.float32)
  params = {
      'W_enc': np.concatenate([eye, -eye], axis=1),
      'b_enc': np.zeros(2 * d_in, np.float32),
      'W_dec': np.float32(scale) * np.concatenate([eye, -eye], axis=0),
      'b_dec': np.zeros(d_in, np.float32),
  }
  return api.SAE(lm_config('baseline', d_in, 2 * d_in), params, index=index)


def random_sae(architecture, d_in=16, d_sae=32, seed=0):
  """An SAE with random weights (gated: thresholds of both signs)."""
  rng = np.random.default_rng(seed)
  spec = models.SAESpec(architecture, d_in, d_sae)
  params = {
      k: np.asarray(v)
      for k, v in models.init_params(spec, jax.random.PRNGKey(seed)).items()
  }
  for k in params:
    if k != 'W_dec' and k != 'W_enc':
      params[k] = rng.normal(0, 0.5, params[k].shape).astype(np.float32)
  params['W_enc'] = params['W_enc'] * np.float32(0.7)
  return api.SAE(lm_config(architecture, d_in, d_sae), params, index=seed)


# ---------------------------------------------------------------------------
# Metrics on hand-made arrays.


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


# ---------------------------------------------------------------------------
# Splicing into the real LM.


@pytest.fixture(scope='module')
def lm_results(lm):
  saes = [scaled_identity_sae(lm.d_model, s, i) for i, s in enumerate((1, 0.5, 0))]
  # 2 contexts of 16 tokens: one LM batch.
  return evaluate.evaluate(saes, lm, num_tokens=30, top_k=4, progress=False)


def test_identity_sae_reproduces_clean_ce_exactly(lm, lm_results):
  identity, half, zero = lm_results
  ids = identity['contexts']
  assert ids.shape == (2, 16)
  direct = np.asarray(lm.cross_entropy(ids), np.float64)[:, 1:]
  assert identity['num_ce_tokens'] == direct.size == 28
  assert identity['ce_clean'] == direct.sum() / direct.size  # the clean LM's CE
  assert identity['ce_sae'] == identity['ce_clean']
  assert identity['loss_recovered'] == 1.0 and identity['delta_lm_loss'] == 0.0
  assert identity['fvu'] == 0.0
  assert identity['shrinkage_gamma'] == pytest.approx(1.0, abs=1e-6)
  assert (
      identity['ce_zero'] > identity['ce_clean'] + 3
  )  # docs/design.md §3: zero-ablation
  assert half['shrinkage_gamma'] == pytest.approx(0.5, rel=1e-5)
  assert 0 < half['loss_recovered'] < 1
  assert zero['loss_recovered'] == pytest.approx(0.0, abs=1e-6)
  assert zero['ce_sae'] == pytest.approx(zero['ce_zero'], abs=1e-6)
  for r in lm_results:
    assert r['num_tokens'] <= 30 and r['l0'] == pytest.approx(lm.d_model, rel=0.01)


def test_evaluate_splices_as_a_direct_sae_splice(lm):
  # The evaluation passes precomputed reconstructions (prefix skipped); that
  # must equal splicing the SAE itself into the forward pass at positions >= 1.
  sae = random_sae('gated', d_in=lm.d_model, d_sae=64, seed=3)
  [result] = evaluate.evaluate([sae], lm, num_tokens=30, top_k=0, progress=False)
  ids = result['contexts']
  params = {k: jnp.asarray(v) for k, v in sae.params.items()}
  direct = lm.cross_entropy(
      ids, SITE, evaluate.splice_fn(sae.spec), splice_params=params, splice_from=1
  )
  direct = np.asarray(direct, np.float64)[:, 1:]
  assert result['ce_sae'] == pytest.approx(direct.mean(), rel=1e-5)
  zero = np.asarray(lm.cross_entropy(ids, SITE, jnp.zeros_like), np.float64)[:, 1:]
  assert result['ce_zero'] == pytest.approx(zero.mean(), rel=1e-5)


def test_plots_and_latent_report_from_lm_results(lm, lm_results, tmp_path):
  paths = plots.write_all(lm_results, str(tmp_path))
  for path in paths:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  page = report.report_html(lm_results[0], lm, n_latents=3, n_examples=2)
  assert page.count('<div class="latent">') == 3
  assert page.count('<mark>') == 6
  # The highlighted token is where the latent's top activation is.
  r = lm_results[0]  # the identity SAE: f = [ReLU(x), ReLU(-x)]
  latent = report.sample_latents(r, 3)[0]
  ctx, pos = divmod(int(r['top_tokens'][latent][0]), r['contexts'].shape[1])
  assert pos >= 1  # position 0 is never scored
  assert report.snippet_html(lm, r['contexts'][ctx], pos) in page
  acts = np.asarray(lm.activations(r['contexts'], SITE))
  f = np.concatenate([np.maximum(acts, 0), np.maximum(-acts, 0)], axis=-1)
  assert r['top_values'][latent][0] == pytest.approx(f[ctx, pos, latent], rel=1e-6)
  assert r['top_values'][latent][0] == pytest.approx(f[:, 1:, latent].max(), rel=1e-6)


def test_pareto_frontier():
  x = [1.0, 2.0, 3.0, 2.5, 4.0, np.nan]
  y = [0.5, 0.7, 0.6, 0.9, 0.95, 1.0]
  assert plots.pareto_frontier(x, y).tolist() == [0, 1, 3, 4]


# ---------------------------------------------------------------------------
# Export and import.


@pytest.mark.parametrize('architecture', ['gated', 'baseline'])
def test_saelens_export_round_trips(architecture, tmp_path):
  sae = random_sae(architecture, seed=1)
  sae.step, sae.norm_scale = 20, 1.5
  path = export.to_saelens(sae, str(tmp_path / 'sae'), firing_frequency=np.ones(32))
  with open(os.path.join(path, 'cfg.json')) as f:
    cfg = json.load(f)
  assert cfg['architecture'] == {'gated': 'gated', 'baseline': 'standard'}[architecture]
  assert (cfg['d_in'], cfg['d_sae'], cfg['hook_name']) == (16, 32, SITE)
  assert cfg['hook_layer'] == 15 and cfg['dtype'] == 'float32'
  assert cfg['model_name'] == 'HuggingFaceTB/SmolLM2-135M-Instruct'
  assert cfg['normalize_activations'] == 'none' and cfg['apply_b_dec_to_input']
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  tensors = load_file(os.path.join(path, 'sae_weights.safetensors'))
  want = {
      'gated': {'W_enc', 'b_gate', 'r_mag', 'b_mag', 'W_dec', 'b_dec'},
      'baseline': {'W_enc', 'b_enc', 'W_dec', 'b_dec'},
  }[architecture]
  assert set(tensors) == want
  assert tensors['W_enc'].shape == (16, 32) and tensors['W_dec'].shape == (32, 16)
  back = export.load_saelens(path)
  assert back.architecture == architecture and back.step == 20
  x = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)
  np.testing.assert_array_equal(back.encode(x), sae.encode(x))
  np.testing.assert_array_equal(back.decode(sae.encode(x)), sae.decode(sae.encode(x)))
  npz = export.load_npz(export.to_npz(sae, str(tmp_path / 'sae.npz')))
  np.testing.assert_array_equal(npz.encode(x), sae.encode(x))
  assert npz.config.harvest.site == SITE and npz.norm_scale == 1.5


def test_gated_sae_equals_its_jumprelu_export(tmp_path):
  sae = random_sae('gated', seed=4)
  jr = export.jumprelu_params(sae.params)
  np.testing.assert_allclose(
      jr['threshold'],
      np.asarray(models.jumprelu_threshold(jax.tree.map(jnp.asarray, sae.params))),
      atol=1e-6,
  )
  assert (jr['threshold'] < 0).any() and (jr['threshold'] > 0).any()
  x = np.random.default_rng(5).normal(0, 2, (2000, 16)).astype(np.float32)
  want = sae.encode(x)
  got = export.jumprelu_encode(jr, x)
  # Where the gate is within rounding of 0 the two forms may disagree.
  p = {k: v.astype(np.float64) for k, v in sae.params.items()}
  pi_gate = (x - p['b_dec']) @ p['W_enc'] + p['b_gate']
  pi_mag = np.exp(p['r_mag']) * (pi_gate - p['b_gate']) + p['b_mag']
  clear = np.abs(pi_gate) > 1e-4
  assert clear.mean() > 0.99
  assert ((pi_gate > 0) & (pi_mag < 0)).any()  # the ReLU inside the JumpReLU acts
  np.testing.assert_allclose(got[clear], want[clear], rtol=1e-5, atol=1e-5)
  # SAELens's JumpReLU reads back as a gated SAE with r_mag = 0.
  back = export.load_saelens(
      export.to_saelens(sae, str(tmp_path / 'jr'), jumprelu=True)
  )
  with open(tmp_path / 'jr' / 'cfg.json') as f:
    assert json.load(f)['architecture'] == 'jumprelu'
  assert back.architecture == 'gated' and not back.params['r_mag'].any()
  np.testing.assert_allclose(back.encode(x)[clear], want[clear], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='only gated SAEs'):
    export.to_saelens(random_sae('baseline'), str(tmp_path / 'x'), jumprelu=True)


# ---------------------------------------------------------------------------
# End to end: a trained synthetic sweep through the CLI.


def test_evaluate_cli_on_a_trained_sweep(tmp_path):
  c = synthetic_exp.get_config('test')
  c.sweep.architecture = ('gated', 'baseline')
  c.sweep.l1_coeff = (3e-3,)
  workdir = str(tmp_path / 'sweep')
  sweep.run(c, workdir)
  subprocess.run(
      [
          sys.executable,
          '-m',
          'launch.evaluate',
          f'--workdir={workdir}',
          '--num_tokens=512',
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
  )
  for name in (
      'eval.json',
      'eval.csv',
      'eval_density.npz',
      'pareto.png',
      'density.png',
  ):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, 'eval.json')) as f:
    results = json.load(f)['results']
  assert [r['index'] for r in results] == [0, 1]
  train_metrics = sweep.read_index(workdir)['rows']
  for r, row in zip(results, train_metrics, strict=True):
    assert r['num_tokens'] == 512 and r['architecture'] == row['architecture']
    assert 0 < r['l0'] <= r['d_sae'] and 0 <= r['dead_fraction'] <= 1
    assert 0 < r['fvu'] < 1.5 and 0.5 < r['shrinkage_gamma'] < 2
    # Held-out numbers of the raw-unit SAE agree with the last training batch.
    assert r['fvu'] == pytest.approx(row['metric_fvu'], abs=0.1)
    assert row['eval_fvu'] == r['fvu'] and row['eval_l0'] == r['l0']
    assert 'loss_recovered' not in r  # no LM for a synthetic source
  with open(os.path.join(workdir, 'sweep.csv')) as f:
    assert 'eval_fvu' in f.readline()
  density = np.load(os.path.join(workdir, 'eval_density.npz'))
  assert sorted(density) == ['sae_0', 'sae_1']
  # Exports pick up the evaluated densities.
  paths = export.export_workdir(workdir, str(tmp_path / 'out'), 'saelens')
  assert [os.path.basename(p) for p in paths] == ['sae_0', 'sae_1']
  assert os.path.exists(os.path.join(paths[0], 'sparsity.safetensors'))
  sae = gsae_jax.load(workdir, index=1)
  back = export.load_saelens(paths[1])
  x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  np.testing.assert_array_equal(back.encode(x), sae.encode(x))
