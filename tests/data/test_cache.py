"""Tests for gsae_jax.cache: the sharded activation cache."""

import gc
import json
import os
import time

import numpy as np
import pytest

from gsae_jax.data import cache as cache_lib
from gsae_jax.data.cache import CacheError

D_IN = 8
N_ROWS = 5000  # not a multiple of records, shards or batches
SHARD_ROWS = 1024
RECORD_ROWS = 128
BATCH = 256


def make_acts(n: int = N_ROWS, d_in: int = D_IN, seed: int = 0) -> np.ndarray:
  """Random activations whose first two columns encode the row id exactly."""
  x = np.random.default_rng(seed).standard_normal((n, d_in)).astype(np.float32)
  ids = np.arange(n)
  x[:, 0], x[:, 1] = ids % 1024, ids // 1024  # exact in float16
  return x


def row_ids(batch: np.ndarray) -> np.ndarray:
  return (batch[:, 1] * 1024 + batch[:, 0]).astype(np.int64)


def write(directory, acts, chunk=777, **kwargs):
  kwargs = (
      dict(d_in=acts.shape[1], shard_rows=SHARD_ROWS, record_rows=RECORD_ROWS) | kwargs
  )
  with cache_lib.CacheWriter(
      directory, model="toy", site="blocks.0.hook_resid_post", **kwargs
  ) as w:
    for start in range(0, len(acts), chunk):
      w.append(acts[start : start + chunk])
  return directory


@pytest.fixture(scope="module")
def acts():
  return make_acts()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, acts):
  return write(tmp_path_factory.mktemp("cache"), acts)


def reader(path, **kwargs):
  kwargs = dict(batch_size=BATCH, seed=0, shuffle_buffer=512) | kwargs
  return cache_lib.CacheReader(path, **kwargs)


def test_layout_and_manifest(cache_dir, acts):
  names = sorted(os.listdir(cache_dir))
  assert names == ["manifest.json"] + [f"shard_{i:05d}.bin" for i in range(5)]
  with open(os.path.join(cache_dir, "manifest.json")) as f:
    m = json.load(f)
  assert (m["d_in"], m["dtype"], m["count"]) == (D_IN, "float16", N_ROWS)
  assert (m["model"], m["site"]) == ("toy", "blocks.0.hook_resid_post")
  assert [s["rows"] for s in m["shards"]] == [1024] * 4 + [904]
  assert all(len(s["crc32"]) == 8 for s in m["shards"])
  assert set(m["stats"]) == {"mean_sq_norm", "mean"}
  # Header, float16 rows, then the float64 statistics trailer.
  assert os.path.getsize(os.path.join(cache_dir, "shard_00004.bin")) == (
      cache_lib.HEADER_BYTES + 904 * D_IN * 2 + 8 * (D_IN + 1)
  )
  with cache_lib.Cache(cache_dir) as c:
    np.testing.assert_array_equal(
        c.read_range(0, N_ROWS), acts.astype(np.float16).astype(np.float32)
    )


def test_normalisation_stats_match_numpy(cache_dir, acts):
  stored = acts.astype(np.float16).astype(np.float64)
  with cache_lib.Cache(cache_dir) as c:
    np.testing.assert_allclose(
        c.mean_sq_norm, np.mean(np.sum(stored**2, axis=1)), rtol=1e-12
    )
    np.testing.assert_allclose(c.mean, stored.mean(axis=0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shuffle_buffer", [100, 512, 10**6])
def test_every_row_exactly_once_per_epoch(cache_dir, acts, shuffle_buffer):
  # 100 -> one record per window, 512 -> 4 records, 10**6 -> one window.
  with reader(cache_dir, shuffle_buffer=shuffle_buffer) as r:
    n_batches = -(-3 * N_ROWS // BATCH)  # three epochs, batches wrap
    batches = [next(r) for _ in range(n_batches)]
  assert all(b.shape == (BATCH, D_IN) and b.dtype == np.float32 for b in batches)
  stream = np.concatenate(batches)
  ids = row_ids(stream)
  for epoch in range(3):
    epoch_ids = ids[epoch * N_ROWS : (epoch + 1) * N_ROWS]
    np.testing.assert_array_equal(np.sort(epoch_ids), np.arange(N_ROWS))
  np.testing.assert_array_equal(stream, acts.astype(np.float16).astype(np.float32)[ids])
  with reader(cache_dir, shuffle_buffer=shuffle_buffer) as r:
    np.testing.assert_array_equal(
        np.concatenate([r.batch_rows(s) for s in range(n_batches)]), ids
    )
  # Shuffled across shards, and reshuffled each epoch.
  assert len(np.unique(ids[:BATCH] // SHARD_ROWS)) > 1
  assert not np.array_equal(ids[:N_ROWS], ids[N_ROWS : 2 * N_ROWS])


def test_disk_dtype_batches_and_shared_cache(cache_dir, acts):
  with cache_lib.Cache(cache_dir) as c:
    with reader(c, dtype=np.float16) as r16, reader(c) as r32:
      for _ in range(5):
        x16, x32 = next(r16), next(r32)
        assert x16.dtype == np.float16
        np.testing.assert_array_equal(x16.astype(np.float32), x32)
    c.read_range(0, 3)  # the readers did not close a cache they were given


def test_deterministic_for_a_seed_and_seeds_differ(cache_dir):
  with reader(cache_dir, seed=3) as a, reader(cache_dir, seed=3) as b:
    with reader(cache_dir, seed=4) as c:
      for step in range(25):
        xa, xb, xc = next(a), next(b), next(c)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(xa, a.batch(step))
        if step == 0:
          assert not np.array_equal(xa, xc)


@pytest.mark.parametrize(
    "resume_step, process", [(7, (0, 1)), (19, (0, 1)), (20, (0, 1)), (40, (1, 2))]
)
def test_resume_reproduces_the_stream(cache_dir, resume_step, process):
  # 5000 / 256 = 19.5 batches per epoch: 19 and 20 straddle the epoch edge.
  slice_ = dict(process_index=process[0], process_count=process[1])
  with reader(cache_dir, **slice_) as r:
    reference = [next(r) for _ in range(resume_step + 12)]
  with reader(cache_dir, **slice_) as r:
    for _ in range(resume_step):
      next(r)
    state = json.loads(json.dumps(r.get_state()))
  assert state["step"] == resume_step
  with reader(cache_dir, **slice_) as r:
    r.set_state(state)
    resumed = [next(r) for _ in range(12)]
  for want, got in zip(reference[resume_step:], resumed, strict=True):
    np.testing.assert_array_equal(want, got)


def test_set_state_rejects_other_settings(cache_dir):
  with reader(cache_dir, seed=0) as r:
    state = r.get_state()
  with reader(cache_dir, seed=1) as r, pytest.raises(CacheError, match="seed"):
    r.set_state(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_each_process_reads_only_its_records(cache_dir, process_count):
  # Records are 128 consecutive rows; shard sizes are multiples of 128 but the
  # last, so record id = row // 128 (40 records). Process p owns r % P == p.
  first_epochs = []
  for p in range(process_count):
    with reader(cache_dir, process_index=p, process_count=process_count) as r:
      local_rows, local_batch = r.local_rows, r.local_batch_size
      assert local_batch == BATCH // process_count
      steps = -(-2 * local_rows // local_batch)  # two local epochs
      batches = [next(r) for _ in range(steps)]
      assert all(b.shape == (local_batch, D_IN) for b in batches)
      ids = row_ids(np.concatenate(batches))
      np.testing.assert_array_equal(
          ids, np.concatenate([r.batch_rows(s) for s in range(steps)])
      )
    assert set(np.unique(ids // RECORD_ROWS) % process_count) == {p}
    for epoch in range(2):
      epoch_ids = ids[epoch * local_rows : (epoch + 1) * local_rows]
      assert len(np.unique(epoch_ids)) == local_rows
    first_epochs.append(ids[:local_rows])
  # Together the processes' epochs hold every row exactly once.
  np.testing.assert_array_equal(
      np.sort(np.concatenate(first_epochs)), np.arange(N_ROWS)
  )


def test_more_processes_than_records(cache_dir):
  with pytest.raises(CacheError, match="40 records.*fewer than process_count=64"):
    reader(cache_dir, process_index=0, process_count=64)


def test_unshuffled_reader_streams_stored_order(cache_dir, acts):
  with reader(cache_dir, shuffle=False) as r:
    ids = np.concatenate([row_ids(next(r)) for _ in range(20)])
  np.testing.assert_array_equal(ids, np.arange(20 * BATCH) % N_ROWS)


def test_interrupted_writer_resumes_to_an_identical_cache(tmp_path, acts):
  reference = write(tmp_path / "reference", acts)
  target = tmp_path / "resumed"

  class Crash(Exception):
    pass

  with pytest.raises(Crash):
    with cache_lib.CacheWriter(
        target,
        d_in=D_IN,
        model="toy",
        site="blocks.0.hook_resid_post",
        shard_rows=SHARD_ROWS,
        record_rows=RECORD_ROWS,
    ) as w:
      w.append(acts[:2600])  # 2 complete shards + a partial one
      raise Crash
  assert sorted(os.listdir(target)) == ["shard_00000.bin", "shard_00001.bin"]
  with pytest.raises(CacheError, match="harvest did not finish; re-run harvest"):
    cache_lib.Cache(target)
  with pytest.raises(CacheError, match="harvest did not finish"):
    cache_lib.CacheReader(target, batch_size=BATCH)
  with pytest.raises(CacheError, match="cannot resume.*shard_00000.bin.*site"):
    cache_lib.CacheWriter(
        target,
        d_in=D_IN,
        model="toy",
        site="blocks.1.hook_resid_post",
        shard_rows=SHARD_ROWS,
        record_rows=RECORD_ROWS,
    )

  # A stray temp file from a crash mid-rename is discarded too.
  (target / ".shard_00002.bin.tmp").write_bytes(b"partial")
  with cache_lib.CacheWriter(
      target,
      d_in=D_IN,
      model="toy",
      site="blocks.0.hook_resid_post",
      shard_rows=SHARD_ROWS,
      record_rows=RECORD_ROWS,
  ) as w:
    assert w.resumed_rows == 2 * SHARD_ROWS
    # The producer restarts from a context boundary before the resume point;
    # the writer drops the overlap.
    w.append(acts[2000:3000], start_row=2000)
    w.append(acts[3000:])
  assert sorted(os.listdir(reference)) == sorted(os.listdir(target))
  for name in sorted(os.listdir(reference)):
    assert (reference / name).read_bytes() == (target / name).read_bytes(), name
  # So a reader of the resumed cache yields the same batches.
  with reader(reference) as a, reader(target) as b:
    for _ in range(3):
      np.testing.assert_array_equal(next(a), next(b))


def test_writer_refuses_a_complete_cache(cache_dir):
  with pytest.raises(CacheError, match="already holds a complete cache"):
    cache_lib.CacheWriter(cache_dir, d_in=D_IN)


def test_writer_rejects_gaps_and_bad_shapes(tmp_path):
  w = cache_lib.CacheWriter(tmp_path, d_in=D_IN, shard_rows=256, record_rows=128)
  with pytest.raises(CacheError, match=r"\[n, 8\]"):
    w.append(np.zeros((4, D_IN + 1)))
  with pytest.raises(CacheError, match="gap"):
    w.append(np.zeros((4, D_IN)), start_row=5)
  w.abort()


def test_float16_overflow_suggests_bfloat16(tmp_path):
  x = np.ones((4, D_IN), np.float32)
  x[2, 3] = 1e6
  with pytest.raises(CacheError, match="bfloat16"):
    with cache_lib.CacheWriter(tmp_path / "f16", d_in=D_IN) as w:
      w.append(x)
  x[2, 3] = np.nan
  with pytest.raises(CacheError, match="row 2 .*is not finite"):
    with cache_lib.CacheWriter(tmp_path / "nan", d_in=D_IN) as w:
      w.append(x)
  x[2, 3] = 1e6
  write(tmp_path / "bf16", x, dtype="bfloat16")
  with cache_lib.Cache(tmp_path / "bf16") as c:
    got = c.read_range(0, 4)
  assert got[2, 3] == pytest.approx(1e6, rel=1e-2)
  np.testing.assert_array_equal(got[0], np.ones(D_IN))


def copy_cache(src, dst):
  os.makedirs(dst)
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f, open(
        os.path.join(dst, name), "wb"
    ) as g:
      g.write(f.read())
  return dst


def test_truncated_shard_error_names_the_file(cache_dir, tmp_path):
  path = copy_cache(cache_dir, tmp_path / "c")
  shard = path / "shard_00002.bin"
  os.truncate(shard, os.path.getsize(shard) - 100 * D_IN * 2)
  with pytest.raises(
      CacheError,
      match=r"shard_00002\.bin.*truncated.*expected 1024 rows, found 924.*re-run harvest",
  ):
    cache_lib.Cache(path)


def test_checksum_mismatch_error_names_the_file(cache_dir, tmp_path):
  path = copy_cache(cache_dir, tmp_path / "c")
  shard = path / "shard_00003.bin"
  data = bytearray(shard.read_bytes())
  data[cache_lib.HEADER_BYTES + 1234] ^= 0x40
  shard.write_bytes(bytes(data))
  with pytest.raises(CacheError, match=r"shard_00003\.bin.*checksum.*re-run harvest"):
    cache_lib.Cache(path, verify="open")
  # Lazily: opening works, the first read of the shard fails (in next()).
  with reader(path) as r, pytest.raises(
      CacheError, match=r"shard_00003\.bin.*checksum"
  ):
    for _ in range(40):
      next(r)
  with cache_lib.Cache(path, verify="none") as c:
    c.read_range(0, 10)


def test_d_in_mismatch_error_names_the_file(cache_dir):
  with pytest.raises(CacheError, match=r"manifest\.json.*d_in=8.*d_in=16"):
    cache_lib.Cache(cache_dir, d_in=16)
  with pytest.raises(CacheError, match=r"manifest\.json.*d_in=8"):
    cache_lib.CacheReader(cache_dir, batch_size=BATCH, d_in=16)


def test_missing_directory_and_manifest(tmp_path):
  with pytest.raises(CacheError, match="does not exist"):
    cache_lib.Cache(tmp_path / "nope")
  with pytest.raises(CacheError, match="harvest did not finish"):
    cache_lib.Cache(tmp_path)


def test_set_state_while_prefetching_and_garbage_collection(cache_dir):
  with reader(cache_dir, prefetch=2) as r:
    first = [next(r) for _ in range(6)]
    time.sleep(0.05)  # let the thread fill its queue
    r.set_state({"step": 2})
    np.testing.assert_array_equal(next(r), first[2])
    assert r.get_state()["step"] == 3
  # An unclosed reader is collected and its thread stops.
  r = reader(cache_dir)
  next(r)
  thread = r._thread
  del r
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()


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
from gsae_jax.data import cache as cache_lib
from gsae_jax.train import placement
mesh = jax.make_mesh((4,), ("data",))
sharding = NamedSharding(mesh, PartitionSpec("data"))
results = []
with cache_lib.CacheReader(
    path, batch_size=batch, shuffle_buffer=512, process_index=jax.process_index(),
    process_count=jax.process_count(),
) as reader:
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
def test_two_processes_make_one_global_batch(cache_dir, tmp_path):
  """docs/design.md §6: two JAX processes on loopback, each reading its own slice."""
  pytest.importorskip("jax")
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as out:  # files, not pipes: no pipe-full deadlock
      procs.append(
          subprocess.Popen(
              [sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(port), str(i)]
              + [str(cache_dir), str(BATCH)],
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
    results.append(json.loads(out.split("RESULT ")[-1]))
  # Both processes see the same global arrays: the two local slices together.
  assert results[0] == results[1]
  with reader(cache_dir, process_index=0, process_count=2) as r0:
    with reader(cache_dir, process_index=1, process_count=2) as r1:
      for step, (total, ids) in enumerate(results[0]):
        both = np.concatenate([next(r0), next(r1)])  # [BATCH, D_IN]
        assert ids == sorted(row_ids(both).tolist())
        assert total == pytest.approx(float(both.sum(dtype=np.float64)), rel=1e-5)
        assert len(set(ids)) == BATCH, step
