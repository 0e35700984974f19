"""The sharded activation cache: a crash-safe writer and a shuffled reader.

Layout of a cache directory:

  shard_00000.bin ... shard_NNNNN.bin   activations, one file per shard
  manifest.json                        written last; its presence = complete

A shard file is a HEADER_BYTES (4096) header - a magic line then JSON
(d_in, dtype, rows, crc32, model, site, ...) padded with spaces - then the rows
as a C-order [rows, d_in] float16 or bfloat16 array, then a trailer of d_in + 1
little-endian float64: the shard's sum of rows and sum of squared norms (so a
resume need not re-read the data). crc32 covers the rows. Rows are grouped in
records of `record_rows` (default 4096) consecutive rows: the unit the reader
shuffles and hands out to processes. Every shard but the last holds
`shard_rows` rows.

Manifest (JSON): format, version, model, site, d_in, dtype, count (rows),
record_rows, shard_rows, header_bytes, trailer_bytes, checksum ('crc32'),
shards ([{file, rows, crc32}]), stats ({mean_sq_norm: E||x||^2, mean: E[x]},
over the stored, rounded values, float64 sums), metadata (free-form).

Writer (`CacheWriter`): rows are appended in any chunking; each shard is
written to `.shard_NNNNN.bin.tmp`, fsynced and renamed, and manifest.json is
written last through a temp file and os.replace. A writer opened on a directory
with shards but no manifest resumes after the last complete shard:
`writer.resumed_rows` says how many rows are already stored so the producer can
skip them (or pass `start_row=` to `append` and let the writer drop the
overlap). Statistics are summed per record, then per shard, in float64 and in
a fixed order, so a resumed cache is byte-identical to an uninterrupted one.
Resuming reads only headers and trailers; the rows' checksums are checked when
the cache is read.

Reader (`CacheReader`): an endless stream of float32 batches [batch, d_in],
see its docstring. A batch is a pure function of (seed, step, process slice),
so `get_state()`/`set_state()` carry little more than the step, and resuming
reproduces the uninterrupted sequence exactly. `to_global_array` turns the
per-process batches into one global jax.Array.

`Cache` opens a complete cache for random access (`read`, `read_range`) and
checks it: a missing manifest, a missing or truncated shard, a header or d_in
that does not match, and (on open or when a shard is first read) a crc32
mismatch each raise `CacheError` (a ValueError) naming the file.
"""

import json
import mmap
import os
import queue
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from gsae_jax import files

FORMAT = "gsae_jax.activation_cache"
VERSION = 1
MANIFEST = "manifest.json"
HEADER_BYTES = 4096
MAGIC = b"GSAE activation cache shard\n"
DEFAULT_RECORD_ROWS = 4096
DEFAULT_SHARD_ROWS = 1 << 18  # 64 records; 288 MiB at d_in 576, float16
DEFAULT_SHUFFLE_BUFFER = 1 << 20  # rows; the paper used ~1e6 [P App. D]
_RERUN = "re-run harvest"


class CacheError(ValueError):
  """A cache directory is missing, incomplete, corrupt or does not fit."""


def shard_name(index: int) -> str:
  """File name of shard `index`."""
  return f"shard_{index:05d}.bin"


def trailer_bytes(d_in: int) -> int:
  """Bytes of a shard's statistics trailer: d_in + 1 float64."""
  return 8 * (d_in + 1)


def disk_dtype(name: str) -> np.dtype:
  """The NumPy dtype for an on-disk dtype name ('float16' or 'bfloat16')."""
  if name == "float16":
    return np.dtype(np.float16)
  if name == "bfloat16":
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
  raise CacheError(f"unsupported cache dtype {name!r}; use 'float16' or 'bfloat16'")


def _encode_header(fields: Mapping[str, Any]) -> bytes:
  body = MAGIC + json.dumps(dict(fields), sort_keys=True).encode("utf-8")
  if len(body) > HEADER_BYTES - 1:
    raise CacheError(
        f"shard header too long ({len(body)} bytes > {HEADER_BYTES - 1}); use "
        "shorter model/site names"
    )
  return body + b" " * (HEADER_BYTES - 1 - len(body)) + b"\n"


def _read_header(path: str) -> dict[str, Any]:
  with open(path, "rb") as f:
    raw = f.read(HEADER_BYTES)
  if len(raw) < HEADER_BYTES or not raw.startswith(MAGIC):
    raise CacheError(
        f"{path} is not an activation cache shard (bad or short header); "
        f"delete it and {_RERUN}"
    )
  try:
    return json.loads(raw[len(MAGIC) :].decode("utf-8"))
  except ValueError as e:
    raise CacheError(f"{path} has a corrupt header ({e}); {_RERUN}") from e


def _crc32(array: np.ndarray, value: int = 0) -> int:
  """crc32 of an array's bytes (C order); works for bfloat16 too."""
  return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8), value)


def _record_stats(record: np.ndarray) -> tuple[np.ndarray, float]:
  """Sum of rows and sum of squared norms of one record, in float64."""
  x = record.astype(np.float64)  # [rows, d_in]
  return x.sum(axis=0), float(np.einsum("ij,ij->", x, x))


def _shard_files(directory: str) -> list[str]:
  return sorted(
      n for n in os.listdir(directory) if n.startswith("shard_") and n.endswith(".bin")
  )


# ----------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------


class CacheWriter:
  """Appends activations [n, d_in] to a sharded cache directory.

  Use as a context manager: a clean exit writes the manifest (`finish`), an
  exception leaves the complete shards for a later resume and deletes the
  partial one.

    with CacheWriter(path, d_in=576, model="smollm2", site=site) as writer:
      skip = writer.resumed_rows          # rows already on disk
      for acts in produce(skip_rows=skip):
        writer.append(acts)               # [n, d_in]
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      d_in: int,
      dtype: str = "float16",
      model: str = "",
      site: str = "",
      shard_rows: int = DEFAULT_SHARD_ROWS,
      record_rows: int = DEFAULT_RECORD_ROWS,
      metadata: Mapping[str, Any] | None = None,
  ):
    """Opens (or resumes) a cache directory for writing.

    Args:
      directory: the cache directory; created if missing.
      d_in: activation width.
      dtype: on-disk dtype, 'float16' or 'bfloat16'.
      model: model name, stored in the manifest.
      site: hook name (e.g. 'blocks.15.hook_resid_post'), stored likewise.
      shard_rows: rows per shard file, a multiple of record_rows.
      record_rows: rows per record (the reader's shuffle unit).
      metadata: extra JSON-able metadata for the manifest.

    Raises:
      CacheError: the directory already holds a complete cache, or holds
        shards written with other settings.
    """
    if shard_rows <= 0 or record_rows <= 0 or shard_rows % record_rows:
      raise CacheError(
          f"shard_rows ({shard_rows}) must be a positive multiple of record_rows "
          f"({record_rows})"
      )
    self.directory = os.fspath(directory)
    self.d_in = int(d_in)
    self.dtype_name = dtype
    self.dtype = disk_dtype(dtype)
    self.model, self.site = model, site
    self.shard_rows, self.record_rows = int(shard_rows), int(record_rows)
    self.metadata = dict(metadata or {})
    os.makedirs(self.directory, exist_ok=True)
    manifest = os.path.join(self.directory, MANIFEST)
    if os.path.exists(manifest):
      raise CacheError(
          f"{self.directory} already holds a complete cache ({manifest}); write "
          "to a new directory or delete this one"
      )
    for name in os.listdir(self.directory):  # partial shards of a crashed run
      if name.endswith(".tmp"):
        os.remove(os.path.join(self.directory, name))

    self._shards: list[dict[str, Any]] = []  # manifest entries
    self._shard_stats: list[tuple[np.ndarray, float]] = []  # (sum [d_in], sum_sq)
    self._stored_rows = 0  # rows in complete shards
    self._resume_existing()
    self.resumed_rows = self._stored_rows

    self._record = np.empty((self.record_rows, self.d_in), self.dtype)
    # A float16/bfloat16 value is inf or nan iff its exponent bits are all
    # ones: one integer test on the converted record, much cheaper than
    # np.isfinite on float16.
    self._exponent_mask = np.uint16(0x7C00 if dtype == "float16" else 0x7F80)
    self._record_fill = 0
    self._file = None
    self._shard_fill = 0
    self._crc = 0
    self._sum = np.zeros(self.d_in, np.float64)  # [d_in], current shard
    self._sum_sq = 0.0
    self._closed = False

  # -- resume ------------------------------------------------------------------

  def _resume_existing(self) -> None:
    names = _shard_files(self.directory)
    row_bytes = self.d_in * self.dtype.itemsize
    want = {
        "d_in": self.d_in,
        "dtype": self.dtype_name,
        "record_rows": self.record_rows,
        "model": self.model,
        "site": self.site,
    }
    for index, name in enumerate(names):
      if name != shard_name(index):
        raise CacheError(
            f"{self.directory} has shard files {names} with a gap before {name}; "
            "delete the directory and re-run harvest from the start"
        )
      path = os.path.join(self.directory, name)
      header = _read_header(path)
      got = {k: header.get(k) for k in want}
      if got != want:
        raise CacheError(
            f"cannot resume into {self.directory}: {path} was written with {got}, "
            f"this writer has {want}; resume with the same settings or use a new "
            "directory"
        )
      rows = int(header["rows"])
      data_bytes = rows * row_bytes
      size = os.path.getsize(path)
      if size != HEADER_BYTES + data_bytes + trailer_bytes(self.d_in):
        raise CacheError(
            f"cannot resume into {self.directory}: {path} should hold {rows} rows "
            f"but its size is {size} bytes; delete it and {_RERUN}"
        )
      trailer = np.fromfile(
          path, dtype="<f8", count=self.d_in + 1, offset=HEADER_BYTES + data_bytes
      )
      self._shard_stats.append((trailer[:-1].astype(np.float64), float(trailer[-1])))
      self._shards.append({"file": name, "rows": rows, "crc32": header["crc32"]})
      self._stored_rows += rows

  # -- writing -----------------------------------------------------------------

  @property
  def rows_written(self) -> int:
    """Rows accepted so far (stored + buffered), including resumed rows."""
    return self._stored_rows + self._shard_fill + self._record_fill

  def append(self, acts: Any, *, start_row: int | None = None) -> None:
    """Appends activations.

    Args:
      acts: [n, d_in] array (any float dtype; converted to the disk dtype).
      start_row: the stream index of acts[0], if known. Rows before
        `rows_written` are dropped (idempotent replay after a resume); a gap
        is an error.

    Raises:
      CacheError: wrong shape, a gap, or values that are not finite or
        overflow the disk dtype (rows before the offending block of up to
        record_rows rows were accepted: see `rows_written`).
    """
    if self._closed:
      raise CacheError(f"writer for {self.directory} is closed")
    acts = np.asarray(acts)
    if acts.ndim != 2 or acts.shape[1] != self.d_in:
      raise CacheError(
          f"activations must be [n, {self.d_in}] for {self.directory}, got "
          f"{acts.shape}"
      )
    if start_row is not None:
      if start_row > self.rows_written:
        raise CacheError(
            f"append(start_row={start_row}) would leave a gap: {self.directory} "
            f"has {self.rows_written} rows"
        )
      acts = acts[self.rows_written - start_row :]
    done = 0
    while done < acts.shape[0]:
      take = min(self.record_rows - self._record_fill, acts.shape[0] - done)
      dest = self._record[self._record_fill : self._record_fill + take]
      with np.errstate(over="ignore", invalid="ignore"):  # reported below
        dest[...] = acts[done : done + take]  # converts to the disk dtype
      exponent = dest.view(np.uint16) & self._exponent_mask
      if (exponent == self._exponent_mask).any():
        bad = int(np.flatnonzero((exponent == self._exponent_mask).any(axis=1))[0])
        value = np.asarray(acts[done + bad], np.float64)
        reason = (
            "is not finite"
            if not np.isfinite(value).all()
            else f"overflows {self.dtype_name} (max |x| = {np.abs(value).max():.4g})"
        )
        raise CacheError(
            f"activation row {self.rows_written + bad} for {self.directory} "
            f"{reason}; "
            + (
                "use dtype='bfloat16'"
                if self.dtype_name == "float16" and reason != "is not finite"
                else "check the producer"
            )
        )
      self._record_fill += take
      done += take
      if self._record_fill == self.record_rows:
        self._flush_record()

  def _tmp_path(self) -> str:
    return os.path.join(self.directory, "." + shard_name(len(self._shards)) + ".tmp")

  def _flush_record(self) -> None:
    record = self._record[: self._record_fill]
    if self._file is None:
      self._file = open(self._tmp_path(), "wb")
      self._file.write(b"\0" * HEADER_BYTES)
      self._crc, self._shard_fill = 0, 0
      self._sum, self._sum_sq = np.zeros(self.d_in, np.float64), 0.0
    row_sum, sum_sq = _record_stats(record)
    self._sum += row_sum
    self._sum_sq += sum_sq
    self._file.write(record.reshape(-1).view(np.uint8))
    self._crc = _crc32(record, self._crc)
    self._shard_fill += self._record_fill
    self._record_fill = 0
    if self._shard_fill >= self.shard_rows:
      self._close_shard()

  def _close_shard(self) -> None:
    index = len(self._shards)
    crc = f"{self._crc:08x}"
    header = {
        "format": FORMAT,
        "version": VERSION,
        "shard_index": index,
        "d_in": self.d_in,
        "dtype": self.dtype_name,
        "rows": self._shard_fill,
        "record_rows": self.record_rows,
        "model": self.model,
        "site": self.site,
        "crc32": crc,
        "trailer_bytes": trailer_bytes(self.d_in),
    }
    f = self._file
    f.write(np.append(self._sum, self._sum_sq).astype("<f8").tobytes())
    f.seek(0)
    f.write(_encode_header(header))
    f.flush()
    os.fsync(f.fileno())
    f.close()
    self._file = None
    os.replace(self._tmp_path(), os.path.join(self.directory, shard_name(index)))
    files.fsync_dir(self.directory)
    self._shards.append(
        {"file": shard_name(index), "rows": self._shard_fill, "crc32": crc}
    )
    self._shard_stats.append((self._sum, self._sum_sq))
    self._stored_rows += self._shard_fill
    self._shard_fill = 0

  def finish(self, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes the last shard and the manifest; returns the manifest.

    Args:
      metadata: extra JSON-able metadata, merged over the constructor's.
    """
    if self._closed:
      raise CacheError(f"writer for {self.directory} is closed")
    if self._record_fill:
      self._flush_record()
    if self._file is not None:
      self._close_shard()
    count = self._stored_rows
    total_sum, total_sum_sq = np.zeros(self.d_in, np.float64), 0.0
    for row_sum, sum_sq in self._shard_stats:  # fixed order: reproducible
      total_sum += row_sum
      total_sum_sq += sum_sq
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": self.model,
        "site": self.site,
        "d_in": self.d_in,
        "dtype": self.dtype_name,
        "count": count,
        "record_rows": self.record_rows,
        "shard_rows": self.shard_rows,
        "header_bytes": HEADER_BYTES,
        "trailer_bytes": trailer_bytes(self.d_in),
        "checksum": "crc32",
        "shards": self._shards,
        "stats": {
            # E||x||^2 (the normalisation statistic, docs/design.md §1) and E[x] over
            # every stored row, float64 sums of the stored (rounded) values.
            "mean_sq_norm": total_sum_sq / count if count else 0.0,
            "mean": (total_sum / max(count, 1)).tolist(),
        },
        "metadata": {**self.metadata, **dict(metadata or {})},
    }
    files.atomic_write_json(os.path.join(self.directory, MANIFEST), manifest)
    self._closed = True
    return manifest

  def abort(self) -> None:
    """Stops without a manifest: complete shards stay for a resume."""
    if self._file is not None:
      self._file.close()
      self._file = None
      os.remove(self._tmp_path())
    self._closed = True

  def __enter__(self) -> "CacheWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._closed:
      return
    if exc_type is None:
      self.finish()
    else:
      self.abort()


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


class Cache:
  """A complete cache directory: validated, memory-mapped, random access.

  Attributes:
    directory: the cache directory.
    manifest: the parsed manifest.json.
    num_rows, d_in, dtype, record_rows: from the manifest.
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      d_in: int | None = None,
      verify: str = "lazy",
  ):
    """Opens and validates a cache.

    Args:
      directory: the cache directory.
      d_in: the expected activation width (None: accept the manifest's).
      verify: checksum policy: 'open' (every shard now), 'lazy' (each shard
        when first read), or 'none'. Sizes and headers are always checked.

    Raises:
      CacheError: missing/incomplete cache, truncated or corrupt shard, or
        d_in mismatch; the message names the file and what to do.
    """
    if verify not in ("open", "lazy", "none"):
      raise ValueError(f"verify must be 'open', 'lazy' or 'none', got {verify!r}")
    self.directory = os.fspath(directory)
    path = os.path.join(self.directory, MANIFEST)
    if not os.path.isdir(self.directory):
      raise CacheError(f"activation cache {self.directory} does not exist; run harvest")
    if not os.path.exists(path):
      n = len(_shard_files(self.directory))
      raise CacheError(
          f"{self.directory} has no {MANIFEST} ({n} shard files): harvest did not "
          "finish; re-run harvest to resume"
      )
    with open(path, encoding="utf-8") as f:
      try:
        self.manifest = json.load(f)
      except ValueError as e:
        raise CacheError(f"{path} is not valid JSON ({e}); {_RERUN}") from e
    m = self.manifest
    if m.get("format") != FORMAT or m.get("version") != VERSION:
      raise CacheError(
          f"{path} is not a {FORMAT} v{VERSION} manifest (format "
          f"{m.get('format')!r} v{m.get('version')!r})"
      )
    self.d_in = int(m["d_in"])
    if d_in is not None and int(d_in) != self.d_in:
      raise CacheError(
          f"activation cache {path} holds d_in={self.d_in} activations "
          f"(model {m.get('model')!r}, site {m.get('site')!r}) but d_in={d_in} "
          "was expected; point to the cache of the right model/site or re-run "
          "harvest for it"
      )
    self.dtype = disk_dtype(m["dtype"])
    self.num_rows = int(m["count"])
    self.record_rows = int(m["record_rows"])
    rows = [int(s["rows"]) for s in m["shards"]]
    if sum(rows) != self.num_rows:
      raise CacheError(
          f"{path} is inconsistent: shard rows sum to {sum(rows)}, count is "
          f"{self.num_rows}; {_RERUN}"
      )
    self.shard_starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    self._paths = [os.path.join(self.directory, s["file"]) for s in m["shards"]]
    self._crcs = [s["crc32"] for s in m["shards"]]
    self._rows = rows
    row_bytes = self.d_in * self.dtype.itemsize
    extra = HEADER_BYTES + trailer_bytes(self.d_in)
    for index, (shard, n) in enumerate(zip(self._paths, rows, strict=True)):
      where = f"cache shard {index} of {self.directory} ({shard})"
      if not os.path.exists(shard):
        raise CacheError(f"{where} is missing; {_RERUN}")
      size = os.path.getsize(shard)
      found = (size - extra) / row_bytes
      if size != extra + n * row_bytes:
        kind = "truncated" if size < extra + n * row_bytes else "too long"
        raise CacheError(
            f"{where} is {kind} (expected {n} rows, found {max(found, 0):g}); "
            f"{_RERUN}"
        )
      header = _read_header(shard)
      if (header.get("rows"), header.get("d_in"), header.get("dtype")) != (
          n,
          self.d_in,
          m["dtype"],
      ):
        raise CacheError(
            f"{where} header ({header.get('rows')} rows, d_in {header.get('d_in')}, "
            f"{header.get('dtype')}) does not match {path}; {_RERUN}"
        )
    self._maps: list[mmap.mmap | None] = [None] * len(rows)
    self._arrays: list[np.ndarray | None] = [None] * len(rows)
    self._verified = [verify == "none"] * len(rows)
    self._lock = threading.Lock()
    if verify == "open":
      self.verify()

  # -- properties ----------------------------------------------------------------

  @property
  def num_shards(self) -> int:
    return len(self._rows)

  @property
  def mean_sq_norm(self) -> float:
    """E||x||^2 over the cache."""
    return float(self.manifest["stats"]["mean_sq_norm"])

  @property
  def mean(self) -> np.ndarray:
    """E[x] over the cache, float64 [d_in]."""
    return np.asarray(self.manifest["stats"]["mean"], dtype=np.float64)

  def __len__(self) -> int:
    return self.num_rows

  # -- access ------------------------------------------------------------------

  def _check_shard(self, index: int, data: np.ndarray) -> None:
    crc = f"{_crc32(data):08x}"
    if crc != self._crcs[index]:
      raise CacheError(
          f"cache shard {index} of {self.directory} ({self._paths[index]}) fails "
          f"its checksum (crc32 {crc}, manifest says {self._crcs[index]}); the "
          f"file is corrupt: {_RERUN}"
      )

  def shard_array(self, index: int) -> np.ndarray:
    """Shard `index` as a read-only memory-mapped [rows, d_in] array."""
    array = self._arrays[index]
    if array is not None:
      return array
    with self._lock:
      if self._arrays[index] is None:
        n = self._rows[index]
        with open(self._paths[index], "rb") as f:
          mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        data = np.frombuffer(mm, self.dtype, n * self.d_in, HEADER_BYTES)
        data = data.reshape(n, self.d_in)
        if not self._verified[index]:
          self._check_shard(index, data)
          self._verified[index] = True
        self._maps[index] = mm
        self._arrays[index] = data
      return self._arrays[index]

  def verify(self) -> None:
    """Checks every shard's checksum now (raises CacheError on a mismatch)."""
    for index in range(self.num_shards):
      self.shard_array(index)

  def advise(self, rows: np.ndarray, lengths: np.ndarray) -> None:
    """Asks the kernel to read ahead row ranges [rows[i], rows[i]+lengths[i]).

    Best effort (Linux madvise WILLNEED); ranges must not cross shards.
    """
    if not hasattr(mmap, "MADV_WILLNEED"):
      return
    row_bytes = self.d_in * self.dtype.itemsize
    shards = np.searchsorted(self.shard_starts, rows, side="right") - 1
    for shard, row, length in zip(
        shards.tolist(), rows.tolist(), lengths.tolist(), strict=True
    ):
      self.shard_array(shard)
      mm = self._maps[shard]
      start = HEADER_BYTES + (row - int(self.shard_starts[shard])) * row_bytes
      aligned = start - start % mmap.PAGESIZE
      try:
        mm.madvise(mmap.MADV_WILLNEED, aligned, start - aligned + length * row_bytes)
      except (OSError, ValueError):
        return

  def read(self, rows: np.ndarray) -> np.ndarray:
    """Gathers rows by global index, in the given order.

    Args:
      rows: int [n] global row indices in [0, num_rows).

    Returns:
      float32 [n, d_in].
    """
    rows = np.asarray(rows, dtype=np.int64)  # [n]
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
      raise IndexError(f"row index out of range [0, {self.num_rows})")
    shards = np.searchsorted(self.shard_starts, rows, side="right") - 1  # [n]
    if rows.size == 0:
      return np.zeros((0, self.d_in), np.float32)
    first, last = int(shards.min()), int(shards.max())
    if first == last:
      local = rows - self.shard_starts[first]
      return np.take(self.shard_array(first), local, axis=0).astype(np.float32)
    out = np.empty((rows.size, self.d_in), np.float32)  # [n, d_in]
    order = np.argsort(shards, kind="stable")
    sorted_shards = shards[order]
    cuts = np.flatnonzero(np.diff(sorted_shards)) + 1
    for group in np.split(order, cuts):
      shard = int(shards[group[0]])
      local = rows[group] - self.shard_starts[shard]
      out[group] = np.take(self.shard_array(shard), local, axis=0)
    return out

  def read_range(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) in stored order, float32 [stop - start, d_in]."""
    if not 0 <= start <= stop <= self.num_rows:
      raise IndexError(f"range [{start}, {stop}) not in [0, {self.num_rows}]")
    out = np.empty((stop - start, self.d_in), np.float32)  # [n, d_in]
    first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
    for shard in range(max(first, 0), self.num_shards):
      s0 = int(self.shard_starts[shard])
      a, b = max(start, s0), min(stop, int(self.shard_starts[shard + 1]))
      if a >= b:
        break
      out[a - start : b - start] = self.shard_array(shard)[a - s0 : b - s0]
    return out

  def close(self) -> None:
    """Unmaps the shards (arrays returned by read() are copies and stay valid)."""
    with self._lock:
      self._arrays = [None] * self.num_shards
      for index, mm in enumerate(self._maps):
        if mm is not None:
          try:
            mm.close()
          except BufferError:  # a shard_array() view is still alive
            pass
          self._maps[index] = None

  def __enter__(self) -> "Cache":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _EpochPlan:
  """Record order and window boundaries of one epoch of one process."""

  def __init__(self, order: np.ndarray, window_starts: np.ndarray):
    self.order = order  # [n_local_records] record ids in epoch order
    self.window_starts = window_starts  # [n_windows + 1] epoch row offsets


class _Window:
  """One shuffle window: its records, its row permutation, maybe its rows."""

  def __init__(self, records: np.ndarray, lengths: np.ndarray, perm: np.ndarray):
    self.records = records  # [k] record ids, in window order
    self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # [k+1]
    self.perm = perm  # [n] stream position in window -> row of the window buffer
    self.data: np.ndarray | None = None  # [n, d_in] disk dtype, once filled

  @property
  def size(self) -> int:
    return int(self.offsets[-1])


class CacheReader:
  """Endless, shuffled, exactly resumable float32 batches from a cache.

  Process slice: of P processes, process p owns the records r with
  r % P == p (every P-th record, so each process sees all of the cache's
  shards and text) and reads nothing else. Its local stream is a sequence of
  epochs over its own rows; batch `step` is local stream rows
  [step * b, (step + 1) * b), b = batch_size / P, and the global batch of that
  step is the union of the P local batches. With P = 1 the process owns all
  records.

  Shuffling: in epoch e the process's records are put in an order seeded by
  (seed, p, P, e) and taken in windows of `records_per_window` records (about
  shuffle_buffer rows, drawn from all shards). A window's records are copied,
  whole and in order, into an in-memory window buffer (sequential reads); its
  rows are then served in a second seeded permutation by one gather from that
  buffer. Batches wrap over epoch ends: no row is dropped, and each epoch (the
  local stream's rows [e * L, (e + 1) * L), L = `local_rows`) holds every
  local row exactly once. Memory: two window buffers,
  2 * shuffle_buffer * d_in * 2 bytes (2 GiB at the default 2^20 rows and
  d_in 512).

  A batch is a pure function of (cache, seed, shuffle_buffer, step, p, P):
  `get_state()` is the step plus the settings it depends on, and a reader
  restored with `set_state()` yields exactly the batches the original would
  have. Batches are produced by a background thread into a bounded queue.

    with CacheReader(path, batch_size=4096, seed=0, d_in=576) as reader:
      reader.set_state(saved)            # optional
      for _ in range(steps):
        batch = next(reader)             # [4096 / process_count, 576] float32
      saved = reader.get_state()         # JSON-able; save with the checkpoint
  """

  def __init__(
      self,
      cache: "Cache | str | os.PathLike[str]",
      *,
      batch_size: int,
      seed: int = 0,
      shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
      shuffle: bool = True,
      d_in: int | None = None,
      process_index: int = 0,
      process_count: int = 1,
      prefetch: int = 4,
      verify: str = "lazy",
      dtype: Any = np.float32,
  ):
    """Creates a reader (no thread starts until the first batch is asked for).

    Args:
      cache: a Cache or a cache directory.
      batch_size: GLOBAL batch size B (all processes together).
      seed: shuffle seed.
      shuffle_buffer: rows per shuffle window (rounded down to whole records,
        at least one record).
      shuffle: False streams the process's records in stored order (for
        evaluation).
      d_in: expected activation width (checked against the manifest).
      process_index: this process's index p (e.g. jax.process_index()).
      process_count: number of processes P (e.g. jax.process_count()); B must
        be divisible by P.
      prefetch: batches the background thread may hold ready.
      verify: checksum policy when opening a directory (see Cache).
      dtype: dtype of the batches: float32 (default), or the cache's disk
        dtype to skip the conversion (e.g. to convert on the accelerator).

    Raises:
      CacheError: the cache is incomplete, corrupt, empty, has another d_in,
        or has fewer records than processes.
      ValueError: inconsistent arguments.
    """
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(
          f"batch_size ({batch_size}) must be a positive multiple of "
          f"process_count ({process_count})"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self._owns_cache = not isinstance(cache, Cache)
    self.cache = Cache(cache, d_in=d_in, verify=verify) if self._owns_cache else cache
    if d_in is not None and self.cache.d_in != d_in:
      raise CacheError(
          f"activation cache {self.cache.directory} holds d_in={self.cache.d_in}, "
          f"expected {d_in}"
      )
    self.dtype = np.dtype(dtype)
    if self.dtype not in (np.dtype(np.float32), self.cache.dtype):
      raise ValueError(f"dtype must be float32 or {self.cache.dtype}, got {self.dtype}")
    self.batch_size = int(batch_size)
    self.local_batch_size = self.batch_size // process_count
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.num_rows = self.cache.num_rows
    self.d_in = self.cache.d_in
    record_rows = self.cache.record_rows
    self.records_per_window = max(1, int(shuffle_buffer) // record_rows)
    # Records: [start, start + length) in global rows; a shard's last may be short.
    starts, lengths = [], []
    for shard in range(self.cache.num_shards):
      s0 = int(self.cache.shard_starts[shard])
      s1 = int(self.cache.shard_starts[shard + 1])
      for r in range(s0, s1, record_rows):
        starts.append(r)
        lengths.append(min(record_rows, s1 - r))
    self._record_start = np.asarray(starts, np.int64)  # [n_records]
    self._record_len = np.asarray(lengths, np.int64)  # [n_records]
    self._record_shard = (
        np.searchsorted(self.cache.shard_starts, self._record_start, side="right") - 1
    )  # [n_records]
    if len(starts) < process_count:
      raise CacheError(
          f"activation cache {self.cache.directory} has {len(starts)} records of "
          f"{record_rows} rows ({self.num_rows} rows), fewer than process_count="
          f"{process_count}; harvest more activations or use fewer processes"
      )
    # This process's records: every process_count-th one.
    self._local_records = np.arange(process_index, len(starts), process_count)
    self.local_rows = int(self._record_len[self._local_records].sum())
    self._plans: OrderedDict[int, _EpochPlan] = OrderedDict()
    self._windows: OrderedDict[tuple[int, int], _Window] = OrderedDict()
    self._buffers: list[np.ndarray] = []  # free window buffers
    self._lock = threading.Lock()
    self._prefetch = max(1, int(prefetch))
    self._step = 0
    self._thread: threading.Thread | None = None
    self._stop: threading.Event | None = None
    self._queue: queue.Queue | None = None

  # -- the deterministic stream -------------------------------------------------

  def _rng(self, *key: int) -> np.random.Generator:
    return np.random.default_rng(
        [self.seed, self.process_index, self.process_count, *key]
    )

  def _plan(self, epoch: int) -> _EpochPlan:
    plan = self._plans.get(epoch)
    if plan is None:
      order = self._local_records
      if self.shuffle:
        order = order[self._rng(epoch, 0).permutation(len(order))]
      sizes = np.add.reduceat(
          self._record_len[order], np.arange(0, len(order), self.records_per_window)
      )
      window_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
      plan = _EpochPlan(order, window_starts)
      self._plans[epoch] = plan
      while len(self._plans) > 2:
        self._plans.popitem(last=False)
    return plan

  def _window(self, epoch: int, index: int) -> _Window:
    key = (epoch, index)
    window = self._windows.get(key)
    if window is not None:
      self._windows.move_to_end(key)
      return window
    plan = self._plan(epoch)
    k = self.records_per_window
    records = plan.order[index * k : (index + 1) * k]
    lengths = self._record_len[records]
    total = int(lengths.sum())
    if self.shuffle:
      perm = self._rng(epoch, 1, index).permutation(total)
    else:
      perm = np.arange(total)
    window = _Window(records, lengths, perm)
    self._windows[key] = window
    while len(self._windows) > 3:
      self._release(self._windows.popitem(last=False)[1])
    return window

  def _release(self, window: _Window) -> None:
    if window.data is not None:
      self._buffers.append(
          window.data.base if window.data.base is not None else window.data
      )
      window.data = None

  def _fill(self, key: tuple[int, int], window: _Window) -> np.ndarray:
    """The window's rows in record order, [window_rows, d_in] disk dtype."""
    if window.data is not None:
      return window.data
    # At most two filled windows (the current one and, for a batch that
    # straddles a window edge, its neighbour): recycle the oldest buffer.
    filled = [w for k, w in self._windows.items() if w.data is not None and k != key]
    for old in filled[: max(0, len(filled) - 1)]:
      self._release(old)
    capacity = min(self.records_per_window * self.cache.record_rows, self.local_rows)
    buffer = (
        self._buffers.pop()
        if self._buffers
        else np.empty((capacity, self.d_in), self.cache.dtype)
    )
    data = buffer[: window.size]
    for record, a, b in zip(
        window.records.tolist(),
        window.offsets[:-1].tolist(),
        window.offsets[1:].tolist(),
        strict=True,
    ):
      shard = int(self._record_shard[record])
      local = int(self._record_start[record] - self.cache.shard_starts[shard])
      np.copyto(data[a:b], self.cache.shard_array(shard)[local : local + b - a])
    window.data = data
    # Cold caches: ask the kernel to read the next window's records ahead.
    epoch, index = key
    if index + 1 < len(self._plan(epoch).window_starts) - 1:
      nxt = self._window(epoch, index + 1)
      self.cache.advise(self._record_start[nxt.records], self._record_len[nxt.records])
    return data

  def _pieces(self, start: int, stop: int):
    """(key, window, positions slice) covering local stream rows [start, stop)."""
    pos = start
    while pos < stop:
      epoch, offset = divmod(pos, self.local_rows)
      plan = self._plan(epoch)
      index = int(np.searchsorted(plan.window_starts, offset, side="right")) - 1
      window = self._window(epoch, index)
      a = offset - int(plan.window_starts[index])
      b = min(window.size, a + stop - pos)
      yield (epoch, index), window, slice(a, b)
      pos += b - a

  def stream_rows(self, start: int, stop: int) -> np.ndarray:
    """Global row ids at local stream positions [start, stop), int64."""
    pieces = []
    with self._lock:
      for _, window, positions in self._pieces(start, stop):
        local = window.perm[positions]  # rows of the window buffer
        which = np.searchsorted(window.offsets, local, side="right") - 1
        pieces.append(
            self._record_start[window.records[which]] + local - window.offsets[which]
        )
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

  def _local_range(self, step: int) -> tuple[int, int]:
    start = step * self.local_batch_size
    return start, start + self.local_batch_size

  def batch_rows(self, step: int) -> np.ndarray:
    """Global row ids of this process's batch `step`, int64 [local_batch]."""
    return self.stream_rows(*self._local_range(step))

  def batch(self, step: int) -> np.ndarray:
    """This process's batch `step`, [local_batch, d_in], without the thread.

    A pure function of (cache, seed, shuffle_buffer, step, process slice);
    float32 unless the reader was made with the disk dtype.
    """
    parts = []
    with self._lock:
      for key, window, positions in self._pieces(*self._local_range(step)):
        parts.append(np.take(self._fill(key, window), window.perm[positions], axis=0))
    rows = parts[0] if len(parts) == 1 else np.concatenate(parts)  # [b, d_in]
    return rows if rows.dtype == self.dtype else rows.astype(self.dtype)

  # -- position ----------------------------------------------------------------

  @property
  def step(self) -> int:
    """Index of the next batch next() returns."""
    return self._step

  @property
  def epoch(self) -> int:
    """This process's epoch at the first row of the next batch."""
    return self._step * self.local_batch_size // self.local_rows

  @property
  def steps_per_epoch(self) -> float:
    """local_rows / local_batch_size (batches wrap over epoch ends)."""
    return self.local_rows / self.local_batch_size

  def get_state(self) -> dict[str, Any]:
    """The position as a small JSON-able dict (save it with the checkpoint).

    'step' is the position; 'epoch' is informative; the other entries are
    the settings the batches depend on, checked by set_state.
    """
    return {
        "step": self._step,
        "epoch": self.epoch,
        "seed": self.seed,
        "batch_size": self.batch_size,
        "num_rows": self.num_rows,
        "records_per_window": self.records_per_window,
        "shuffle": self.shuffle,
        "process_count": self.process_count,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a position from get_state().

    Every process may restore the state saved by any one of them (the step
    is global). A state saved with another process_count is accepted: the
    reader moves to the same step, but the batches differ from the ones the
    old process layout would have given (each process owns other records).

    Raises:
      CacheError: the state was saved for another cache or shuffle setting, so
        the same step would not give the same batches.
    """
    mine = self.get_state()
    for key in ("seed", "batch_size", "num_rows", "records_per_window", "shuffle"):
      if key in state and state[key] != mine[key]:
        raise CacheError(
            f"reader state was saved with {key}={state[key]!r} but this reader of "
            f"{self.cache.directory} has {key}={mine[key]!r}; use the same "
            "settings to resume exactly"
        )
    if "step" not in state or int(state["step"]) < 0:
      raise CacheError(f"reader state {dict(state)!r} has no valid 'step'")
    self._stop_thread()
    self._step = int(state["step"])

  # -- iteration with prefetch ---------------------------------------------------

  @staticmethod
  def _produce(
      reader_ref: "weakref.ref[CacheReader]",
      step: int,
      stop: threading.Event,
      out: queue.Queue,
  ) -> None:
    """Prefetch loop. Holds the reader only weakly, so an unclosed reader can
    still be garbage collected (its __del__ then stops this thread)."""
    while not stop.is_set():
      reader = reader_ref()
      if reader is None:
        return
      try:
        item = reader.batch(step)
      except BaseException as e:  # noqa: BLE001 - handed to the consumer
        item = e
      del reader
      while not stop.is_set():
        try:
          out.put((step, item), timeout=0.05)
          break
        except queue.Full:
          if reader_ref() is None:
            return
      if isinstance(item, BaseException):
        return
      step += 1

  def _start_thread(self) -> None:
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self._prefetch)
    self._thread = threading.Thread(
        target=CacheReader._produce,
        args=(weakref.ref(self), self._step, self._stop, self._queue),
        name="gsae-cache-reader",
        daemon=True,
    )
    self._thread.start()

  def _stop_thread(self) -> None:
    if self._thread is None:
      return
    self._stop.set()
    if self._thread is not threading.current_thread():
      while self._thread.is_alive():
        try:  # unblock a producer waiting on a full queue
          self._queue.get(timeout=0.01)
        except queue.Empty:
          pass
      self._thread.join()
    self._thread = self._stop = self._queue = None

  def __iter__(self) -> Iterator[np.ndarray]:
    return self

  def __next__(self) -> np.ndarray:
    """The next batch [local_batch, d_in]. Never raises StopIteration."""
    if self._thread is None:
      self._start_thread()
    step, item = self._queue.get()
    if isinstance(item, BaseException):
      self._stop_thread()
      raise item
    assert step == self._step, (step, self._step)
    self._step += 1
    return item

  def close(self) -> None:
    """Stops the prefetch thread, frees the buffers, closes an owned cache."""
    self._stop_thread()
    with self._lock:
      self._windows.clear()
      self._buffers.clear()
    if self._owns_cache:
      self.cache.close()

  def __enter__(self) -> "CacheReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self._stop_thread()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass


def open_cache(
    directory: str | os.PathLike[str], *, d_in: int | None = None, verify: str = "lazy"
) -> Cache:
  """Opens a complete cache for random access (see Cache)."""
  return Cache(directory, d_in=d_in, verify=verify)
