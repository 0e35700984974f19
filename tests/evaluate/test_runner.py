"""evaluate/runner.py: splicing SAEs into the real LM, reports, and the CLI."""

import html
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from fake_saes import SITE, random_sae, scaled_identity_sae

import gsae_jax
from experiments import synthetic as synthetic_exp
from gsae_jax import evaluate
from gsae_jax.evaluate import absorption, export, plots, probing, report, runner
from gsae_jax.train import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
  assert page.count('<div class="latent" id="latent-') == 3
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


def test_logit_lens_is_the_final_norm_then_the_unembedding(lm):
  directions = np.random.default_rng(0).normal(size=(2, lm.d_model))
  top, top_logits, bottom, bottom_logits = report.logit_lens(lm, directions, 5)
  d = directions.astype(np.float32).astype(np.float64)
  gain = np.asarray(lm.params['final_norm'], np.float64)
  normed = d / np.sqrt(np.mean(d**2, axis=1, keepdims=True) + lm.config.rms_eps) * gain
  ref = normed @ np.asarray(lm.params['embed'], np.float64).T  # [2, vocab]
  np.testing.assert_array_equal(top, np.argsort(-ref, axis=1)[:, :5])
  np.testing.assert_array_equal(bottom, np.argsort(ref, axis=1)[:, :5])
  np.testing.assert_allclose(top_logits, np.take_along_axis(ref, top, 1), rtol=1e-4)
  np.testing.assert_allclose(
      bottom_logits, np.take_along_axis(ref, bottom, 1), rtol=1e-4
  )


def test_latent_pages_show_the_logit_lens_and_an_index_by_frequency(
    lm, lm_results, tmp_path
):
  sae = scaled_identity_sae(lm.d_model, 1)
  result = lm_results[0]
  paths = report.write_reports([(result, sae)], lm, str(tmp_path), n_latents=3)
  assert [os.path.basename(p) for p in paths] == ['sae_0.html', 'index.html']
  latents = report.sample_latents(result, 3)
  top, _, bottom, _ = report.logit_lens(lm, sae.params['W_dec'][latents], 10)
  with open(paths[0]) as f:
    page = f.read()
  assert page.count('promotes: ') == page.count('suppresses: ') == 3
  first = repr(lm.decode(np.asarray([top[0][0]])).replace('\n', '\u21b5'))
  assert html.escape(first) in page
  with open(paths[1]) as f:
    index = f.read()
  freq = result['firing_frequency']
  by_frequency = sorted(latents, key=lambda i: (-freq[i], i))
  links = [index.index(f'sae_0.html#latent-{i}"') for i in by_frequency]
  assert links == sorted(links)  # listed by firing frequency, highest first
  for i in latents:
    assert f'id="latent-{i}"' in page


def test_probing_and_absorption_on_the_lm_give_one_row_per_sae(lm):
  saes = [scaled_identity_sae(lm.d_model, 1, 0), random_sae('gated', lm.d_model, 64)]
  probe_rows = probing.evaluate_probing(
      saes, lm, site=SITE, n_train=4, n_test=2, example_len=6, ks=(1, 2), progress=False
  )
  for row in probe_rows:
    assert row['probing_acc_raw'] == probe_rows[0]['probing_acc_raw']  # shared
    assert row['probing_acc_k1'] == pytest.approx(
        np.mean([row[f'probing_{t}_k1'] for t in probing.TASKS])
    )
    for key in ('raw', 'k1', 'k2'):
      assert 0 <= row[f'probing_acc_{key}'] <= 1  # 4 test examples per task
      assert all(row[f'probing_{t}_{key}'] * 4 % 1 == 0 for t in probing.TASKS)
  rows = absorption.evaluate_absorption(
      saes, lm, site=SITE, n_words=40, n_icl=1, min_letters=1, progress=False
  )
  for row in rows:
    assert row['absorption_letters'] == len(row['per_letter'])
    scored = row['absorption_letters'] >= 1  # else NaN, as SAEBench refuses
    for key in ('absorption_rate', 'absorption_fraction'):
      assert (0 <= row[key] <= 1) if scored else np.isnan(row[key])
    assert row['absorption_probe_f1'] == rows[0]['absorption_probe_f1']


def test_parse_evals():
  assert evaluate.parse_evals('core, probing,core') == ('core', 'probing')
  assert evaluate.parse_evals(['absorption']) == ('absorption',)
  with pytest.raises(
      ValueError, match=r"\['linear'\].*valid: core, probing, absorption"
  ):
    evaluate.parse_evals('core,linear')
  with pytest.raises(ValueError, match='valid'):
    evaluate.parse_evals('')


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
  with pytest.raises(ValueError, match='need SAEs of an LM site'):
    evaluate.evaluate_workdir(workdir, evals='core,probing')
  # An eval run without core joins the rows of the earlier eval.json.
  joined = runner._join_earlier_results(workdir, [{'index': 1, 'probing_acc_k1': 0.5}])
  assert joined[0]['fvu'] == results[1]['fvu'] and joined[0]['probing_acc_k1'] == 0.5
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
