r"""Activation-cache reader throughput next to memcpy and a bare NumPy gather.

  python benchmarks/bench_reader.py       # 1M rows, d 512 (after pip install -e .)
  python benchmarks/bench_reader.py --rows=2097152 --shuffle_buffer=1048576 \
      --steps=256                        # the default 2^20-row shuffle window

Writes a float16 cache of random activations (float32 in, as an LM gives them)
into a temp dir (or --dir), checks its checksums (which also warms the page
cache), allocates the reader's two window buffers, then times `next(reader)`
over --rounds rounds of --steps batches (128 x 4096 rows = one 2^19-row shuffle
window, so each round pays one window fill; the fill costs the same per row for
any window size). References measured in the same run:

* memcpy: np.copyto of 256 MiB; printed as bytes copied per second and as
  memory traffic (read + write, twice that);
* bare gather: x16[random_idx].astype(float32) of batch-size rows from an
  in-memory float16 array (indices drawn beforehand), once from an array the
  size of the cache and once the size of a shuffle window.

Reader and references are timed in interleaved rounds (the reader's prefetch
thread is stopped, and its queue dropped, before each reference round), and
rates are medians over rounds. The printed ratio is reader / the faster
reference. Target: >= 0.75. Runtime ~20 s on 2 idle cores.
"""

import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

from gsae_jax.data import cache as cache_lib

_ROWS = flags.DEFINE_integer("rows", 1 << 20, "Activations in the cache.")
_D_IN = flags.DEFINE_integer("d_in", 512, "Activation width.")
_BATCH = flags.DEFINE_integer("batch", 4096, "Batch size.")
_STEPS = flags.DEFINE_integer(
    "steps", 128, "Timed batches per round (128 x 4096 = one shuffle window)."
)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", 1 << 19, "Rows per window.")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 1 << 18, "Rows per shard file.")
_DIR = flags.DEFINE_string("dir", None, "Cache dir to (re)use; default a temp dir.")

_BLOCK_ROWS = 1 << 16


def _block(d_in: int) -> np.ndarray:
  """A block of random float32 activations [_BLOCK_ROWS, d_in]."""
  return np.random.default_rng(0).standard_normal((_BLOCK_ROWS, d_in), np.float32)


def _write_cache(path: str, rows: int, block: np.ndarray) -> float:
  """Writes `rows` activations (block repeated); returns the writer's seconds."""
  t = time.perf_counter()
  with cache_lib.CacheWriter(
      path,
      d_in=block.shape[1],
      dtype="float16",
      model="random",
      site="none",
      shard_rows=_SHARD_ROWS.value,
  ) as writer:
    for start in range(0, rows, len(block)):
      writer.append(block[: min(len(block), rows - start)])
  return time.perf_counter() - t  # incl. finish()


def _rate_line(name: str, rate: float, d_in: int) -> str:
  return (
      f"{name:36s}{rate / 1e6:6.3f} M act/s  {rate * d_in * 2 / 1e9:6.2f} GB/s in "
      f"(f16)  {rate * d_in * 4 / 1e9:6.2f} GB/s out (f32)"
  )


def main(argv):
  del argv
  t_start = time.perf_counter()
  rows, d_in, batch, steps = _ROWS.value, _D_IN.value, _BATCH.value, _STEPS.value
  rounds = _ROUNDS.value
  gib = rows * d_in * 2 / 2**30
  print(
      f"cache: {rows} rows x d_in {d_in}, float16 on disk ({gib:.2f} GiB), "
      f"batch {batch}, shuffle window {_SHUFFLE_BUFFER.value} rows, "
      f"{os.cpu_count()} CPUs; rates are medians of {rounds} interleaved rounds "
      f"of {steps} batches"
  )

  # memcpy reference.
  src = np.ones(1 << 28, np.uint8)  # 256 MiB
  dst = np.zeros_like(src)
  times = []
  for _ in range(5):
    t = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - t)
  memcpy = src.nbytes / np.median(times)
  print(
      f"{'memcpy (np.copyto, 256 MiB):':36s}{memcpy / 1e9:6.2f} GB/s copied "
      f"({2 * memcpy / 1e9:.2f} GB/s read + write)"
  )
  del src, dst

  block = _block(d_in)
  path = _DIR.value or tempfile.mkdtemp(prefix="gsae_bench_cache_")
  try:
    if not os.path.exists(os.path.join(path, cache_lib.MANIFEST)):
      sec = _write_cache(path, rows, block)
      print(
          f"{'writer (f32 in, append + finish):':36s}{rows / sec / 1e6:6.3f} M act/s"
          f"  {gib * 2**30 / sec / 1e9:6.2f} GB/s to disk (f16)"
      )
    # Bare NumPy gather references, from in-memory float16 arrays: one the
    # size of the cache, one the size of a shuffle window.
    block16 = block.astype(np.float16)
    x16 = np.tile(block16, (-(-rows // _BLOCK_ROWS), 1))[:rows]  # [rows, d_in]
    small = x16[: min(rows, _SHUFFLE_BUFFER.value)].copy()
    idx = [np.random.default_rng(2 + i).integers(0, rows, batch) for i in range(64)]
    small_idx = [i % len(small) for i in idx]

    with cache_lib.CacheReader(
        path,
        batch_size=batch,
        seed=0,
        shuffle_buffer=_SHUFFLE_BUFFER.value,
        d_in=d_in,
        verify="lazy",
    ) as reader:
      t = time.perf_counter()
      reader.cache.verify()  # crc32 of every shard; warms the page cache
      sec = time.perf_counter() - t
      print(
          f"{'checksums (crc32 of the mmap):':36s}{gib * 2**30 / sec / 1e9:6.2f} GB/s"
      )
      # Allocate (first-touch) both window buffers, a one-off per reader, with
      # windows of a far epoch, so that every timed round pays the steady
      # state: one window fill into a recycled buffer.
      far = 1000 * int(np.ceil(reader.steps_per_epoch))
      for step in (far, far + steps):
        reader.batch(step)
      bare, bare_small, read = [], [], []
      for _ in range(rounds):
        # Stop the prefetch thread (and drop what it holds) so neither side
        # gets work done for it during the other's timing.
        reader.set_state(reader.get_state())
        t = time.perf_counter()
        for i in range(steps):
          x16[idx[i % 64]].astype(np.float32)
        bare.append(steps * batch / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(steps):
          small[small_idx[i % 64]].astype(np.float32)
        bare_small.append(steps * batch / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(steps):
          next(reader)
        read.append(steps * batch / (time.perf_counter() - t))
      reader.set_state(reader.get_state())
      start = reader.step
      t = time.perf_counter()
      for step in range(start, start + steps):
        reader.batch(step)
      direct = steps * batch / (time.perf_counter() - t)

    rate = float(np.median(read))
    print(_rate_line("bare gather f16 -> f32, cache-sized:", np.median(bare), d_in))
    print(
        _rate_line("bare gather f16 -> f32, window-sized:", np.median(bare_small), d_in)
    )
    print(_rate_line("reader, warm (next(), prefetch):", rate, d_in))
    print(_rate_line("reader, warm (batch(), no thread):", direct, d_in))
    # Compare with the faster reference, round by round.
    best = [max(a, b) for a, b in zip(bare, bare_small, strict=True)]
    ratios = [r / g for r, g in zip(read, best, strict=True)]
    print(
        f"{'ratio reader / bare gather:':36s}{float(np.median(ratios)):6.3f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.75)"
    )
    print(
        f"{'ratio reader bytes in / memcpy:':36s}{rate * d_in * 2 / memcpy:6.3f} "
        "(f16 bytes read per second / bytes copied per second)"
    )
  finally:
    if _DIR.value is None:
      shutil.rmtree(path, ignore_errors=True)
  print(f"total runtime {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
  app.run(main)
