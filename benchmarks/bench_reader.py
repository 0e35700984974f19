r"""Activation-store reader (grain) throughput next to memcpy and a bare NumPy gather.

  python benchmarks/bench_reader.py       # 1M rows, d 512 (after pip install -e .[test])
  python benchmarks/bench_reader.py --rows=2097152 --shuffle_buffer=1048576 \
      --steps=256                        # the default 2^20-row shuffle window
  python benchmarks/bench_reader.py --s3  # also from a loopback S3 server (moto)

Writes a float16 store of random activations (float32 in, as an LM gives
them) into a temp dir (or --dir), checks its checksums (which also warms the
page cache), then times `next(loader)` over --rounds rounds of --steps batches
(512 x 4096 rows = four 2^19-row shuffle windows: each round starts a fresh
pipeline that reads its first window before the first batch, and reads the
next ones while the batches of the current one are gathered, as in a long
run). References measured in the same run:

* memcpy: np.copyto of 256 MiB; printed as bytes copied per second and as
  memory traffic (read + write, twice that);
* bare gather: x16[random_idx].astype(float32) of batch-size rows from an
  in-memory float16 array (indices drawn beforehand), once from an array the
  size of the store and once the size of a shuffle window.

Loader and references are timed in interleaved rounds (the loader's pipeline
is dropped, threads and all, before each reference round), and rates are
medians over rounds. The printed ratio is loader / the faster reference.
Target: >= 0.75.

--s3 writes --s3_rows rows to an S3-compatible server on loopback (moto, in
this process) and times the loader reading them over HTTP, against one SAE
step's consumption at the benchmark shape (gated, d_in 512, d_sae 4096, batch
4096: batch / step time, measured in the same run). Target: >= 10x.
"""

import os
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from gsae_jax.backends import hostmem
from gsae_jax.data import loader as loader_lib
from gsae_jax.data import store as store_lib

_ROWS = flags.DEFINE_integer("rows", 1 << 20, "Activations in the store.")
_D_IN = flags.DEFINE_integer("d_in", 512, "Activation width.")
_BATCH = flags.DEFINE_integer("batch", 4096, "Batch size.")
_STEPS = flags.DEFINE_integer(
    "steps", 512, "Timed batches per round (512 x 4096 = four shuffle windows)."
)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", 1 << 19, "Rows per window.")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 1 << 18, "Rows per shard.")
_DIR = flags.DEFINE_string("dir", None, "Store to (re)use; default a temp dir.")
_S3 = flags.DEFINE_bool("s3", False, "Also read from a loopback S3 server.")
_S3_ROWS = flags.DEFINE_integer("s3_rows", 1 << 19, "Activations in the S3 store.")

_BLOCK_ROWS = 1 << 16


def _block(d_in: int) -> np.ndarray:
  """A block of random float32 activations [_BLOCK_ROWS, d_in]."""
  return np.random.default_rng(0).standard_normal((_BLOCK_ROWS, d_in), np.float32)


def _write_store(path: str, rows: int, block: np.ndarray) -> float:
  """Writes `rows` activations (block repeated); returns the writer's seconds."""
  num_shards = -(-rows // _SHARD_ROWS.value)
  layout = store_lib.Layout(
      d_in=block.shape[1],
      dtype="float16",
      record_rows=4096,
      shard_rows=_SHARD_ROWS.value,
      num_shards=num_shards,
  )
  t = time.perf_counter()
  writer = store_lib.StoreWriter(path, layout, model="random", site="none")
  for shard in range(num_shards):
    w = writer.shard(shard)
    n = min(_SHARD_ROWS.value, rows - shard * _SHARD_ROWS.value)
    for start in range(0, n, len(block)):
      w.append(block[: min(len(block), n - start)])
    w.finish()
  writer.finalize()
  return time.perf_counter() - t


def _loader(path_or_store, batch, d_in):
  return loader_lib.ActivationLoader(
      path_or_store,
      batch_size=batch,
      seed=0,
      shuffle_buffer=_SHUFFLE_BUFFER.value,
      d_in=d_in,
  )


def _sae_step_seconds(batch: int) -> float:
  """Seconds of one gated SAE step at the benchmark shape (d_in 512, d_sae 4096)."""
  import jax  # noqa: PLC0415

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import synthetic as synthetic_exp  # noqa: PLC0415
  from gsae_jax import train  # noqa: PLC0415

  c = synthetic_exp.get_config()
  c.sae.d_in, c.sae.d_sae, c.train.batch_size = 512, 4096, batch
  state = train.init_state(
      c, train.hparams_from_config(c), train.seeds_from_config(c), 1.0
  )
  step = jax.jit(train.make_train_step(c), donate_argnums=0)
  x = jax.numpy.asarray(
      np.random.default_rng(0).standard_normal((batch, 512)), "float32"
  )
  state, _ = step(state, x)
  jax.block_until_ready(state)
  times = []
  for _ in range(5):
    t = time.perf_counter()
    state, _ = step(state, x)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _s3_bench(block: np.ndarray, batch: int) -> None:
  """The loader from a loopback S3 server vs one SAE step's consumption."""
  import logging  # noqa: PLC0415

  import boto3  # noqa: PLC0415
  from moto.server import ThreadedMotoServer  # noqa: PLC0415

  logging.getLogger("werkzeug").setLevel(logging.ERROR)
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  _, port = server.get_host_and_port()
  endpoint = f"http://127.0.0.1:{port}"
  os.environ.update(
      AWS_ACCESS_KEY_ID="bench",
      AWS_SECRET_ACCESS_KEY="bench",
      AWS_ENDPOINT_URL=endpoint,
      AWS_REGION="us-east-1",
  )
  boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
  rows, d_in = _S3_ROWS.value, block.shape[1]
  sec = _write_store("s3://bench/acts", rows, block)
  print(
      f"{'S3 writer (loopback, moto):':36s}{rows / sec / 1e6:6.3f} M act/s  "
      f"{rows * d_in * 2 / sec / 1e9:6.2f} GB/s up (f16)"
  )
  reader = _loader("s3://bench/acts", batch, d_in)
  steps = rows // batch
  t = time.perf_counter()
  for _ in range(steps):
    next(reader)
  rate = steps * batch / (time.perf_counter() - t)
  reader.close()
  server.stop()
  step_s = _sae_step_seconds(batch)
  need = batch / step_s
  print(_rate_line("loader from S3 (cold, one epoch):", rate, d_in))
  print(
      f"{'one SAE step consumes:':36s}{need / 1e6:6.3f} M act/s  (gated 512 x 4096, "
      f"batch {batch}: {step_s * 1e3:.0f} ms a step)"
  )
  print(f"{'ratio S3 loader / SAE consumption:':36s}{rate / need:6.1f}x (target >= 10)")


def _rate_line(name: str, rate: float, d_in: int) -> str:
  return (
      f"{name:36s}{rate / 1e6:6.3f} M act/s  {rate * d_in * 2 / 1e9:6.2f} GB/s in "
      f"(f16)  {rate * d_in * 4 / 1e9:6.2f} GB/s out (f32)"
  )


def main(argv):
  del argv
  hostmem.keep_host_memory()  # as the launchers do on CPU (docs/benchmarks.md)
  t_start = time.perf_counter()
  rows, d_in, batch, steps = _ROWS.value, _D_IN.value, _BATCH.value, _STEPS.value
  rounds = _ROUNDS.value
  gib = rows * d_in * 2 / 2**30
  print(
      f"store: {rows} rows x d_in {d_in}, float16 on disk ({gib:.2f} GiB), "
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
  path = _DIR.value or tempfile.mkdtemp(prefix="gsae_bench_store_")
  try:
    if not store_lib.exists(path):
      sec = _write_store(path, rows, block)
      print(
          f"{'writer (f32 in, append + finish):':36s}{rows / sec / 1e6:6.3f} M act/s"
          f"  {gib * 2**30 / sec / 1e9:6.2f} GB/s to disk (f16)"
      )
    # Bare NumPy gather references, from in-memory float16 arrays: one the
    # size of the store, one the size of a shuffle window.
    block16 = block.astype(np.float16)
    x16 = np.tile(block16, (-(-rows // _BLOCK_ROWS), 1))[:rows]  # [rows, d_in]
    small = x16[: min(rows, _SHUFFLE_BUFFER.value)].copy()
    idx = [np.random.default_rng(2 + i).integers(0, rows, batch) for i in range(64)]
    small_idx = [i % len(small) for i in idx]

    store = store_lib.Store(path, d_in=d_in)
    t = time.perf_counter()
    store.verify()  # crc32c of every chunk; warms the page cache
    sec = time.perf_counter() - t
    print(
        f"{'checksums (crc32c, tensorstore):':36s}{gib * 2**30 / sec / 1e9:6.2f} GB/s"
    )
    reader = _loader(store, batch, d_in)
    next(reader)  # builds the pipeline once (grain, thread pools)
    bare, bare_small, read = [], [], []
    for _ in range(rounds):
      # Drop the pipeline (and what its threads hold) so neither side gets
      # work done for it during the other's timing; each round starts at a
      # window boundary and reads its first window before its first batch.
      reader.set_state(
          {**reader.get_state(), "step": reader.step - reader.step % steps + steps}
      )
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
    reader.close()

    rate = float(np.median(read))
    print(_rate_line("bare gather f16 -> f32, store-sized:", np.median(bare), d_in))
    print(
        _rate_line("bare gather f16 -> f32, window-sized:", np.median(bare_small), d_in)
    )
    print(_rate_line("loader, warm (next(), grain):", rate, d_in))
    # Compare with the faster reference, round by round.
    best = [max(a, b) for a, b in zip(bare, bare_small, strict=True)]
    ratios = [r / g for r, g in zip(read, best, strict=True)]
    print(
        f"{'ratio loader / bare gather:':36s}{float(np.median(ratios)):6.3f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.75)"
    )
    print(
        f"{'ratio loader bytes in / memcpy:':36s}{rate * d_in * 2 / memcpy:6.3f} "
        "(f16 bytes read per second / bytes copied per second)"
    )
    if _S3.value:
      _s3_bench(block, batch)
  finally:
    if _DIR.value is None:
      shutil.rmtree(path, ignore_errors=True)
  print(f"total runtime {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
  app.run(main)
