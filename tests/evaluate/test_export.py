"""evaluate/export.py: SAELens and JumpReLU exports, and their round trips."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_saes import SITE, random_sae

from gsae_jax.evaluate import export
from gsae_jax.sae import models


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
  with pytest.raises(ValueError, match='no JumpReLU form'):
    export.to_saelens(random_sae('baseline'), str(tmp_path / 'x'), jumprelu=True)


@pytest.mark.parametrize(
    'architecture, saelens',
    [
        ('jumprelu', 'jumprelu'),
        ('topk', 'topk'),
        ('batchtopk', 'jumprelu'),
        ('matryoshka_batchtopk', 'jumprelu'),
    ],
)
def test_new_architectures_export_to_saelens_own_forms(architecture, saelens, tmp_path):
  """Each architecture in SAELens's own form, computed as SAELens computes it
  (written out here in NumPy), equals our inference-time latents."""
  sae = random_sae(architecture, seed=3, k=5)
  path = export.to_saelens(sae, str(tmp_path / 'sae'))
  with open(os.path.join(path, 'cfg.json')) as f:
    cfg = json.load(f)
  assert cfg['architecture'] == saelens
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  t = {
      k: v.astype(np.float64)
      for k, v in load_file(os.path.join(path, 'sae_weights.safetensors')).items()
  }
  x = np.random.default_rng(6).normal(size=(256, 16)).astype(np.float32)
  pre = (x - t['b_dec']) @ t['W_enc'] + t['b_enc']
  if saelens == 'topk':
    assert cfg['k'] == 5 and cfg['rescale_acts_by_decoder_norm'] is False
    kth = np.sort(pre, axis=-1)[:, -5][:, None]
    f = np.where(pre >= kth, np.maximum(pre, 0), 0)
  else:  # SAELens's JumpReLU: ReLU(pre) * 1[pre > relu(threshold)]
    f = np.maximum(pre, 0) * (pre > np.maximum(t['threshold'], 0))
  if architecture in ('batchtopk', 'matryoshka_batchtopk'):
    np.testing.assert_array_equal(
        t['threshold'], np.full(32, np.float32(0.3))
    )  # one global
  want = sae.encode(x)
  assert 0 < np.mean(want > 0) < 1
  np.testing.assert_allclose(want, f, rtol=1e-5, atol=1e-5)
  x_hat = f @ t['W_dec'] + t['b_dec']
  np.testing.assert_allclose(sae.decode(want), x_hat, rtol=1e-4, atol=1e-5)
  if saelens == 'topk':  # topk reads back as itself, k kept
    back = export.load_saelens(path)
    assert back.architecture == 'topk' and back.config.sae.k == 5
    np.testing.assert_array_equal(back.encode(x), want)
