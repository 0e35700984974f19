"""Tests for gsae_jax.data.store: the zarr activation store."""

import json
import os
import stat

import numpy as np
import pytest
import toy_store as toy

from gsae_jax.data import store as store_lib
from gsae_jax.data.store import StoreError


def test_rows_stats_and_manifest_match_numpy(store_path, acts):
  store = store_lib.Store(str(store_path))
  stored = acts.astype(np.float16).astype(np.float64)
  assert store.num_rows == toy.N_ROWS and store.d_in == toy.D_IN
  np.testing.assert_array_equal(store.read_range(0, toy.N_ROWS), stored)
  np.testing.assert_array_equal(store.read_range(1000, 2100), stored[1000:2100])
  assert store.mean_sq_norm == pytest.approx(
      np.einsum('ij,ij->i', stored, stored).mean()
  )
  np.testing.assert_allclose(store.mean, stored.mean(axis=0), rtol=1e-12, atol=1e-12)
  m = store.manifest
  assert [s['rows'] for s in m['shards']] == list(toy.SHARD_FILL)
  assert [s['start'] for s in m['shards']] == [i * 1024 for i in range(6)]
  # Records: whole chunks but a shard's last; the empty shard has none.
  assert store.records[:, 1].sum() == toy.N_ROWS
  assert set(store.records[:, 0] % toy.RECORD_ROWS) == {0}
  assert store.num_records == 8 + 8 + 0 + 8 + 5 + 8


def test_plain_zarr_python_reads_the_store(store_path, acts):
  zarr = pytest.importorskip('zarr')
  group = zarr.open_group(str(store_path), mode='r')
  manifest = group.attrs['gsae_jax']
  array = group['activations']
  rows = np.concatenate(
      [array[s['start'] : s['start'] + s['rows']] for s in manifest['shards']]
  )
  np.testing.assert_array_equal(rows, acts.astype(np.float16))
  assert array.metadata.codecs[-1].to_dict()['name'] == 'crc32c'


def test_shards_in_any_order_give_identical_bytes(store_path, acts, tmp_path):
  toy.write(tmp_path / 'shuffled', acts, order=[5, 2, 0, 4, 1, 3], piece=1000)
  assert toy.tree_bytes(tmp_path / 'shuffled') == toy.tree_bytes(store_path)


def test_incomplete_store_is_refused_and_resumes(acts, tmp_path):
  path = str(tmp_path / 'partial')
  writer = store_lib.StoreWriter(path, toy.layout(), model='toy', site='s')
  w = writer.shard(3)
  w.append(acts[:1024])
  w.finish()
  assert writer.finalize() is None
  with pytest.raises(StoreError, match='harvest did not finish'):
    store_lib.Store(path)
  again = store_lib.StoreWriter(path, toy.layout(), model='toy', site='s')
  assert again.done_shards() == {3}
  with pytest.raises(StoreError, match=r"other \['site'\]"):
    store_lib.StoreWriter(path, toy.layout(), model='toy', site='other')
  with pytest.raises(StoreError, match='cannot resume'):
    store_lib.StoreWriter(path, toy.layout(record_rows=256), model='toy', site='s')


def test_writer_refuses_a_complete_store(store_path):
  with pytest.raises(StoreError, match='already holds a complete'):
    store_lib.StoreWriter(str(store_path), toy.layout())


def test_bad_rows_fail_naming_the_row(tmp_path):
  writer = store_lib.StoreWriter(str(tmp_path / 's'), toy.layout())
  w = writer.shard(0)
  with pytest.raises(StoreError, match=r'must be \[n, 8\]'):
    w.append(np.zeros((4, 9), np.float32))
  big = np.zeros((300, toy.D_IN), np.float32)
  big[200, 3] = 1e6
  with pytest.raises(StoreError, match="row 200 .* overflows float16.*'bfloat16'"):
    w.append(big)
  nan = np.zeros((5, toy.D_IN), np.float32)
  nan[2, 0] = np.nan
  w2 = writer.shard(1)
  with pytest.raises(StoreError, match='row 2 of shard 1 .* not finite'):
    w2.append(nan)
  bf = store_lib.StoreWriter(str(tmp_path / 'bf'), toy.layout(dtype='bfloat16'))
  wb = bf.shard(0)
  wb.append(big)  # bfloat16 holds 1e6
  wb.finish()


def _corrupt(path):
  with open(path, 'r+b') as f:
    f.seek(40)
    byte = f.read(1)
    f.seek(40)
    f.write(bytes([byte[0] ^ 0xFF]))


def test_missing_or_corrupt_chunks_are_named_never_zero_filled(store_path, tmp_path):
  import shutil

  path = tmp_path / 'broken'
  shutil.copytree(store_path, path)
  os.remove(path / 'activations' / 'c' / '9' / '0')  # shard 1's second chunk
  store = store_lib.Store(str(path))
  np.testing.assert_array_equal(
      store.read_range(0, 1024), store_lib.Store(str(store_path)).read_range(0, 1024)
  )
  with pytest.raises(StoreError, match=r'chunk 9 \(rows 1152\.\.1279.*is missing'):
    store.read_range(1100, 1200)
  _corrupt(path / 'activations' / 'c' / '3' / '0')
  with pytest.raises(StoreError, match=f'chunk 3 .*{path}.*crc32c'):
    store_lib.Store(str(path)).verify()


def test_open_errors_name_what_and_where(store_path, tmp_path):
  with pytest.raises(StoreError, match='holds d_in=8 .* d_in=16 was expected'):
    store_lib.Store(str(store_path), d_in=16)
  with pytest.raises(StoreError, match='does not exist; run harvest'):
    store_lib.Store(str(tmp_path / 'nothing'))
  legacy = tmp_path / 'old'
  legacy.mkdir()
  (legacy / 'shard_00000.bin').write_bytes(b'x')
  (legacy / 'manifest.json').write_text(json.dumps({'format': 'old'}))
  for open_ in (store_lib.Store, lambda p: store_lib.StoreWriter(p, toy.layout())):
    with pytest.raises(StoreError, match=r'old \.bin format .* re-run harvest'):
      open_(str(legacy))
  with pytest.raises(StoreError, match='unsupported scheme'):
    store_lib.Store('hdfs://x/y')


def test_files_are_group_readable(acts, tmp_path):
  old = os.umask(0o027)
  try:
    toy.write(tmp_path / 'g', acts[:2000], fill=(1024, 976))
  finally:
    os.umask(old)
  for name in toy.tree_bytes(tmp_path / 'g'):
    mode = os.stat(tmp_path / 'g' / name).st_mode
    assert mode & stat.S_IRGRP, name


def test_kvstore_specs():
  assert store_lib.kvstore_spec('gs://bkt/a/b') == {
      'driver': 'gcs',
      'bucket': 'bkt',
      'path': 'a/b/',
  }
  spec = store_lib.kvstore_spec('s3://bkt/x')
  assert (spec['driver'], spec['bucket'], spec['path']) == ('s3', 'bkt', 'x/')
  assert store_lib.kvstore_spec('/a/b/')['path'] == '/a/b/'
  assert store_lib.join('s3://b/p/', 'activations') == 's3://b/p/activations'
