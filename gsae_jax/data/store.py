"""The activation store: a zarr v3 array on local disk, GCS or S3, via tensorstore.

A store is a zarr v3 group any zarr reader can open (README shows how):

  <store>/zarr.json          the group; its attributes hold the manifest.
                             Written LAST: its presence means "complete".
  <store>/activations/       zarr v3 array [capacity, d_in], float16 or
                             bfloat16, chunks [record_rows, d_in], each chunk
                             checksummed by zarr's crc32c codec
  <store>/shards/00007.json  shard 7 is complete: its rows and float64 sums

The same code serves a local directory, gs://bucket/path and s3://bucket/path
(tensorstore's file, gcs and s3 key-value stores; for S3-compatible servers the
endpoint and region come from AWS_ENDPOINT_URL / AWS_REGION as for the AWS
tools).

Shards. The harvest's unit of work (and of parallelism and resume) is a shard:
a fixed block of `contexts_per_shard` contexts, whose activations fill the
array region [shard * shard_rows, shard * shard_rows + rows) from its start
(rows < shard_rows: outliers are dropped, the text may end). Shard regions
are chunk-aligned, so shards written by different processes never touch one
chunk, and which contexts a shard holds depends on the config alone: a store
harvested by any number of processes, in any order, killed and resumed any
number of times, is byte-identical to a one-process harvest. A shard's marker
(shards/NNNNN.json) is written after its chunks; the manifest, after every
shard's marker. Rows past a shard's count are never read (their chunks may
not exist). The dataset is the concatenation of the shards' rows in shard
order: "row i" below is such a logical row.

Statistics (E[x], E||x||^2) are float64 sums per record, then per shard, then
over shards in shard order, of the stored (rounded) values: the same bits
whatever the process layout.

Reading never fills in data: a missing chunk or one that fails its checksum
raises StoreError naming the chunk and the store (tensorstore's default would
read a missing chunk as zeros; `fill_missing_data_reads` is off).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

FORMAT = 'gsae_jax.activation_store'
VERSION = 2  # version 1 was the custom .bin cache (gsae_jax <= 0.1)
ARRAY = 'activations'
GROUP_META = 'zarr.json'
SHARDS = 'shards'
ATTRS_KEY = 'gsae_jax'
DEFAULT_RECORD_ROWS = 4096
DEFAULT_SHARD_ROWS = 1 << 18  # 64 records; 288 MiB at d_in 576, float16
_RERUN = 're-run harvest'


class StoreError(ValueError):
  """A store is missing, incomplete, corrupt, or does not fit the request."""


class ReadCancelled(Exception):  # noqa: N818 (a stop, not an error)
  """Reads abandoned because their reader was closed."""


# ---------------------------------------------------------------------------
# Paths -> tensorstore key-value stores.


def kvstore_spec(path: str) -> dict[str, Any]:
  """The tensorstore kvstore spec of a local path, gs:// or s3:// URL.

  The spec's path ends with '/' (a directory-like prefix).
  """
  path = os.fspath(path)
  match = re.fullmatch(r'(gs|s3)://([^/]+)/?(.*)', path)
  if match is None:
    if path.startswith('file://'):
      path = path[len('file://') :]
    if '://' in path:
      raise StoreError(
          f'store path {path!r}: unsupported scheme; use a local path, gs:// or s3://'
      )
    return {'driver': 'file', 'path': os.path.abspath(path).rstrip('/') + '/'}
  scheme, bucket, prefix = match.groups()
  prefix = prefix.rstrip('/') + '/' if prefix else ''
  if scheme == 'gs':
    return {'driver': 'gcs', 'bucket': bucket, 'path': prefix}
  spec = {'driver': 's3', 'bucket': bucket, 'path': prefix}
  endpoint = os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL')
  if endpoint:
    spec['endpoint'] = endpoint
  region = os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION')
  if region or endpoint:
    spec['aws_region'] = region or 'us-east-1'
  return spec


def is_local(path: str) -> bool:
  return kvstore_spec(path)['driver'] == 'file'


def join(path: str, *names: str) -> str:
  """Joins store path components for local paths and URLs alike."""
  return '/'.join([os.fspath(path).rstrip('/'), *names])


def _kvstore(path: str) -> ts.KvStore:
  try:
    return ts.KvStore.open(kvstore_spec(path)).result()
  except ValueError as e:
    raise StoreError(f'cannot open store {path}: {e}') from e


def _read_json(kv: ts.KvStore, key: str, where: str) -> dict[str, Any] | None:
  """The JSON object at `key`, or None if absent."""
  result = kv.read(key).result()
  if result.state != 'value':
    return None
  try:
    return json.loads(bytes(result.value).decode('utf-8'))
  except ValueError as e:
    raise StoreError(f'{join(where, key)} is not valid JSON ({e}); {_RERUN}') from e


def _write_json(kv: ts.KvStore, key: str, value: Mapping[str, Any]) -> None:
  # One PUT (object stores) or temp file + rename (tensorstore's file
  # kvstore): a reader sees the old value or the new one, never a torn file.
  data = json.dumps(dict(value), indent=1, sort_keys=True).encode('utf-8')
  kv.write(key, data).result()


def disk_dtype(name: str) -> np.dtype:
  """The NumPy dtype for an on-disk dtype name ('float16' or 'bfloat16')."""
  if name == 'float16':
    return np.dtype(np.float16)
  if name == 'bfloat16':
    import ml_dtypes  # noqa: PLC0415

    return np.dtype(ml_dtypes.bfloat16)
  raise StoreError(f"unsupported store dtype {name!r}; use 'float16' or 'bfloat16'")


def _legacy_error(path: str) -> StoreError | None:
  """A clear error if `path` holds the old custom-format cache."""
  if not is_local(path):
    return None
  manifest = os.path.join(kvstore_spec(path)['path'], 'manifest.json')
  if os.path.exists(manifest) or any(
      n.startswith('shard_') and n.endswith('.bin')
      for n in (os.listdir(os.path.dirname(manifest)) if os.path.isdir(path) else ())
  ):
    return StoreError(
        f'{path} holds an activation cache in the old .bin format (gsae_jax 0.1); '
        'this version reads zarr stores: delete it and re-run harvest'
    )
  return None


# ---------------------------------------------------------------------------
# The layout, computed from the settings alone.


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where shards live in the array: a pure function of the harvest settings."""

  d_in: int
  dtype: str
  record_rows: int
  shard_rows: int
  num_shards: int

  def __post_init__(self):
    if self.record_rows <= 0 or self.shard_rows <= 0:
      raise StoreError('record_rows and shard_rows must be > 0')
    if self.shard_rows % self.record_rows:
      raise StoreError(
          f'shard_rows ({self.shard_rows}) must be a multiple of record_rows '
          f'({self.record_rows})'
      )

  @property
  def capacity(self) -> int:
    return self.num_shards * self.shard_rows

  def shard_start(self, shard: int) -> int:
    return shard * self.shard_rows

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _array_spec(path: str, layout: Layout | None = None) -> dict[str, Any]:
  spec: dict[str, Any] = {
      'driver': 'zarr3',
      'kvstore': kvstore_spec(join(path, ARRAY)),
      # Never read a missing chunk as zeros, never skip writing a chunk that
      # happens to equal the fill value (an object store would DELETE it).
      'fill_missing_data_reads': False,
      'store_data_equal_to_fill_value': True,
  }
  if layout is not None:
    spec['metadata'] = {
        'shape': [layout.capacity, layout.d_in],
        'data_type': layout.dtype,
        'chunk_grid': {
            'name': 'regular',
            'configuration': {'chunk_shape': [layout.record_rows, layout.d_in]},
        },
        'codecs': [
            {'name': 'bytes', 'configuration': {'endian': 'little'}},
            {'name': 'crc32c'},
        ],
        'fill_value': 0,
        'dimension_names': ['row', 'd_in'],
    }
  return spec


def _chunk_error(path: str, e: Exception, record_rows: int) -> StoreError:
  """StoreError for a failed read, naming the chunk (from tensorstore's
  message, which names its key c/<i>/0) and the store."""
  msg = str(e)
  if msg.startswith('DATA_LOSS'):
    what = 'fails its crc32c checksum (corrupt)'
  elif msg.startswith('NOT_FOUND'):
    what = 'is missing'
  else:
    what = f'cannot be read ({msg})'
  match = re.search(r'c/(\d+)/0\b', msg) or re.search(r'chunk \{(\d+), 0\}', msg)
  if match is None:
    return StoreError(f'a chunk of activation store {path} {what}; {_RERUN}')
  chunk = int(match.group(1))
  rows = (chunk * record_rows, (chunk + 1) * record_rows - 1)
  return StoreError(
      f'chunk {chunk} (rows {rows[0]}..{rows[1]}, key {ARRAY}/c/{chunk}/0) of '
      f'activation store {path} {what}; {_RERUN}'
  )


# ---------------------------------------------------------------------------
# Writing.


class ShardWriter:
  """Appends one shard's rows [n, d_in]; `finish()` writes its marker.

  Rows are converted to the disk dtype and written a whole chunk at a time
  (the last one padded with zeros, never read); each record's float64 sums
  are kept for the shard's statistics.
  """

  def __init__(self, store: StoreWriter, shard: int):
    self.store, self.shard = store, shard
    layout = store.layout
    self._record = np.zeros((layout.record_rows, layout.d_in), store.dtype)
    self._fill = 0
    self.rows = 0
    self._sum = np.zeros(layout.d_in, np.float64)  # [d_in]
    self._sum_sq = 0.0
    self._pending: list[ts.Future] = []
    # A float16/bfloat16 value is inf or nan iff its exponent bits are all
    # ones: one integer test on the converted record.
    self._exponent_mask = np.uint16(0x7C00 if layout.dtype == 'float16' else 0x7F80)

  def append(self, acts: np.ndarray) -> None:
    """Appends rows; raises StoreError for non-finite or overflowing values."""
    layout = self.store.layout
    acts = np.asarray(acts)
    if acts.ndim != 2 or acts.shape[1] != layout.d_in:
      raise StoreError(
          f'activations must be [n, {layout.d_in}] for {self.store.path}, got '
          f'{acts.shape}'
      )
    done = 0
    while done < acts.shape[0]:
      if self.rows + self._fill >= layout.shard_rows:
        raise StoreError(
            f'shard {self.shard} of {self.store.path} is full ({layout.shard_rows} rows)'
        )
      take = min(layout.record_rows - self._fill, acts.shape[0] - done)
      dest = self._record[self._fill : self._fill + take]
      with np.errstate(over='ignore', invalid='ignore'):  # reported below
        dest[...] = acts[done : done + take]  # converts to the disk dtype
      bad = (dest.view(np.uint16) & self._exponent_mask) == self._exponent_mask
      if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        value = np.asarray(acts[done + row], np.float64)
        finite = np.isfinite(value).all()
        reason = (
            f'overflows {layout.dtype} (max |x| = {np.abs(value).max():.4g}); use '
            "harvest.dtype='bfloat16'"
            if finite
            else 'is not finite; check the model'
        )
        raise StoreError(
            f'activation row {self.rows + self._fill + row} of shard {self.shard} '
            f'for {self.store.path} {reason}'
        )
      self._fill += take
      done += take
      if self._fill == layout.record_rows:
        self._flush()

  def _flush(self) -> None:
    if not self._fill:
      return
    layout = self.store.layout
    x = self._record[: self._fill].astype(np.float64)  # [rows, d_in]
    self._sum += x.sum(axis=0)
    self._sum_sq += float(np.einsum('ij,ij->', x, x))
    self._record[self._fill :] = 0
    start = layout.shard_start(self.shard) + self.rows
    write = self.store.array[start : start + layout.record_rows].write(self._record)
    write.copy.result()  # the record buffer is free again once copied
    self._pending.append(write.commit)  # chunk uploads overlap the next record
    if len(self._pending) > 4:
      self._pending.pop(0).result()
    self.rows += self._fill
    self._fill = 0

  def finish(self, **extra: Any) -> dict[str, Any]:
    """Writes the last chunk, waits for all, then the shard's marker."""
    self._flush()
    for future in self._pending:
      future.result()
    self._pending = []
    marker = {
        'shard': self.shard,
        'rows': self.rows,
        'sum': self._sum.tolist(),  # float64 repr round-trips exactly
        'sum_sq': self._sum_sq,
        **extra,
    }
    _write_json(self.store.kv, f'{SHARDS}/{self.shard:05d}.json', marker)
    return marker


class StoreWriter:
  """Creates (or reopens, to resume) a store for writing shards.

  Any number of processes may open the same store with the same layout and
  write disjoint shards; `finalize()` writes the manifest once every shard is
  complete, from whichever process sees that first (its bytes depend only on
  the shards, so two processes writing it at once write the same thing).
  """

  def __init__(
      self,
      path: str,
      layout: Layout,
      *,
      model: str = '',
      site: str = '',
      metadata: Mapping[str, Any] | None = None,
  ):
    self.path = os.fspath(path)
    legacy = _legacy_error(self.path)
    if legacy is not None:
      raise legacy
    self.layout = layout
    self.dtype = disk_dtype(layout.dtype)
    self.model, self.site = model, site
    self.metadata = dict(metadata or {})
    self.kv = _kvstore(self.path)
    if _read_json(self.kv, GROUP_META, self.path) is not None:
      raise StoreError(
          f'{self.path} already holds a complete activation store; write to a new '
          'path or delete this one'
      )
    spec = _array_spec(self.path, layout)
    try:
      self.array = ts.open(spec, open=True, create=True).result()
    except ValueError as e:
      raise StoreError(
          f'cannot resume into {self.path}: its array was created with other '
          f'settings than {layout.to_json()} ({e}); use the same settings or a new '
          'path'
      ) from e
    # Settings of a partial store, checked on resume (before any shard is
    # written, so two different configs never mix in one store).
    settings = {
        'format': FORMAT,
        'version': VERSION,
        'layout': layout.to_json(),
        'model': model,
        'site': site,
        'metadata': self.metadata,
    }
    stored = _read_json(self.kv, f'{SHARDS}/settings.json', self.path)
    if stored is None:
      _write_json(self.kv, f'{SHARDS}/settings.json', settings)
    elif stored != json.loads(json.dumps(settings)):
      diff = sorted(k for k in settings if stored.get(k) != settings[k])
      raise StoreError(
          f'cannot resume into {self.path}: it was started with other {diff} '
          f'({ {k: stored.get(k) for k in diff} }); use the same settings or a new '
          'path'
      )

  def done_shards(self) -> set[int]:
    """Shards whose markers exist."""
    keys = self.kv.list(ts.KvStore.KeyRange(f'{SHARDS}/', f'{SHARDS}0')).result()
    done = set()
    for key in keys:
      name = bytes(key).decode().rsplit('/', 1)[-1]
      if re.fullmatch(r'\d{5}\.json', name):
        done.add(int(name[:5]))
    return done

  def shard(self, index: int) -> ShardWriter:
    if not 0 <= index < self.layout.num_shards:
      raise StoreError(f'shard {index} not in [0, {self.layout.num_shards})')
    return ShardWriter(self, index)

  def finalize(self) -> dict[str, Any] | None:
    """Writes the manifest if every shard is complete; returns it (or None)."""
    missing = set(range(self.layout.num_shards)) - self.done_shards()
    if missing:
      return None
    markers = [
        _read_json(self.kv, f'{SHARDS}/{s:05d}.json', self.path)
        for s in range(self.layout.num_shards)
    ]
    d_in = self.layout.d_in
    total_sum, total_sq, count = np.zeros(d_in, np.float64), 0.0, 0
    for m in markers:  # shard order: the same bits for any process layout
      total_sum += np.asarray(m['sum'], np.float64)
      total_sq += float(m['sum_sq'])
      count += int(m['rows'])
    manifest = {
        'format': FORMAT,
        'version': VERSION,
        'model': self.model,
        'site': self.site,
        'd_in': d_in,
        'dtype': self.layout.dtype,
        'count': count,
        'layout': self.layout.to_json(),
        # Each shard's array rows and, for a harvest, its contexts [first, end)
        # in the text stream (token provenance).
        'shards': [
            {
                'start': self.layout.shard_start(i),
                'rows': int(m['rows']),
                **(
                    {
                        'contexts': [
                            m['first_context'],
                            m['first_context'] + m['contexts'],
                        ]
                    }
                    if 'first_context' in m
                    else {}
                ),
            }
            for i, m in enumerate(markers)
        ],
        'stats': {
            # E||x||^2 (the normalisation statistic, docs/design.md §1) and
            # E[x] over every stored row.
            'mean_sq_norm': total_sq / count if count else 0.0,
            'mean': (total_sum / max(count, 1)).tolist(),
        },
        'metadata': self.metadata,
    }
    group = {
        'zarr_format': 3,
        'node_type': 'group',
        'attributes': {ATTRS_KEY: manifest},
    }
    _write_json(self.kv, GROUP_META, group)
    return manifest


# ---------------------------------------------------------------------------
# Reading.


class Store:
  """A complete store, opened for random access.

  Attributes:
    path: the store's path or URL.
    manifest: its manifest (the group's attributes).
    d_in, num_rows, dtype, record_rows: from the manifest.
    records: [n_records, 2] int64 (physical start row, rows) of every record
      holding data, in logical order.
  """

  def __init__(self, path: str, *, d_in: int | None = None):
    self.path = os.fspath(path)
    legacy = _legacy_error(self.path)
    if legacy is not None:
      raise legacy
    if is_local(self.path) and not os.path.isdir(self.path):
      raise StoreError(f'activation store {self.path} does not exist; run harvest')
    kv = _kvstore(self.path)
    group = _read_json(kv, GROUP_META, self.path)
    if group is None:
      n = len(kv.list(ts.KvStore.KeyRange(f'{SHARDS}/', f'{SHARDS}0')).result())
      if n == 0:
        raise StoreError(f'activation store {self.path} does not exist; run harvest')
      raise StoreError(
          f'{self.path} is not a complete activation store (no {GROUP_META}; '
          f'{max(n - 1, 0)} shard markers): harvest did not finish; re-run harvest '
          'to resume'
      )
    m = group.get('attributes', {}).get(ATTRS_KEY)
    if not m or m.get('format') != FORMAT or m.get('version') != VERSION:
      raise StoreError(
          f'{join(self.path, GROUP_META)} is not a {FORMAT} v{VERSION} store'
      )
    self.manifest = m
    self.d_in = int(m['d_in'])
    if d_in is not None and int(d_in) != self.d_in:
      raise StoreError(
          f'activation store {self.path} holds d_in={self.d_in} activations (model '
          f"{m.get('model')!r}, site {m.get('site')!r}) but d_in={d_in} was "
          'expected; point to the store of the right model/site or re-run harvest '
          'for it'
      )
    self.layout = Layout(**m['layout'])
    self.dtype = disk_dtype(m['dtype'])
    self.record_rows = self.layout.record_rows
    self.num_rows = int(m['count'])
    try:
      self.array = ts.open(_array_spec(self.path), open=True).result()
    except ValueError as e:
      raise StoreError(f'cannot open the array of {self.path}: {e}; {_RERUN}') from e
    if tuple(self.array.shape) != (self.layout.capacity, self.d_in):
      raise StoreError(
          f'array of {self.path} has shape {tuple(self.array.shape)}, manifest says '
          f'{(self.layout.capacity, self.d_in)}; {_RERUN}'
      )
    records = []
    for shard in m['shards']:
      start, rows = int(shard['start']), int(shard['rows'])
      for r in range(0, rows, self.record_rows):
        records.append((start + r, min(self.record_rows, rows - r)))
    self.records = np.asarray(records, np.int64).reshape(-1, 2)
    # Logical row -> physical row: logical starts of the records.
    self._logical = np.concatenate([[0], np.cumsum(self.records[:, 1])]).astype(
        np.int64
    )
    if self._logical[-1] != self.num_rows:
      raise StoreError(
          f'{self.path}: shards hold {self._logical[-1]} rows, manifest count is '
          f'{self.num_rows}; {_RERUN}'
      )

  @property
  def mean_sq_norm(self) -> float:
    """E||x||^2 over the store."""
    return float(self.manifest['stats']['mean_sq_norm'])

  @property
  def mean(self) -> np.ndarray:
    """E[x] over the store, float64 [d_in]."""
    return np.asarray(self.manifest['stats']['mean'], np.float64)

  @property
  def num_records(self) -> int:
    return len(self.records)

  def __len__(self) -> int:
    return self.num_rows

  def record_rows_of(self, index: int) -> np.ndarray:
    """Logical row ids of record `index`, int64."""
    return np.arange(self._logical[index], self._logical[index + 1])

  def _read_spans(
      self, spans: Sequence[tuple[int, int]], cancel: threading.Event | None = None
  ) -> np.ndarray:
    """Rows [a, b) of the array for every span, concatenated in order.

    One tensorstore read of the spans' concatenation (ts.concat): the chunks
    are fetched and decoded concurrently straight into one output array (one
    copy; reading the spans apart and concatenating in NumPy measured
    1.2-1.3x slower, and separate unbatched reads slower still). Setting
    `cancel` abandons the read (ReadCancelled) within ~50 ms, so a closed
    loader's threads never wait on a slow or vanished server.
    """
    if not spans:
      return np.zeros((0, self.d_in), self.dtype)
    views = [self.array[a:b] for a, b in spans]
    future = (views[0] if len(views) == 1 else ts.concat(views, axis=0)).read()
    try:
      while cancel is not None:
        if cancel.is_set():
          future.cancel()
          raise ReadCancelled(f'read of {self.path} cancelled')
        try:
          future.result(timeout=0.05)
          break
        except TimeoutError:
          continue
      return future.result()
    except ValueError as e:
      raise _chunk_error(self.path, e, self.record_rows) from e

  def read_records(
      self, indices: Sequence[int], cancel: threading.Event | None = None
  ) -> np.ndarray:
    """Records by index, concatenated: [sum of their rows, d_in] disk dtype."""
    spans = [
        (int(self.records[i, 0]), int(self.records[i, 0] + self.records[i, 1]))
        for i in indices
    ]
    return self._read_spans(spans, cancel)

  def read_range(self, start: int, stop: int) -> np.ndarray:
    """Logical rows [start, stop), float32 [stop - start, d_in]."""
    if not 0 <= start <= stop <= self.num_rows:
      raise IndexError(f'range [{start}, {stop}) not in [0, {self.num_rows}]')
    first = int(np.searchsorted(self._logical, start, side='right')) - 1
    last = int(np.searchsorted(self._logical, stop, side='left'))
    spans = []
    for r in range(max(first, 0), last):
      a = max(start, int(self._logical[r])) - int(self._logical[r])
      b = min(stop, int(self._logical[r + 1])) - int(self._logical[r])
      if a < b:
        spans.append((int(self.records[r, 0]) + a, int(self.records[r, 0]) + b))
    return self._read_spans(spans).astype(np.float32)

  def verify(self, threads: int = 8) -> None:
    """Reads every record (checking every chunk's crc32c); raises StoreError."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      step = 64
      list(
          pool.map(
              lambda a: self.read_records(range(a, min(a + step, self.num_records))),
              range(0, self.num_records, step),
          )
      )


def exists(path: str) -> bool:
  """Whether `path` holds a complete store."""
  try:
    return _read_json(_kvstore(path), GROUP_META, path) is not None
  except StoreError:
    return False
