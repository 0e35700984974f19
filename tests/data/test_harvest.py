"""Harvest from the real LM into a cache, and training from that cache."""

import os

import numpy as np
import pytest

from experiments import smollm2_sweep
from gsae_jax import train
from gsae_jax.data import cache, harvest, text


def mini_config(cache_dir, **harvest_overrides):
  """The main job's miniature harvest, trained as one SAE."""
  c = smollm2_sweep.get_config('test')
  c.sweep.architecture, c.sweep.l1_coeff = (), ()
  c.data.cache_dir = str(cache_dir)
  c.sae.d_sae = 64
  c.train.num_steps = 12
  c.log.every_steps = 4
  c.checkpoint.every_steps = 6
  c.checkpoint.async_save = False
  for k, v in harvest_overrides.items():
    c.harvest[k] = v
  return c


@pytest.fixture(scope='module')
def harvested(lm, tmp_path_factory):
  path = tmp_path_factory.mktemp('harvest') / 'cache'
  manifest = harvest.harvest(mini_config(path), model=lm)
  return path, manifest


def test_harvest_writes_the_lm_activations_without_position_0(harvested, lm):
  path, manifest = harvested
  assert manifest['count'] == 600
  assert manifest['d_in'] == lm.d_model == 576
  assert manifest['site'] == 'blocks.15.hook_resid_post'
  assert not os.path.exists(os.path.join(path, harvest.JOURNAL))
  # The first context, run directly: the cache holds positions 1..15.
  docs = text.iter_documents(split='train')
  first = next(text.iter_contexts(docs, lm, 16))
  direct = np.asarray(lm.activations(first[None], 'blocks.15.hook_resid_post'))[0]
  stored = cache.Cache(path).read_range(0, 15).astype(np.float32)
  np.testing.assert_allclose(stored, direct[1:], rtol=2e-3, atol=2e-3)
  norms = np.linalg.norm(
      cache.Cache(path).read_range(0, 600).astype(np.float32), axis=-1
  )
  assert norms.max() <= 10 * np.median(norms) * 1.01  # no attention sinks kept


def test_interrupted_harvest_resumes_to_the_same_bytes(
    harvested, lm, tmp_path, monkeypatch
):
  full_path, _ = harvested
  path = tmp_path / 'cache'
  calls = []
  real = lm.activations

  def dies_on_the_fifth_call(ids, site):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt('simulated kill')
    return real(ids, site)

  monkeypatch.setattr(lm, 'activations', dies_on_the_fifth_call)
  with pytest.raises(KeyboardInterrupt):
    harvest.harvest(mini_config(path), model=lm)
  monkeypatch.setattr(lm, 'activations', real)
  assert not os.path.exists(path / cache.MANIFEST)  # never looks complete
  with pytest.raises(cache.CacheError, match='manifest'):
    cache.Cache(path)
  harvest.harvest(mini_config(path), model=lm)
  for name in sorted(os.listdir(full_path)):
    if name.startswith('shard_'):
      assert (path / name).read_bytes() == (full_path / name).read_bytes(), name


def test_training_from_the_cache_resumes_exactly(harvested, tmp_path):
  path, manifest = harvested
  c = mini_config(path)
  straight = train.train_and_evaluate(c, str(tmp_path / 'a'))
  np.testing.assert_allclose(
      float(straight.norm_scale),
      np.sqrt(576 / manifest['stats']['mean_sq_norm']),
      rtol=1e-6,
  )
  half = mini_config(path)
  half.train.num_steps = 6
  train.train_and_evaluate(half, str(tmp_path / 'b'))
  resumed = train.train_and_evaluate(c, str(tmp_path / 'b'))
  for name, value in straight.params.items():
    np.testing.assert_array_equal(
        np.asarray(resumed.params[name]), np.asarray(value), name
    )


def test_a_cache_of_another_width_is_named_in_the_error(harvested, tmp_path):
  path, _ = harvested
  c = mini_config(path)
  c.sae.d_in = 64
  with pytest.raises(cache.CacheError, match='manifest.json'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  c = mini_config(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='launch.harvest'):
    train.train_and_evaluate(c, str(tmp_path / 'run2'))
