"""JumpReLU, TopK, BatchTopK and Matryoshka SAEs against float64 NumPy.

Each reference below is written from the papers' equations (docs/design.md
§1) with hand-derived gradients, the straight-through estimators of JumpReLU
[J §4] included, and compared with what JAX differentiates in
gsae_jax/sae/models.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_saes import BATCH, D_IN, D_SAE, random_params, spec_of

from gsae_jax.sae import models, select

NEW = ('jumprelu', 'topk', 'batchtopk', 'matryoshka_batchtopk')


def _inputs(seed=1):
  return np.random.default_rng(seed).normal(size=(BATCH, D_IN)).astype(np.float32)


def _dead(seed=2):
  return np.random.default_rng(seed).random(D_SAE) < 0.4


def _kth_largest(a, k):
  return np.sort(a, axis=-1)[..., ::-1][..., k - 1]


def reference(arch, p, x, coeff, k, dead, spec):
  """(terms {l_rec, l_sp, l_aux}, grads of their sum) in float64."""
  p = {n: np.asarray(v, np.float64) for n, v in p.items()}
  x = x.astype(np.float64)
  b, n = x.shape
  wd, we, bd = p['W_dec'], p['W_enc'], p['b_dec']
  xc = x - bd
  z = xc @ we + p['b_enc']
  g = {name: np.zeros_like(v) for name, v in p.items()}
  dz = np.zeros_like(z)
  if arch == 'jumprelu':
    theta = np.exp(p['log_threshold'])
    eps = spec.bandwidth
    on = z > theta
    f = z * on
    kern = (np.abs((z - theta) / eps) < 0.5).astype(np.float64)
  elif arch == 'topk':
    keep = (z >= _kth_largest(z, k)[:, None]) & (z > 0)
    f = z * keep
  else:
    a = np.maximum(z, 0)
    keep = (a >= _kth_largest(a.reshape(-1), k * b)) & (a > 0)
    f = a * keep
  ends = spec.prefixes if arch == 'matryoshka_batchtopk' else (D_SAE,)
  terms = {'l_rec': 0.0, 'l_sp': 0.0, 'l_aux': 0.0}
  df = np.zeros_like(f)
  for end in ends:
    x_hat = f[:, :end] @ wd[:end] + bd
    terms['l_rec'] += np.mean(np.sum((x - x_hat) ** 2, -1)) / n
    d_xhat = 2 * (x_hat - x) / (n * b)
    g['W_dec'][:end] += f[:, :end].T @ d_xhat
    g['b_dec'] += np.sum(d_xhat, 0)
    df[:, :end] += d_xhat @ wd[:end].T
  if arch == 'jumprelu':
    dz += df * on
    d_theta = np.sum(df * -(theta / eps) * kern, 0)
    terms['l_sp'] = coeff * np.mean(np.sum(on, -1))
    d_theta += np.sum(coeff / b * -(1 / eps) * kern, 0)
    g['log_threshold'] = d_theta * theta
  else:
    dz += df * keep
    if dead.any():
      e = x - x_hat
      z_dead = np.where(dead, z, -np.inf)
      sel = dead & (z_dead >= _kth_largest(z_dead, spec.aux_k)[:, None])
      z_aux = np.where(sel, z, 0.0)
      e_hat = z_aux @ wd
      terms['l_aux'] = spec.aux_coeff * np.mean(np.sum((e - e_hat) ** 2, -1)) / n
      d_ehat = spec.aux_coeff * 2 * (e_hat - e) / (n * b)
      g['W_dec'] += z_aux.T @ d_ehat
      dz += (d_ehat @ wd.T) * sel
  g['W_enc'] += xc.T @ dz
  g['b_enc'] += np.sum(dz, 0)
  g['b_dec'] += -np.sum(dz, 0) @ we.T
  return terms, g, f


@pytest.mark.parametrize(
    'arch, select_impl',
    [('jumprelu', 'top_k')]  # jumprelu selects nothing
    + [(a, impl) for a in NEW[1:] for impl in ('top_k', 'bisect')],
)
def test_loss_and_every_gradient_match_float64_reference(arch, select_impl):
  spec = spec_of(arch, select_impl=select_impl)
  params, x, dead = random_params(arch), _inputs(), _dead()
  coeff, k = 0.07, 4

  def total(q):
    t = models.loss_terms(spec, q, jnp.asarray(x), coeff, k, jnp.asarray(dead))
    return t['l_rec'] + t['l_sp'] + t['l_aux'], t

  jp = {name: jnp.asarray(v) for name, v in params.items()}
  (_, terms), grads = jax.value_and_grad(total, has_aux=True)(jp)
  ref_terms, ref_grads, ref_f = reference(arch, params, x, coeff, k, dead, spec)
  for name, value in ref_terms.items():
    np.testing.assert_allclose(float(terms[name]), value, rtol=1e-5, atol=1e-7)
  assert ref_terms['l_rec'] > 0
  assert ref_terms['l_sp' if arch == 'jumprelu' else 'l_aux'] > 0  # exercised
  for name in params:
    a, b = np.asarray(grads[name], np.float64), ref_grads[name]
    scale = max(np.max(np.abs(b)), 1e-3)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale, err_msg=name)
  if arch == 'jumprelu':  # both straight-through estimators reached theta
    assert np.max(np.abs(ref_grads['log_threshold'])) > 1e-3
  out = models.forward(spec, jp, jnp.asarray(x), coeff, k, jnp.asarray(dead))
  np.testing.assert_allclose(np.asarray(out['f']), ref_f, rtol=1e-5, atol=1e-6)
  if arch == 'topk':
    assert np.all(np.sum(ref_f > 0, -1) <= k)
  if arch in ('batchtopk', 'matryoshka_batchtopk'):
    assert 0 < np.sum(ref_f > 0) <= k * BATCH


def test_heaviside_and_jumprelu_estimators_alone():
  """d/dtheta of sum H(z - theta) and of sum z H(z - theta) [J Eq. 11-12]."""
  z = jnp.asarray([0.0, 0.45, 0.55, 0.9, 1.2])
  theta, eps = jnp.asarray(0.5), 0.2
  in_kernel = np.abs((np.asarray(z) - 0.5) / eps) < 0.5  # 0.45, 0.55
  g_step = jax.grad(lambda t: jnp.sum(models.heaviside(z, t, eps)))(theta)
  g_jump = jax.grad(lambda t: jnp.sum(models.jumprelu(z, t, eps)))(theta)
  assert float(g_step) == pytest.approx(-in_kernel.sum() / eps)
  assert float(g_jump) == pytest.approx(-0.5 / eps * in_kernel.sum())
  dz = jax.grad(lambda v: jnp.sum(models.jumprelu(v, theta, eps)))(z)
  np.testing.assert_array_equal(
      np.asarray(dz), (np.asarray(z) > 0.5).astype(np.float32)
  )
  assert (
      float(
          jnp.max(
              jnp.abs(jax.grad(lambda v: jnp.sum(models.heaviside(v, theta, eps)))(z))
          )
      )
      == 0
  )


@pytest.mark.parametrize('shape, k', [((7, 33), 5), ((200,), 37), ((3, 1), 1)])
def test_both_selections_find_the_kth_largest(shape, k):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  x.reshape(-1)[::3] = 0.0  # ties, and zeros of both signs
  x.reshape(-1)[1::7] = -0.0
  want = _kth_largest(x, k)
  for impl in ('top_k', 'bisect'):
    got = select.kth_largest(jnp.asarray(x), k, k, impl)
    np.testing.assert_array_equal(
        np.asarray(got), want.astype(np.float32), err_msg=impl
    )


def test_selection_takes_a_traced_k_per_row():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 50)), jnp.float32)
  ks = jnp.asarray([1, 7, 20, 50])
  for impl in ('top_k', 'bisect'):
    got = jax.jit(lambda a, kk, i=impl: select.kth_largest(a, kk, 50, i))(x, ks)
    want = [_kth_largest(np.asarray(x[i]), int(ks[i])) for i in range(4)]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want, np.float32))


def test_batchtopk_threshold_is_a_running_mean_of_the_smallest_latent():
  spec = spec_of('batchtopk', aux_k=6)
  params, x = random_params('batchtopk'), jnp.asarray(_inputs())
  params['threshold'] = np.asarray(-1.0, np.float32)  # not yet estimated
  out = models.forward(spec, params, x, 0.0, 3)
  f = np.asarray(out['f'])
  smallest = f[f > 0].min()
  assert float(out['stats']['threshold']) == pytest.approx(smallest)
  params['threshold'] = np.asarray(0.3, np.float32)
  out = models.forward(spec, params, x, 0.0, 3)
  assert float(out['stats']['threshold']) == pytest.approx(
      0.3 + 0.01 * (smallest - 0.3)
  )
  # At inference the SAE is a JumpReLU with that one threshold [B §3].
  params['threshold'] = np.asarray(0.6, np.float32)
  z = (np.asarray(x) - params['b_dec']) @ params['W_enc'] + params['b_enc']
  np.testing.assert_allclose(
      np.asarray(models.encode(spec, params, x)),
      np.where(z > 0.6, z, 0),
      rtol=1e-5,
      atol=1e-6,
  )


def test_auxk_reaches_only_dead_latents_and_vanishes_without_them():
  spec = spec_of('topk')
  params, x, dead = random_params('topk', 3), jnp.asarray(_inputs(4)), _dead(5)
  aux = lambda q, d: models.loss_terms(spec, q, x, 0.0, 4, jnp.asarray(d))['l_aux']
  g = jax.grad(aux)(params, dead)
  live = ~dead
  assert float(jnp.max(jnp.abs(g['W_dec'][live]))) == 0.0
  assert float(jnp.max(jnp.abs(g['W_enc'][:, live]))) == 0.0
  assert float(jnp.max(jnp.abs(g['W_dec'][dead]))) > 0
  assert float(aux(params, np.zeros(D_SAE, bool))) == 0.0


@pytest.mark.parametrize('arch', NEW)
def test_stack_of_saes_equals_separate_saes(arch):
  """vmap of 3 SAEs with different knobs == 3 separate forward passes."""
  spec = spec_of(arch, k_max=5)
  ps = [random_params(arch, seed) for seed in range(3)]
  stack = {n: jnp.stack([p[n] for p in ps]) for n in ps[0]}
  x, coeffs, ks = (
      jnp.asarray(_inputs()),
      jnp.asarray([0.01, 0.05, 0.2]),
      jnp.asarray([1, 3, 5]),
  )
  dead = jnp.asarray(np.stack([_dead(s) for s in range(3)]))
  out = models.stacked_forward(spec, stack, x, coeffs, k=ks, dead=dead)
  for i, p in enumerate(ps):
    one = models.forward(spec, p, x, coeffs[i], ks[i], dead[i])
    for name in ('l_rec', 'l_sp', 'l_aux', 'x_hat', 'f'):
      np.testing.assert_allclose(
          np.asarray(out[name][i]),
          np.asarray(one[name]),
          rtol=1e-6,
          atol=1e-7,
          err_msg=name,
      )


def test_matryoshka_prefixes_from_fractions():
  assert models.matryoshka_prefixes((0.25, 0.5), 64) == (16, 32, 64)
  assert models.matryoshka_prefixes((0.0625, 0.125, 0.25, 0.5, 1.0), 32) == (
      2,
      4,
      8,
      16,
      32,
  )


@pytest.mark.parametrize('arch', NEW)
def test_bfloat16_compute_tracks_float32(arch):
  """Mixed precision: bfloat16 matmul inputs, float32 accumulation."""
  params, x, dead = (
      random_params(arch, 8),
      jnp.asarray(_inputs(9)),
      jnp.asarray(_dead(10)),
  )
  out = {}
  for dtype in ('float32', 'bfloat16'):
    spec = spec_of(arch, compute_dtype=dtype)
    loss = lambda q, s=spec: sum(models.loss_terms(s, q, x, 0.05, 4, dead).values())
    out[dtype] = jax.value_and_grad(loss)(params)
  (v32, g32), (v16, g16) = out['float32'], out['bfloat16']
  assert float(v16) == pytest.approx(float(v32), rel=0.03)
  for name in ('W_enc', 'W_dec', 'b_dec'):
    a, b = np.ravel(g16[name]), np.ravel(g32[name])
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98, name
