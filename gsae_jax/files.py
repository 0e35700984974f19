"""Writing files so that a crash or kill never leaves half of one.

Every file the library writes outside Orbax checkpoints goes through here:
written to a temporary file in the same directory, flushed and fsync'ed, then
renamed over the target (readers see the old file or the new one), and the
directory fsync'ed. The temporary file is created with mode 0o666 filtered by
the process umask, like any file `open` creates, so a research group can read
what a run writes (tempfile.mkstemp would make it 0o600).
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any


def fsync_dir(directory: str) -> None:
  fd = os.open(directory or '.', os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (see the module docstring)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.tmp-{uuid.uuid4().hex}-{os.path.basename(path)}')
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path: str, obj: Any, indent: int = 1, default=None) -> None:
  atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + '\n')


def csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
  """CSV of dict rows; the columns are every key seen, in first-seen order."""
  rows = list(rows)
  fields = list(dict.fromkeys(k for row in rows for k in row))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=fields, restval='')
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def atomic_write_csv(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
  atomic_write_text(path, csv_text(rows))
