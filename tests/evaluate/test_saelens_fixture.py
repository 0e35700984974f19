"""SAELens exports checked against the real SAELens library, through fixtures.

tests/evaluate/fixtures/saelens/ holds this library's SAELens exports of random
SAEs of every architecture (and a gated SAE's JumpReLU form), a fixed input
x.npy, and what SAELens itself computed from each export after
`SAE.load_from_disk` (saelens_outputs.npz: f = encode(x), x_hat = decode(f);
versions.json names the SAELens version). They were made by
tests/evaluate/fixtures/make_saelens_fixtures.py, whose docstring says how to
re-run it; no torch is needed here.

If an export's format changes on purpose, re-run both of its steps: the new
files must load in SAELens and give the same latents there too.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from gsae_jax.evaluate import export

_SCRIPT = os.path.join(
    os.path.dirname(__file__), 'fixtures', 'make_saelens_fixtures.py'
)
_spec = importlib.util.spec_from_file_location('make_saelens_fixtures', _SCRIPT)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

# The SAELens architecture each fixture must have been written as; the others
# (jumprelu, the BatchTopK family, a gated SAE's JumpReLU form) as 'jumprelu'.
SAELENS_ARCH = {'gated': 'gated', 'baseline': 'standard', 'topk': 'topk'}
EXPORTS = fixtures.exports()
# cfg.json fields that change without the format changing: the whole run
# config, which gains a field with every new config option.
VARYING = ('gsae_jax_config',)
NAMES = sorted(EXPORTS)


def _dir(name):
  return os.path.join(fixtures.OUT, name)


def _cfg(path):
  with open(os.path.join(path, export.SAELENS_CFG)) as f:
    return json.load(f)


def _outputs(name):
  with np.load(os.path.join(_dir(name), fixtures.OUTPUTS)) as data:
    return dict(data)


def _x():
  return np.load(os.path.join(fixtures.OUT, 'x.npy'))


def _sae(name):
  arch, _ = EXPORTS[name]
  return fixtures.make_sae(arch)


def test_fixtures_cover_every_architecture():
  assert fixtures.exported() == NAMES  # each export committed, none left over
  np.testing.assert_array_equal(_x(), fixtures.fixed_input())
  with open(os.path.join(fixtures.OUT, 'versions.json')) as f:
    assert int(json.load(f)['sae_lens'].split('.')[0]) >= 6
  for name in NAMES:
    assert os.path.exists(os.path.join(_dir(name), fixtures.OUTPUTS)), name


@pytest.mark.parametrize('name', NAMES)
def test_export_equals_the_committed_one(name, tmp_path):
  arch, jumprelu = EXPORTS[name]
  path = export.to_saelens(
      fixtures.make_sae(arch), str(tmp_path / name), jumprelu=jumprelu
  )
  want, got = _cfg(_dir(name)), _cfg(path)
  assert want['architecture'] == SAELENS_ARCH.get(name, 'jumprelu')
  assert got['architecture'] == want['architecture']
  for key in VARYING:
    del want[key], got[key]
  assert got == want
  want_t = load_file(os.path.join(_dir(name), export.SAELENS_WEIGHTS))
  got_t = load_file(os.path.join(path, export.SAELENS_WEIGHTS))
  assert sorted(got_t) == sorted(want_t)
  for key, value in want_t.items():
    assert got_t[key].dtype == value.dtype == np.float32, key
    assert got_t[key].shape == value.shape, key
    # Not bit-equal: the random init may round differently on another backend.
    np.testing.assert_allclose(got_t[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize('name', NAMES)
def test_encode_and_decode_equal_saelens(name):
  sae, x, want = _sae(name), _x(), _outputs(name)
  f = sae.encode(x)
  assert (f > 0).any() and (f == 0).any()  # a real sparse code, not all 0
  assert f.shape == want['f'].shape == (64, 32)
  np.testing.assert_allclose(f, want['f'], rtol=1e-5, atol=1e-5)
  assert want['x_hat'].shape == x.shape
  np.testing.assert_allclose(sae.decode(f), want['x_hat'], rtol=1e-5, atol=1e-5)
  if name == 'topk':  # SAELens read k from cfg.json
    np.testing.assert_array_equal((want['f'] != 0).sum(-1), fixtures.K)


@pytest.mark.parametrize('name', NAMES)
def test_load_saelens_of_the_committed_export(name):
  back, sae, x = export.load_saelens(_dir(name)), _sae(name), _x()
  assert (back.step, back.norm_scale, back.index) == (
      fixtures.STEP,
      fixtures.NORM_SCALE,
      fixtures.SEED,
  )
  f = sae.encode(x)
  np.testing.assert_allclose(back.encode(x), f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(back.decode(f), sae.decode(f), rtol=1e-5, atol=1e-5)
