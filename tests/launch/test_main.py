"""The main job in miniature: harvest -> sweep -> evaluate -> plots, end to end."""

import json
import os

import numpy as np

import gsae_jax
from experiments import smollm2_sweep
from gsae_jax import evaluate
from gsae_jax.data import harvest
from gsae_jax.train import sweep


def test_the_pipeline_end_to_end(lm, tmp_path):
  c = smollm2_sweep.get_config('test')
  c.data.cache_dir = str(tmp_path / 'cache')
  workdir = str(tmp_path / 'main')
  manifest = harvest.harvest(c, model=lm)[c.harvest.site]
  assert manifest['count'] == c.harvest.num_tokens
  rows = sweep.run(c, workdir)
  assert [r['status'] for r in rows] == ['done'] * 4
  assert {r['architecture'] for r in rows} == {'gated', 'baseline'}
  assert {r['d_sae'] for r in rows} == {32, 48}  # baseline 1.5x wider
  results = evaluate.evaluate_workdir(
      workdir, num_tokens=c.eval.num_tokens, split=c.eval.split, lm=lm, progress=False
  )
  assert len(results) == 4
  for r in results:
    for key in ('l0', 'fvu', 'shrinkage_gamma', 'loss_recovered', 'ce_clean', 'ce_sae'):
      assert np.isfinite(r[key]), key
    assert r['ce_zero'] > r['ce_clean']
  for name in ('eval.json', 'eval.csv', 'pareto.png', 'shrinkage.png', 'sweep.csv'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, 'sweep.json')) as f:
    index = json.load(f)['rows']
  assert all('eval_loss_recovered' in row for row in index)
  sae = gsae_jax.load(workdir, architecture='baseline', l1_coeff=0.04)
  assert sae.d_sae == 48 and sae.encode(np.zeros((2, 576), np.float32)).shape == (2, 48)
