"""Meshes, pmap and two processes give the single-device result.

Each configuration runs in a subprocess (tests/parallel_worker.py), since the
number of CPU devices is fixed when JAX starts. The run: a stack of 4 gated
SAEs (d_in 16, d_sae 32, batch 64) for 20 steps; and a stack of 4 BatchTopK
SAEs on one device and on a (data, model) mesh.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import gsae_jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, 'tests', 'train', 'parallel_worker.py')
MESHES = ['jit:8,1,1', 'jit:1,8,1', 'jit:2,4,1', 'jit:2,1,4', 'pmap']


def _name(run):
  return run.replace(':', '_').replace(',', 'x').replace('@', '_')


def _worker(devices, out, workdir, runs, steps=20, extra=()):
  args = [sys.executable, WORKER, f'--devices={devices}', f'--out={out}']
  args += [f'--workdir={workdir}', f'--steps={steps}', '--runs', *runs, *extra]
  return subprocess.Popen(
      args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _wait(*procs):
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]


def _params(out, run):
  with np.load(os.path.join(out, f'{_name(run)}.npz')) as f:
    return dict(f)


def _assert_same(a, b, what):
  for k in b:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f'{what}: {k}')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp('parallel')
  # The two workers are independent processes: run them side by side.
  _wait(
      _worker(1, out, out / 'one', ['jit:1,1,1', 'jit:1,1,1@batchtopk']),
      _worker(8, out, out / 'eight', [*MESHES, 'jit:2,4,1@batchtopk']),
  )
  return out


def test_batchtopk_on_a_data_and_model_mesh_matches_one_device(runs):
  """BatchTopK selects over the whole batch and dictionary, sharded on a
  (data 2, model 4) mesh as on one device; its threshold and AuxK included."""
  got, want = _params(runs, 'jit:2,4,1@batchtopk'), _params(runs, 'jit:1,1,1@batchtopk')
  assert float(np.min(want['threshold'])) > 0  # estimated
  _assert_same(got, want, 'batchtopk on jit:2,4,1')


@pytest.mark.parametrize('run', MESHES)
def test_meshes_and_pmap_match_one_device(runs, run):
  _assert_same(_params(runs, run), _params(runs, 'jit:1,1,1'), run)


def test_model_axis_shards_the_dictionary(runs):
  def local(run):
    with open(runs / f'{_name(run)}.json') as f:
      return json.load(f)['local_bytes']

  one, model8, mixed = local('jit:1,1,1'), local('jit:1,8,1'), local('jit:2,4,1')
  for k in ('W_enc', 'W_dec'):
    assert model8[k] * 8 == one[k]
    assert mixed[k] * 4 == one[k]
  assert local('jit:2,1,4')['W_enc'] * 4 == one['W_enc']  # sweep axis splits the stack


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pair(out, workdir, runs, steps=20):
  port = _free_port()
  procs = []
  for i in range(2):
    extra = [
        f'--coordinator=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
    ]
    procs.append(_worker(4, out, workdir, runs, steps, extra))
  _wait(*procs)


def test_two_processes_train_and_checkpoint_like_one(runs, tmp_path):
  reference = _params(runs, 'jit:8,1,1')
  # A fresh run on 2 processes x 4 devices.
  _pair(tmp_path, tmp_path / 'pair', ['jit:8,1,1'])
  _assert_same(_params(tmp_path, 'jit:8,1,1'), reference, 'two processes')
  # Its checkpoint restores in this single process.
  saes = gsae_jax.load(str(tmp_path / 'pair' / 'jit_8x1x1'))
  assert len(saes) == 4 and saes[0].step == 20
  # A single-process checkpoint (step 10) is resumed by the pair to step 20.
  single = tmp_path / 'single'
  os.makedirs(tmp_path / 'unused', exist_ok=True)
  _wait(_worker(8, tmp_path / 'unused', single, ['jit:8,1,1'], steps=10))
  shutil.rmtree(tmp_path / 'pair')
  _pair(tmp_path, single, ['jit:8,1,1'])
  _assert_same(_params(tmp_path, 'jit:8,1,1'), reference, 'resumed by two processes')


def test_to_global_places_whole_and_per_process_batches():
  import jax  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

  from gsae_jax.train import placement  # noqa: PLC0415

  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  for process_rows in (False, True):  # one process: its rows are the batch
    array = placement.to_global(x, sharding, process_rows)
    assert array.shape == x.shape and array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), x)
