"""The hand-written gradient of stacked_forward, and mixed precision.

models.stacked_forward has a custom VJP (the must-do matmuls only, on blocks
of rows and of latents). Here its float32 gradients are checked against
jax.grad of the plain formulation below -- every architecture and sparsity
variant, one SAE and a stack, whole and in blocks, with cotangents on every
output -- and the bfloat16 compute dtype against float32: gradients, and the
loss curve of a short synthetic run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import synthetic as synthetic_exp
from gsae_jax import models, train

D_IN, D_SAE, BATCH = 12, 40, 64


def reference_stacked_forward(spec, params, x, l1_coeff):
  """stacked_forward as plain JAX, differentiated by jax.grad [P Eq. 8]."""
  sg = jax.lax.stop_gradient
  w_enc, w_dec, b_dec = params['W_enc'], params['W_dec'], params['b_dec']
  pre = (
      jnp.einsum('bi,nis->nbs', x, w_enc)
      - jnp.einsum('ni,nis->ns', b_dec, w_enc)[:, None]
  )
  col = lambda name: params[name][:, None, :]
  if spec.architecture == 'gated':
    pi_gate = pre + col('b_gate')
    pi_mag = jnp.exp(col('r_mag')) * pre + col('b_mag')
    f = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)
    acts = jax.nn.relu(pi_gate)
  else:
    f = acts = jax.nn.relu(pre + col('b_enc'))
  x_hat = jnp.einsum('nbs,nsd->nbd', f, w_dec) + b_dec[:, None, :]
  if spec.sparsity == 'l1':
    sparse_sum = jnp.sum(acts, axis=-1)
  else:
    norms = jnp.linalg.norm(w_dec, axis=-1)
    if spec.sparsity == 'decoder_norm_frozen':
      norms = sg(norms)
    sparse_sum = jnp.einsum('nbs,ns->nb', acts, norms)
  scale = spec.d_in if spec.loss_scale == 'mean' else 1.0
  out = {
      'f': f,
      'x_hat': x_hat,
      'l_rec': jnp.sum(jnp.square(x - x_hat), -1) / scale,
      'l_sp': l1_coeff[:, None] * sparse_sum,
  }
  if spec.architecture == 'gated':
    w_aux, b_aux = (
        (w_dec, b_dec)
        if spec.sparsity == 'decoder_norm'
        else (
            sg(w_dec),
            sg(b_dec),
        )
    )
    x_aux = jnp.einsum('nbs,nsd->nbd', acts, w_aux) + b_aux[:, None, :]
    out['l_aux'] = jnp.sum(jnp.square(x - x_aux), -1) / scale
  else:
    out['l_aux'] = jnp.zeros_like(out['l_rec'])
  return out


def _params(arch: str, n_sae: int, seed: int = 0) -> dict:
  """Random stacked parameters with every path active, rows not unit norm."""
  rng = np.random.default_rng(seed)
  p = {
      'W_enc': rng.normal(size=(n_sae, D_IN, D_SAE)) * 0.5,
      'W_dec': rng.normal(size=(n_sae, D_SAE, D_IN)) * 0.4,
      'b_dec': rng.normal(size=(n_sae, D_IN)) * 0.1,
  }
  names = ('b_gate', 'r_mag', 'b_mag') if arch == 'gated' else ('b_enc',)
  for name in names:
    p[name] = rng.normal(size=(n_sae, D_SAE)) * 0.3
  return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def _loss(forward, spec, params, x, l1):
  """A scalar that sends a distinct cotangent into every output."""
  out = forward(spec, params, x, l1)
  w = jnp.linspace(0.5, 1.5, x.shape[0])  # per-example weights
  terms = out['l_rec'] + 0.7 * out['l_sp'] + 1.3 * out['l_aux']
  return (
      jnp.sum(terms * w)
      + 0.01 * jnp.sum(jnp.square(out['x_hat']))
      + 0.02 * jnp.sum(out['f'].astype(jnp.float32))
  )


def _grads(forward, spec, params, x, l1, jit=True):
  g = jax.grad(lambda *a: _loss(forward, spec, *a), argnums=(0, 1, 2))
  return (jax.jit(g) if jit else g)(params, x, l1)


# (architecture, sparsity, loss_scale, n_sae, blocked): every sparsity variant
# of both architectures, each architecture both whole and in blocks, as one
# SAE and as a stack of 2, and the 'sum' loss scale once.
CASES = [
    ('gated', 'l1', 'mean', 1, False),
    ('gated', 'l1', 'sum', 2, True),
    ('gated', 'decoder_norm', 'mean', 2, True),
    ('gated', 'decoder_norm_frozen', 'mean', 1, True),
    ('baseline', 'l1', 'mean', 2, True),
    ('baseline', 'decoder_norm', 'mean', 1, False),
    ('baseline', 'decoder_norm_frozen', 'mean', 1, True),
]


@pytest.mark.parametrize('arch, sparsity, loss_scale, n_sae, blocked', CASES)
def test_float32_gradients_equal_autodiff_of_plain_formulation(
    monkeypatch, arch, sparsity, loss_scale, n_sae, blocked
):
  if blocked:  # blocks of 8 (1 SAE) or 16 rows forward, of 8 or 10 latents backward
    monkeypatch.setattr(models, '_BLOCK_ELEMENTS', 8 * n_sae * BATCH)
  spec = models.SAESpec(arch, D_IN, D_SAE, sparsity=sparsity, loss_scale=loss_scale)
  params = _params(arch, n_sae, seed=1)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, D_IN)), jnp.float32)
  l1 = jnp.linspace(0.05, 0.2, n_sae)
  got = _grads(models.stacked_forward, spec, params, x, l1)
  want = _grads(reference_stacked_forward, spec, params, x, l1, jit=False)
  names = ['params.' + k for k in params] + ['x', 'l1_coeff']
  for name, g, r in zip(
      names, jax.tree.leaves(got), jax.tree.leaves(want), strict=True
  ):
    r = np.asarray(r, np.float64)
    scale = max(np.max(np.abs(r)), 1e-6)
    np.testing.assert_allclose(
        np.asarray(g, np.float64), r, rtol=0, atol=1e-5 * scale, err_msg=name
    )
  # The outputs themselves, too.
  out = models.stacked_forward(spec, params, x, l1)
  ref = reference_stacked_forward(spec, params, x, l1)
  for k in ref:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
  f = np.asarray(out['f'])
  np.testing.assert_array_equal(out['fires'], np.sum(f > 0, axis=1))
  if arch == 'gated':  # the gate mask rides in f's sign bit: -0.0 = closed
    pre = (
        np.einsum('bi,nis->nbs', x, params['W_enc'])
        - np.einsum('ni,nis->ns', params['b_dec'], params['W_enc'])[:, None]
    )
    gate = pre + np.asarray(params['b_gate'])[:, None] > 0
    sure = np.abs(pre + np.asarray(params['b_gate'])[:, None]) > 1e-4
    np.testing.assert_array_equal(~np.signbit(f)[sure], gate[sure])
    assert np.any(gate & (f == 0)), 'no open gate with ReLU(pi_mag) = 0 tested'


def test_blocks_are_used_at_training_shapes():
  """At d_sae 4096 and batch 4096 both passes run in blocks (two loops)."""
  spec = models.SAESpec('gated', 512, 4096)
  p = jax.eval_shape(
      lambda: jax.tree.map(
          lambda v: v[None], models.init_params(spec, jax.random.key(0))
      )
  )
  x = jax.ShapeDtypeStruct((4096, 512), jnp.float32)
  loss = lambda p, x: jnp.sum(models.stacked_forward(spec, p, x, jnp.ones(1))['l_rec'])
  text = str(jax.make_jaxpr(jax.grad(loss))(p, x))
  # fori_loops with static trip counts (the custom VJP runs on CPU only).
  assert text.count('scan[') == (2 if jax.default_backend() == 'cpu' else 0)


@pytest.mark.parametrize('arch', models.ARCHITECTURES)
def test_bfloat16_gradients_close_to_float32(monkeypatch, arch):
  monkeypatch.setattr(models, '_BLOCK_ELEMENTS', 8 * BATCH)
  params = _params(arch, 1, seed=3)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(BATCH, D_IN)), jnp.float32)
  l1 = jnp.asarray([0.1])
  grads = {}
  for dtype in ('float32', 'bfloat16'):
    spec = models.SAESpec(arch, D_IN, D_SAE, compute_dtype=dtype)
    out = models.stacked_forward(spec, params, x, l1)
    assert out['f'].dtype == jnp.dtype(dtype) and out['x_hat'].dtype == jnp.float32
    grads[dtype] = jax.jit(
        jax.grad(lambda p, s=spec: jnp.mean(_loss(models.stacked_forward, s, p, x, l1)))
    )(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads[dtype]))
  for name in params:
    a = np.asarray(grads['float32'][name], np.float64).ravel()
    b = np.asarray(grads['bfloat16'][name], np.float64).ravel()
    # bfloat16 keeps 8 significant bits; seen: 0.3% to 1.2% relative error.
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert rel < 0.03, (name, rel)


def test_bfloat16_loss_curve_tracks_float32(tmp_path):
  """Tolerance: the bfloat16 run's loss, L0 and FVU within 1% (relative) of the
  float32 run's at every logged step of 60 (seen: < 0.2% over 100 steps)."""
  records = {}
  for dtype in ('float32', 'bfloat16'):
    c = synthetic_exp.get_config('test')
    c.sae.compute_dtype = dtype
    c.train.num_steps = 60
    c.log.every_steps = 10
    c.checkpoint.every_steps = 60
    workdir = str(tmp_path / dtype)
    train.train_and_evaluate(c, workdir)
    records[dtype] = train.load_metrics(workdir)
  f32, bf16 = records['float32'], records['bfloat16']
  assert (
      [r['step'] for r in f32] == [r['step'] for r in bf16] == list(range(10, 61, 10))
  )
  for a, b in zip(f32, bf16, strict=True):
    for key in ('loss', 'l0', 'fvu'):
      np.testing.assert_allclose(
          b[key], a[key], rtol=0.01, err_msg=f"{key} @ {a['step']}"
      )
  assert f32[-1]['loss'][0] < 0.5 * f32[0]['loss'][0]  # it did learn


@pytest.mark.parametrize(
    'arch, sparsity',
    [
        ('gated', 'l1'),
        ('gated', 'decoder_norm'),
        ('gated', 'decoder_norm_frozen'),
        ('baseline', 'l1'),
    ],
)
def test_autodiff_path_equals_plain_formulation(arch, sparsity):
  """The forward that other backends than CPU differentiate with jax.grad."""
  spec = models.SAESpec(arch, D_IN, D_SAE, sparsity=sparsity)
  forward = lambda s, p, x, l1: models._autodiff_forward(s, p, x, l1, None)
  params = _params(arch, 2, seed=5)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(BATCH, D_IN)), jnp.float32)
  l1 = jnp.asarray([0.05, 0.2])
  got = _grads(forward, spec, params, x, l1)
  want = _grads(reference_stacked_forward, spec, params, x, l1, jit=False)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    r = np.asarray(r, np.float64)
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * max(np.max(np.abs(r)), 1e-6))
  out = forward(spec, params, x, l1)
  f = np.asarray(out['f'])
  np.testing.assert_array_equal(out['fires'], np.sum(f > 0, axis=1))
  want_f = np.asarray(models.stacked_forward(spec, params, x, l1)['f'])
  np.testing.assert_array_equal(np.signbit(f), np.signbit(want_f))  # same gates
