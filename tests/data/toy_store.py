"""A toy activation store for the store and loader tests: rows that name themselves."""

import os
import subprocess
import sys

import numpy as np

from gsae_jax.data import store as store_lib

D_IN = 8
RECORD_ROWS = 128
SHARD_ROWS = 1024
# Rows per shard: short shards (outliers dropped, text ended) and an empty one.
SHARD_FILL = (1024, 1000, 0, 1024, 577, 1024)
N_ROWS = sum(SHARD_FILL)


def make_acts(n: int = N_ROWS, d_in: int = D_IN, seed: int = 0) -> np.ndarray:
  """Random activations whose first two columns encode the row id exactly."""
  x = np.random.default_rng(seed).standard_normal((n, d_in)).astype(np.float32)
  ids = np.arange(n)
  x[:, 0], x[:, 1] = ids % 1024, ids // 1024  # exact in float16
  return x


def row_ids(batch: np.ndarray) -> np.ndarray:
  return (batch[:, 1] * 1024 + batch[:, 0]).astype(np.int64)


def layout(**overrides) -> store_lib.Layout:
  kwargs = dict(
      d_in=D_IN,
      dtype='float16',
      record_rows=RECORD_ROWS,
      shard_rows=SHARD_ROWS,
      num_shards=len(SHARD_FILL),
  )
  return store_lib.Layout(**(kwargs | overrides))


def write(path, acts, order=None, piece=333, fill=SHARD_FILL, **layout_overrides):
  """Writes acts into shards of `fill` rows, shards in `order`; finalizes."""
  writer = store_lib.StoreWriter(
      str(path),
      layout(num_shards=len(fill), **layout_overrides),
      model='toy',
      site='blocks.0.hook_resid_post',
  )
  starts = np.concatenate([[0], np.cumsum(fill)])
  for shard in order if order is not None else range(len(fill)):
    w = writer.shard(shard)
    rows = acts[starts[shard] : starts[shard + 1]]
    for a in range(0, len(rows), piece):
      w.append(rows[a : a + piece])
    w.finish()
  return writer.finalize()


def tree_bytes(root) -> dict[str, bytes]:
  """Every file under root, by relative path: to compare stores byte for byte."""
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      full = os.path.join(directory, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, root)] = f.read()
  return out


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_cli(module: str, *flags: str) -> subprocess.Popen:
  """`python -m <module>` on the main job's miniature config, output piped."""
  return subprocess.Popen(
      [
          sys.executable,
          '-m',
          module,
          '--config=experiments/smollm2_sweep.py:test',
          *flags,
      ],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
