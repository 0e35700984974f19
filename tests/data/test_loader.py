"""Tests for gsae_jax.data.loader: shuffled, resumable batches on grain."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import toy_store as toy

from gsae_jax.data import loader as loader_lib
from gsae_jax.data import store as store_lib
from gsae_jax.data.store import StoreError

BATCH = 256


@pytest.fixture(scope='module')
def store(store_path):
  return store_lib.Store(str(store_path))


def loader(store, **kwargs):
  kwargs = dict(batch_size=BATCH, seed=0, shuffle_buffer=512) | kwargs
  return loader_lib.ActivationLoader(store, **kwargs)


def take(reader, n):
  return np.concatenate([next(reader) for _ in range(n)])


@pytest.mark.parametrize('shuffle_buffer', [512, 1 << 20])
def test_every_row_once_per_epoch_and_rows_match_the_store(store, acts, shuffle_buffer):
  """Windows of whole records, reshuffled each epoch: epoch e of the stream is
  a permutation of all rows when the window size divides the record count."""
  n = toy.N_ROWS
  reader = loader(store, shuffle_buffer=shuffle_buffer, with_rows=True)
  rows, xs = zip(*[next(reader) for _ in range(3 * n // BATCH)], strict=True)
  rows, xs = np.concatenate(rows), np.concatenate(xs)
  np.testing.assert_array_equal(xs, acts[rows].astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(toy.row_ids(xs), rows)
  if reader.records_per_window in (1, store.num_records):  # windows = epochs
    for epoch in range(2):
      seen = np.sort(rows[epoch * n : (epoch + 1) * n])
      np.testing.assert_array_equal(seen, np.arange(n))
  else:  # 37 records, windows of 4: each record's rows come within its window
    assert len(set(rows[:n].tolist())) > 0.9 * n
  # Shuffled: consecutive rows are rarely neighbours in the store.
  assert np.mean(np.abs(np.diff(rows[:BATCH])) == 1) < 0.05
  assert reader.epoch == 2 and reader.get_state()['step'] == 3 * n // BATCH


def test_same_seed_same_stream_other_seed_other_stream(store):
  a = take(loader(store, seed=3), 4)
  np.testing.assert_array_equal(a, take(loader(store, seed=3), 4))
  assert not np.array_equal(a, take(loader(store, seed=4), 4))


@pytest.mark.parametrize('resume_step', [1, 7, 20, 43])
@pytest.mark.parametrize('process', [(0, 1), (1, 2)])
def test_resume_reproduces_the_stream(store, resume_step, process):
  index, count = process
  kwargs = dict(process_index=index, process_count=count, shuffle_buffer=700)
  straight = loader(store, **kwargs)
  expected = [next(straight) for _ in range(resume_step + 5)]
  state = None
  first = loader(store, **kwargs)
  for _ in range(resume_step):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # through JSON, as saved
  resumed = loader(store, **kwargs)
  resumed.set_state(state)
  for step in range(resume_step, resume_step + 5):
    np.testing.assert_array_equal(next(resumed), expected[step], err_msg=str(step))


def test_set_state_rejects_other_settings(store):
  state = loader(store, seed=1).get_state()
  with pytest.raises(StoreError, match='seed=1 .* seed=0'):
    loader(store, seed=0).set_state(state)
  with pytest.raises(StoreError, match='shuffle_buffer changed'):
    loader(store, seed=1, shuffle_buffer=2048).set_state(state)
  with pytest.raises(StoreError, match='valid step'):
    loader(store).set_state({'seed': 0})


@pytest.mark.parametrize('process_count', [2, 3])
def test_each_process_reads_only_its_records(store, process_count):
  seen = []
  for p in range(process_count):
    reader = loader(
        store,
        process_index=p,
        process_count=process_count,
        batch_size=BATCH * process_count // 2 * 2,
        with_rows=True,
    )
    records = set(range(p, store.num_records, process_count))
    rows = np.concatenate([next(reader)[0] for _ in range(30)])
    owner = np.searchsorted(np.cumsum(store.records[:, 1]), rows, side='right')
    assert set(owner.tolist()) <= records
    assert set(owner.tolist()) == records  # and sees all of them
    seen.append(set(rows.tolist()))
  assert set.union(*seen) == set(range(toy.N_ROWS))
  assert sum(len(s) for s in seen) == toy.N_ROWS  # disjoint


def test_more_processes_than_records(store):
  with pytest.raises(StoreError, match='fewer than process_count=64'):
    loader(store, process_count=64, batch_size=64)


def test_unshuffled_loader_streams_stored_order(store, acts):
  got = take(loader(store, shuffle=False), 4)
  np.testing.assert_array_equal(got, acts[: 4 * BATCH].astype(np.float16))


def test_disk_dtype_batches(store, acts):
  got = next(loader(store, dtype=np.float16, shuffle=False))
  assert got.dtype == np.float16
  np.testing.assert_array_equal(got, acts[:BATCH].astype(np.float16))


def test_set_state_while_prefetching(store):
  reader = loader(store, prefetch=3)
  first = [next(reader) for _ in range(6)]
  reader.set_state({'step': 2})
  np.testing.assert_array_equal(next(reader), first[2])
  assert reader.get_state()['step'] == 3


def test_grain_source_protocol(store, acts):
  import grain

  records = loader_lib.StoreRecords(store)
  ds = grain.MapDataset.source(records)
  assert len(ds) == store.num_records
  np.testing.assert_array_equal(ds[1], acts[128:256].astype(np.float16))


_TWO_PROCESS_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, index, path, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=index
)
from gsae_jax.data import loader
from gsae_jax.train import placement
mesh = jax.make_mesh((4,), ("data",))
sharding = NamedSharding(mesh, PartitionSpec("data"))
results = []
reader = loader.ActivationLoader(
    path, batch_size=batch, shuffle_buffer=512, process_index=jax.process_index(),
    process_count=jax.process_count(),
)
for _ in range(3):
  array = placement.to_global(next(reader), sharding, process_rows=True)
  assert array.shape == (batch, reader.d_in), array.shape
  total = float(jax.jit(lambda x: x.sum())(array))
  rows = np.asarray(multihost_utils.process_allgather(array, tiled=True))
  ids = (rows[:, 1] * 1024 + rows[:, 0]).astype(np.int64)
  results.append([total, sorted(ids.tolist())])
print("RESULT " + json.dumps(results), flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_processes_make_one_global_batch(store, tmp_path):
  """docs/design.md §6: two JAX processes on loopback, each reading its own slice."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS='cpu')
  logs = [tmp_path / f'process_{i}.log' for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'w') as out:  # files, not pipes: no pipe-full deadlock
      procs.append(
          subprocess.Popen(
              [sys.executable, '-c', _TWO_PROCESS_SCRIPT, str(port), str(i)]
              + [store.path, str(BATCH)],
              stdout=out,
              stderr=subprocess.STDOUT,
              env=env,
          )
      )
  try:
    for p in procs:
      p.wait(timeout=120)
  finally:
    for p in procs:
      p.kill()
  results = []
  for p, log in zip(procs, logs, strict=True):
    out = log.read_text()
    assert p.returncode == 0, out[-3000:]
    results.append(json.loads(out.split('RESULT ')[-1]))
  # Both processes see the same global arrays: the two local slices together.
  assert results[0] == results[1]
  r0 = loader(store, process_index=0, process_count=2)
  r1 = loader(store, process_index=1, process_count=2)
  for step, (total, ids) in enumerate(results[0]):
    both = np.concatenate([next(r0), next(r1)])  # [BATCH, D_IN]
    assert ids == sorted(toy.row_ids(both).tolist())
    assert total == pytest.approx(float(both.sum(dtype=np.float64)), rel=1e-5)
    assert len(set(ids)) == BATCH, step
