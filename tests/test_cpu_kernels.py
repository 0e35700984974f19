"""The fused CPU kernels (gsae_jax/cpu_kernels.*) against plain XLA.

models.py runs a gated step's elementwise work -- gates, latents, fire
counts, penalty, masks and bias sums -- in two XLA FFI kernels when they are
available, and as plain XLA ops otherwise. Both paths must give the same
outputs and gradients; the float64 references in test_models.py and
test_precision.py check the kernel path against the math.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax import cpu_kernels, models

D_IN, D_SAE, BATCH = 12, 40, 64


def _params(n_sae: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  w_dec = rng.normal(size=(n_sae, D_SAE, D_IN))
  w_dec /= np.linalg.norm(w_dec, axis=-1, keepdims=True)
  p = {
      'W_enc': rng.normal(size=(n_sae, D_IN, D_SAE)) * 0.5,
      'W_dec': w_dec,
      'b_dec': rng.normal(size=(n_sae, D_IN)) * 0.1,
      'b_gate': rng.normal(size=(n_sae, D_SAE)) * 0.3,
      'r_mag': rng.normal(size=(n_sae, D_SAE)) * 0.3,
      'b_mag': rng.normal(size=(n_sae, D_SAE)) * 0.3,
  }
  return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def _run(spec, params, x, l1):
  """Outputs, and gradients of the training loss (no cotangent on f)."""

  def loss(p):
    out = models.stacked_forward(spec, p, x, l1)
    return jnp.sum(jnp.mean(out['l_rec'] + out['l_sp'] + out['l_aux'], 1)), out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
  return out, grads


def test_kernels_build_and_register():
  assert cpu_kernels.available(), 'the fused CPU kernels did not build (see the log)'


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize(
    'sparsity, n_sae, blocked',
    [
        ('l1', 1, False),
        ('l1', 2, True),
        ('decoder_norm_frozen', 1, True),
    ],
)
def test_fused_path_equals_plain_xla(monkeypatch, dtype, sparsity, n_sae, blocked):
  if blocked:  # blocks of 8 rows forward and 8 latents backward, per SAE
    monkeypatch.setattr(models, '_BLOCK_ELEMENTS', 8 * BATCH)
  spec = models.SAESpec('gated', D_IN, D_SAE, sparsity=sparsity, compute_dtype=dtype)
  params = _params(n_sae, seed=5)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(BATCH, D_IN)), jnp.float32)
  l1 = jnp.linspace(0.05, 0.2, n_sae)
  assert models._fused(spec, None, jnp.dtype(dtype))
  fused = _run(spec, params, x, l1)
  monkeypatch.setattr(models, '_fused', lambda *a: False)
  plain = _run(spec, params, x, l1)

  (out, grads), (ref, ref_grads) = fused, plain
  # f: the same gates (-0.0 closed), the same zeros, the same values to the
  # rounding of exp(r_mag) * pre + b_mag (XLA may fuse it into one FMA).
  f, f_ref = np.asarray(out['f'], np.float32), np.asarray(ref['f'], np.float32)
  np.testing.assert_array_equal(np.signbit(f), np.signbit(f_ref))
  np.testing.assert_array_equal(f > 0, f_ref > 0)
  tol = 1e-2 if dtype == 'bfloat16' else 1e-6
  np.testing.assert_allclose(f, f_ref, rtol=tol, atol=tol)
  np.testing.assert_array_equal(out['fires'], ref['fires'])
  assert np.any(np.signbit(np.asarray(out['f'], np.float32)))
  for k in ('x_hat', 'l_rec', 'l_sp', 'l_aux'):
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for name in params:  # the bias sums run in another order: float32 rounding
    g, r = np.asarray(grads[name], np.float64), np.asarray(ref_grads[name], np.float64)
    np.testing.assert_allclose(
        g, r, rtol=0, atol=1e-5 * np.max(np.abs(r)), err_msg=name
    )


def test_backward_kernel_rejects_a_block_outside_f():
  f_all = jnp.zeros((1, 8, 16), jnp.float32)
  d = jnp.zeros((8, 4), jnp.float32)
  vec = jnp.zeros((4,), jnp.float32)
  with pytest.raises(Exception, match='latent block outside f_all'):
    jax.block_until_ready(
        cpu_kernels.gated_backward(
            d, d, f_all, 0, 14, jnp.zeros(8), vec, vec, 'float32'
        )
    )


def test_build_is_cached_and_leaves_no_partial_files():
  path = cpu_kernels.build()
  mtime = path.stat().st_mtime_ns
  assert cpu_kernels.build() == path and path.stat().st_mtime_ns == mtime
  assert not list(path.parent.glob('*.partial'))


def test_without_a_compiler_the_plain_path_is_used(monkeypatch, tmp_path):
  monkeypatch.setenv('GSAE_JAX_KERNEL_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', os.path.join(str(tmp_path), 'no-such-c++'))
  with pytest.raises(RuntimeError, match='no C\\+\\+ compiler'):
    cpu_kernels.build()
  assert cpu_kernels._load.__wrapped__() is False
  assert not list(tmp_path.iterdir())
  monkeypatch.setenv('GSAE_JAX_CPU_KERNELS', '0')
  assert cpu_kernels._load.__wrapped__() is False


def test_concurrent_calls_on_several_devices_finish_and_agree():
  """Kernels running at once (pmap over 4 CPU devices) share XLA's thread pool;
  none may wait on a pool task that cannot start."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from gsae_jax import cpu_kernels
      assert cpu_kernels.available() and jax.device_count() == 4
      pre = jax.random.normal(jax.random.PRNGKey(0), (4, 256, 512))
      v = jnp.zeros((4, 512))
      run = jax.pmap(
          lambda p, v: cpu_kernels.gated_forward(p, v, v, v + 1, v, v + 1, 'float32')
      )
      for _ in range(100):
        out = run(pre, v)
      one = cpu_kernels.gated_forward(pre[3], v[3], v[3], v[3] + 1, v[3], v[3] + 1, 'float32')
      assert all(bool(jnp.array_equal(a[3], b)) for a, b in zip(out, one))
      print('ok')
  """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-c', script],
      env=env,
      cwd=root,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-2000:]
