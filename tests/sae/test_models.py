"""The SAE models against an independent float64 NumPy reference [P Eq. 8]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_saes

from gsae_jax import backends
from gsae_jax.sae import models

D_IN, D_SAE, BATCH = 12, 20, 32


# Every formulation of the training step is held to the same float64 reference.
IMPLS = ('autodiff', 'custom_vjp')


@pytest.fixture(params=IMPLS)
def impl(request):
  return request.param


def _spec(impl, *args, **kwargs):
  return models.SAESpec(*args, step_impl=impl, **kwargs)


def _loss_terms(spec, params, x, lam):
  """Batch-mean loss terms of one SAE through the step formulation of `spec`."""
  stack = {k: jnp.asarray(v)[None] for k, v in params.items()}
  out = backends.stacked_forward(spec, stack, jnp.asarray(x), jnp.reshape(lam, (1,)))
  return {k: jnp.mean(out[k][0]) for k in ('l_rec', 'l_sp', 'l_aux')}


def _random_params(arch: str, seed: int = 0) -> dict:
  """Random parameters with every path active (not the zero-bias init)."""
  return random_saes.random_params(arch, seed, D_IN, D_SAE)


def _inputs(seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(BATCH, D_IN)).astype(np.float32)


def _gated_reference(p: dict, x: np.ndarray, lam: float) -> tuple[dict, dict]:
  """Loss terms and hand-derived gradients of each term, in float64."""
  p = {k: v.astype(np.float64) for k, v in p.items()}
  x = x.astype(np.float64)
  b, n = x.shape
  w, wd, bd = p['W_enc'], p['W_dec'], p['b_dec']
  xc = x - bd
  pre = xc @ w
  pg = pre + p['b_gate']
  pm = np.exp(p['r_mag']) * pre + p['b_mag']
  gate = (pg > 0).astype(np.float64)
  f = gate * np.maximum(pm, 0)
  x_hat = f @ wd + bd
  relu_pg = np.maximum(pg, 0)
  x_aux = relu_pg @ wd + bd
  terms = {
      'l_rec': np.mean(np.sum((x - x_hat) ** 2, -1)) / n,
      'l_sp': lam * np.mean(np.sum(relu_pg, -1)),
      'l_aux': np.mean(np.sum((x - x_aux) ** 2, -1)) / n,
  }
  zeros = {k: np.zeros_like(v) for k, v in p.items()}

  # L_rec: through the decoder and the magnitude path only.
  g_rec = dict(zeros)
  d_xhat = 2 * (x_hat - x) / (n * b)
  g_rec['W_dec'] = f.T @ d_xhat
  d_pm = (d_xhat @ wd.T) * gate * (pm > 0)
  g_rec['r_mag'] = np.sum(d_pm * np.exp(p['r_mag']) * pre, 0)
  g_rec['b_mag'] = np.sum(d_pm, 0)
  d_pre = d_pm * np.exp(p['r_mag'])
  g_rec['W_enc'] = xc.T @ d_pre
  g_rec['b_dec'] = np.sum(d_xhat, 0) - np.sum(d_pre, 0) @ w.T

  # L_sp: through the gate path only.
  g_sp = dict(zeros)
  d_pg = lam / b * (pg > 0)
  g_sp['b_gate'] = np.sum(d_pg, 0)
  g_sp['W_enc'] = xc.T @ d_pg
  g_sp['b_dec'] = -np.sum(d_pg, 0) @ w.T

  # L_aux: frozen decoder; reaches b_dec only through the encoder input.
  g_aux = dict(zeros)
  d_pg = ((2 * (x_aux - x) / (n * b)) @ wd.T) * (pg > 0)
  g_aux['b_gate'] = np.sum(d_pg, 0)
  g_aux['W_enc'] = xc.T @ d_pg
  g_aux['b_dec'] = -np.sum(d_pg, 0) @ w.T
  return terms, {'l_rec': g_rec, 'l_sp': g_sp, 'l_aux': g_aux}


def _baseline_reference(p: dict, x: np.ndarray, lam: float) -> tuple[float, dict]:
  p = {k: v.astype(np.float64) for k, v in p.items()}
  x = x.astype(np.float64)
  b, n = x.shape
  xc = x - p['b_dec']
  pre = xc @ p['W_enc'] + p['b_enc']
  f = np.maximum(pre, 0)
  x_hat = f @ p['W_dec'] + p['b_dec']
  loss = np.mean(np.sum((x - x_hat) ** 2, -1)) / n + lam * np.mean(np.sum(f, -1))
  d_xhat = 2 * (x_hat - x) / (n * b)
  d_pre = (d_xhat @ p['W_dec'].T + lam / b) * (pre > 0)
  grads = {
      'W_dec': f.T @ d_xhat,
      'b_enc': np.sum(d_pre, 0),
      'W_enc': xc.T @ d_pre,
      'b_dec': np.sum(d_xhat, 0) - np.sum(d_pre, 0) @ p['W_enc'].T,
  }
  return loss, grads


def _term_grads(spec, params, x, lam):
  """JAX loss terms and the gradient of each term separately."""
  jp = {k: jnp.asarray(v) for k, v in params.items()}
  terms = _loss_terms(spec, jp, jnp.asarray(x), lam)
  grads = {
      name: jax.grad(lambda q, n=name: _loss_terms(spec, q, x, lam)[n])(jp)
      for name in terms
  }
  return terms, grads


def _close(a, b, name):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.max(np.abs(b)), 1e-3)
  np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale, err_msg=name)


def test_gated_loss_and_gradients_match_float64_reference(impl):
  spec = _spec(impl, 'gated', D_IN, D_SAE)
  params, x, lam = _random_params('gated'), _inputs(), 0.05
  terms, grads = _term_grads(spec, params, x, lam)
  ref_terms, ref_grads = _gated_reference(params, x, lam)
  for name in ('l_rec', 'l_sp', 'l_aux'):
    np.testing.assert_allclose(float(terms[name]), ref_terms[name], rtol=1e-5)
    for pname in params:
      _close(grads[name][pname], ref_grads[name][pname], f'd{name}/d{pname}')


def test_gated_gradient_routing(impl):
  spec = _spec(impl, 'gated', D_IN, D_SAE)
  params, x = _random_params('gated', seed=3), _inputs(seed=4)
  _, grads = _term_grads(spec, params, x, 0.1)
  zero = lambda g: float(jnp.max(jnp.abs(g))) == 0.0
  nonzero = lambda g: float(jnp.max(jnp.abs(g))) > 1e-6
  # L_rec is blocked from the gate path; W_enc learns through r_mag's tie.
  assert zero(grads['l_rec']['b_gate'])
  assert nonzero(grads['l_rec']['W_enc']) and nonzero(grads['l_rec']['r_mag'])
  # L_aux: nothing to W_dec; b_dec only through the encoder input.
  assert zero(grads['l_aux']['W_dec'])
  assert zero(grads['l_aux']['r_mag']) and zero(grads['l_aux']['b_mag'])
  assert nonzero(grads['l_aux']['b_dec']) and nonzero(grads['l_aux']['b_gate'])
  # L_sp: neither r_mag, b_mag nor W_dec.
  for name in ('r_mag', 'b_mag', 'W_dec'):
    assert zero(grads['l_sp'][name]), name
  assert nonzero(grads['l_sp']['b_gate'])


@pytest.mark.parametrize(
    'sparsity, sp_reaches_wdec, aux_reaches_wdec',
    [('decoder_norm', True, True), ('decoder_norm_frozen', False, False)],
)
def test_decoder_norm_variants_route_the_decoder(
    impl, sparsity, sp_reaches_wdec, aux_reaches_wdec
):
  spec = _spec(impl, 'gated', D_IN, D_SAE, sparsity=sparsity)
  params = _random_params('gated', seed=5)
  params['W_dec'] = params['W_dec'] * 1.7  # rows need not be unit norm here
  _, grads = _term_grads(spec, params, _inputs(seed=6), 0.1)
  reaches = lambda g: float(jnp.max(jnp.abs(g))) > 0
  assert reaches(grads['l_sp']['W_dec']) == sp_reaches_wdec
  assert reaches(grads['l_aux']['W_dec']) == aux_reaches_wdec
  # Weighted penalty: lam * sum_i ReLU(pi_gate)_i ||W_dec,i||.
  terms = _loss_terms(spec, params, _inputs(seed=6), 0.1)
  ref_terms, _ = _gated_reference(params, _inputs(seed=6), 0.1)
  np.testing.assert_allclose(float(terms['l_sp']), 1.7 * ref_terms['l_sp'], rtol=1e-5)


def test_baseline_loss_and_gradients_match_float64_reference(impl):
  spec = _spec(impl, 'baseline', D_IN, D_SAE)
  params, x, lam = _random_params('baseline'), _inputs(), 0.05

  def loss(q):
    t = _loss_terms(spec, q, x, lam)
    return t['l_rec'] + t['l_sp'] + t['l_aux']

  jp = {k: jnp.asarray(v) for k, v in params.items()}
  value, grads = jax.value_and_grad(loss)(jp)
  ref_value, ref_grads = _baseline_reference(params, x, lam)
  np.testing.assert_allclose(float(value), ref_value, rtol=1e-5)
  for name in params:
    _close(grads[name], ref_grads[name], name)


def test_sum_loss_scale_is_d_in_times_mean(impl):
  params, x = _random_params('gated'), _inputs()
  mean = _loss_terms(_spec(impl, 'gated', D_IN, D_SAE), params, x, 0.0)
  total = _loss_terms(
      _spec(impl, 'gated', D_IN, D_SAE, loss_scale='sum'), params, x, 0.0
  )
  np.testing.assert_allclose(
      float(total['l_rec']), D_IN * float(mean['l_rec']), rtol=1e-6
  )


def test_gated_encoder_is_a_jumprelu():
  spec = models.SAESpec('gated', D_IN, D_SAE)
  params = _random_params('gated', seed=7)
  x = np.random.default_rng(8).normal(size=(512, D_IN)).astype(np.float32)
  f = np.asarray(models.encode(spec, params, x), np.float64)
  p = {k: v.astype(np.float64) for k, v in params.items()}
  pi_mag = np.exp(p['r_mag']) * ((x - p['b_dec']) @ p['W_enc']) + p['b_mag']
  theta = np.asarray(models.jumprelu_threshold(params), np.float64)
  jump = np.maximum(pi_mag, 0) * (pi_mag > theta)
  assert np.array_equal(f > 0, jump > 0)
  np.testing.assert_allclose(f, jump, rtol=1e-5, atol=1e-5)
  assert 0.05 < np.mean(f > 0) < 0.95  # both branches exercised


@pytest.mark.parametrize('arch', models.ARCHITECTURES)
def test_fold_normalisation_acts_on_raw_activations(arch):
  spec = random_saes.spec_of(arch)
  params, s = random_saes.random_params(arch), 3.7
  x = np.random.default_rng(1).normal(size=(BATCH, random_saes.D_IN)).astype(np.float32)
  folded = models.fold_normalisation(params, s)
  f_norm = models.encode(spec, params, x * s)
  f_raw = models.encode(spec, folded, x)
  np.testing.assert_allclose(f_raw, f_norm, rtol=1e-4, atol=1e-5)
  x_hat_raw = models.decode(spec, folded, f_raw)
  np.testing.assert_allclose(
      x_hat_raw, models.decode(spec, params, f_norm) / s, rtol=1e-4, atol=1e-5
  )


def test_init_ties_encoder_to_decoder_with_unit_rows():
  spec = models.SAESpec('gated', D_IN, D_SAE)
  p = models.init_params(spec, jax.random.PRNGKey(0))
  assert set(p) == {'W_enc', 'b_gate', 'r_mag', 'b_mag', 'W_dec', 'b_dec'}
  np.testing.assert_allclose(np.linalg.norm(p['W_dec'], axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(p['W_enc'], p['W_dec'].T)
  assert float(jnp.abs(p['b_gate']).max()) == 0.0
