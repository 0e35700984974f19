"""Harvest from the real LM into stores, in one or many processes, and training from them."""

import signal
import time

import numpy as np
import pytest
import toy_store as toy

import gsae_jax
from experiments import smollm2_sweep
from gsae_jax import train
from gsae_jax.data import harvest, text
from gsae_jax.data import store as store_lib

SITE = 'blocks.15.hook_resid_post'


def mini_config(cache_dir, **harvest_overrides):
  """The main job's miniature harvest (40 contexts in 5 shards), trained as one SAE."""
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
  manifest = harvest.harvest(mini_config(path), model=lm)[SITE]
  return path, manifest


def test_harvest_writes_the_lm_activations_without_position_0(harvested, lm):
  path, manifest = harvested
  assert manifest['count'] == 600  # 40 contexts x 15 positions, no outliers here
  assert manifest['d_in'] == lm.d_model == 576
  assert manifest['site'] == SITE
  assert [s['rows'] for s in manifest['shards']] == [120] * 5  # 8 contexts each
  assert [s['contexts'] for s in manifest['shards']] == [
      [8 * i, 8 * i + 8] for i in range(5)
  ]
  # The first context, run directly: the store holds positions 1..15.
  docs = text.iter_documents(split='train')
  first = next(text.iter_contexts(docs, lm, 16))
  direct = np.asarray(lm.activations(first[None], SITE))[0]
  store = store_lib.Store(str(path))
  np.testing.assert_allclose(store.read_range(0, 15), direct[1:], rtol=2e-3, atol=2e-3)
  norms = np.linalg.norm(store.read_range(0, 600), axis=-1)
  assert norms.max() <= 10 * np.median(norms) * 1.01  # no attention sinks kept


def test_interrupted_harvest_resumes_to_the_same_bytes(
    harvested, lm, tmp_path, monkeypatch
):
  full_path, _ = harvested
  path = tmp_path / 'cache'
  calls = []
  real = lm.activations_at

  def dies_on_the_fifth_call(ids, sites):
    calls.append(1)
    if len(calls) == 5:  # in shard 2, after its first chunk is written
      raise KeyboardInterrupt('simulated kill')
    return real(ids, sites)

  monkeypatch.setattr(lm, 'activations_at', dies_on_the_fifth_call)
  with pytest.raises(KeyboardInterrupt):
    harvest.harvest(mini_config(path), model=lm)
  monkeypatch.setattr(lm, 'activations_at', real)
  assert not store_lib.exists(str(path))  # never looks complete
  with pytest.raises(store_lib.StoreError, match='harvest did not finish'):
    store_lib.Store(str(path))
  harvest.harvest(mini_config(path), model=lm)
  assert toy.tree_bytes(path) == toy.tree_bytes(full_path)


def _harvest_cli(path, process_id, num_processes):
  return toy.start_cli(
      'launch.harvest',
      f'--config.data.cache_dir={path}',
      f'--num_processes={num_processes}',
      f'--process_id={process_id}',
  )


@pytest.mark.slow
def test_two_processes_one_killed_and_restarted_equal_one_process(harvested, tmp_path):
  full_path, _ = harvested
  path = tmp_path / 'two'
  first, second = _harvest_cli(path, 0, 2), _harvest_cli(path, 1, 2)
  # Kill process 1 as soon as its first shard (shard 1) is marked done: it
  # is then inside shard 3.
  marker = path / 'shards' / '00001.json'
  deadline = time.time() + 240
  while not marker.exists() and second.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  second.send_signal(signal.SIGKILL)
  second.communicate()
  out, _ = first.communicate(timeout=240)
  assert first.returncode == 0, out[-3000:]
  assert not store_lib.exists(str(path))  # process 1's shards are missing
  assert 'waits for other processes' in out
  restarted = _harvest_cli(path, 1, 2)
  out, _ = restarted.communicate(timeout=240)
  assert restarted.returncode == 0, out[-3000:]
  assert 'already done' in out  # shard 1 was kept
  assert f'{SITE}: 600 activations' in out
  assert toy.tree_bytes(path) == toy.tree_bytes(
      full_path
  )  # arrays, markers and statistics


SITES = ('blocks.5.hook_resid_post', 'blocks.15.hook_mlp_out', SITE)


@pytest.fixture(scope='module')
def multi_site(lm, tmp_path_factory):
  """Three sites harvested in one run: (root of the stores, manifests, LM calls)."""
  root = tmp_path_factory.mktemp('multi')
  calls = []
  real = lm.activations_at
  lm.activations_at = lambda ids, s: calls.append(s) or real(ids, s)
  try:
    manifests = harvest.harvest(mini_config(root / '{site}', sites=SITES), model=lm)
  finally:
    del lm.activations_at  # back to the class's method
  return root, manifests, calls


def test_one_lm_pass_writes_each_site_as_a_one_site_harvest_would(
    harvested, multi_site, lm, tmp_path
):
  full_path, _ = harvested
  root, manifests, calls = multi_site
  assert calls == [SITES] * 10  # 40 contexts in batches of 4: one pass each
  assert toy.tree_bytes(root / SITE) == toy.tree_bytes(full_path)
  for site in SITES[:2]:
    alone = tmp_path / site
    harvest.harvest(mini_config(alone, site=site), model=lm)
    assert toy.tree_bytes(root / site) == toy.tree_bytes(alone), site
    assert manifests[site]['site'] == site
  # A training config reads its harvest.site's store from the '{site}' path.
  c = mini_config(str(root / '{site}'), site='blocks.5.hook_resid_post')
  assert harvest.train_store(c) == str(root / 'blocks.5.hook_resid_post')


def test_training_from_the_store_resumes_exactly(harvested, tmp_path):
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


def test_a_store_of_another_width_or_none_is_named_in_the_error(harvested, tmp_path):
  path, _ = harvested
  c = mini_config(path)
  c.sae.d_in = 64
  with pytest.raises(store_lib.StoreError, match=f'{path} holds d_in=576'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  c = mini_config(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='launch.harvest'):
    train.train_and_evaluate(c, str(tmp_path / 'run2'))
  bad = mini_config(tmp_path / 'x', sites=('blocks.5.hook_resid_post', SITE))
  with pytest.raises(
      ValueError, match=r"config.data.cache_dir: must contain '\{site\}'"
  ):
    harvest.harvest(bad)


def test_a_sweep_over_sites_trains_each_group_on_its_own_store(multi_site, tmp_path):
  from gsae_jax.evaluate import runner
  from gsae_jax.train import sweep

  root, _, _ = multi_site
  sites = ('blocks.5.hook_resid_post', SITE)
  c = mini_config(str(root / '{site}'))
  c.sweep.site = sites
  c.sweep.architecture, c.sweep.l1_coeff = ('gated',), (0.01,)
  c.train.num_steps = 4
  groups = sweep.plan(c)
  assert [g.name for g in groups] == [
      'L5_resid_post_gated_d64',
      'L15_resid_post_gated_d64',
  ]
  passes, why = sweep.data_passes(c, groups)
  assert [[g.name for g in p] for p in passes] == [[g.name] for g in groups]
  assert 'blocks.5.hook_resid_post: ' in why
  workdir = str(tmp_path / 'sweep')
  rows = sweep.run(c, workdir)
  assert [r['site'] for r in rows] == list(sites) and {r['status'] for r in rows} == {
      'done'
  }
  for site in sites:
    sae = gsae_jax.load(workdir, site=site)
    store = store_lib.Store(harvest.store_path(c.data.cache_dir, site))
    assert sae.config.harvest.site == site
    np.testing.assert_allclose(
        sae.norm_scale, np.sqrt(576 / store.mean_sq_norm), rtol=1e-6
    )
  table = runner.format_table(
      [
          dict(index=i, site=s, architecture='gated', d_sae=32)
          for i, s in enumerate(sites)
      ]
  )
  assert 'blocks.5.hook_resid_post' in table.splitlines()[1]
