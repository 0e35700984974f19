r"""The full training loop against the bare step: the loop's overhead in %.

  python benchmarks/bench_loop.py            # gated, d_in 512, d_sae 4096, batch
                                             # 4096, float32 and bfloat16; ~3 min
  python benchmarks/bench_loop.py --shape=small --steps=100 --log_every=20

The loop is train.train_and_evaluate as a run uses it: batches from an
activation cache on disk (a float16 cache of random activations written to a
temp dir first; the reader's shuffle window and prefetch thread included),
metrics every step, logging (metrics.jsonl, TensorBoard, progress line) every
--log_every steps, and an orbax checkpoint at the end.

The bare step is train.make_train_step's step, jitted with the state donated,
compiled once, fed one device-resident batch. It runs in bursts of --burst
steps inside the loop run, at each log point (where the loop has synced and
the device is idle), so that bare and loop times alternate every few seconds
and other load on the machine hits both alike. The loop's time for the
--log_every steps between two log points (its logging included, the burst
excluded) is compared with the mean of the bursts at either end; printed is
the median over intervals. The final checkpoint is timed on its own (from the
last log point to the return of train_and_evaluate, the save finished), and
the overhead at a checkpoint cadence is

  loop overhead + checkpoint seconds / (cadence * bare step seconds)

printed for the default cadence (config.checkpoint.every_steps) and for a
checkpoint every 100 steps.

A per-step host sync would show as each step's batch being requested only
once the step before it had finished; printed is the fraction of steps whose
batch was requested less than half a bare step after the previous one (the
host running ahead of the device). Writes benchmarks/results/bench_loop.json.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import synthetic as synthetic_exp  # noqa: E402
from gsae_jax import config as config_lib  # noqa: E402
from gsae_jax import logs, train  # noqa: E402
from gsae_jax.backends import hostmem  # noqa: E402
from gsae_jax.data import store as store_lib  # noqa: E402

SHAPES = {'small': (64, 256, 1024), 'medium': (512, 4096, 4096)}  # d_in, d_sae, batch


def _write_cache(path: str, rows: int, d_in: int) -> None:
  block = np.random.default_rng(0).standard_normal((1 << 14, d_in), np.float32)
  shard_rows = 1 << 18
  num_shards = -(-rows // shard_rows)
  layout = store_lib.Layout(
      d_in=d_in,
      dtype='float16',
      record_rows=4096,
      shard_rows=shard_rows,
      num_shards=num_shards,
  )
  writer = store_lib.StoreWriter(path, layout, model='random', site='none')
  for shard in range(num_shards):
    w = writer.shard(shard)
    first = shard * shard_rows
    for start in range(first, min(rows, first + shard_rows), len(block)):
      w.append(block[: min(len(block), rows - start)] * (1 + start % 7))
    w.finish()
  writer.finalize()


def _config(args, d_in, d_sae, batch, compute_dtype, cache_dir):
  c = synthetic_exp.get_config()
  c.sae.d_in, c.sae.d_sae, c.train.batch_size = d_in, d_sae, batch
  c.sae.compute_dtype = compute_dtype
  c.data.source = 'cache'
  c.data.cache_dir = cache_dir
  c.data.shuffle_buffer = args.shuffle_buffer
  c.train.num_steps = args.steps
  c.log.every_steps = args.log_every
  c.log.tensorboard = True
  c.checkpoint.every_steps = args.steps  # only at the end; timed on its own
  return c


class _Timestamps:
  """Records when the loop asks for each batch, and runs a bare-step burst at
  each log point (timed: log_in/log_out around it, burst seconds per step)."""

  def __init__(self, bare_step, burst: int):
    self.bare_step, self.burst = bare_step, burst
    self.batches: list[float] = []
    self.log_in: list[float] = []
    self.log_out: list[float] = []
    self.bare: list[float] = []

  def __enter__(self):
    self._make, self._write = train.make_source, logs.MetricWriter.write

    def make(*a, **kw):
      source = self._make(*a, **kw)
      next_batch = source.next_batch

      def timed():
        self.batches.append(time.perf_counter())
        return next_batch()

      source.next_batch = timed
      return source

    def write(writer, step, metrics):
      if 'loss' in metrics:  # a log point: the loop has synced
        self.log_in.append(time.perf_counter())
        self.bare.append(self.bare_step.seconds_per_step(self.burst))
        self.log_out.append(time.perf_counter())
      return self._write(writer, step, metrics)

    train.make_source, logs.MetricWriter.write = make, write
    return self

  def __exit__(self, *exc):
    train.make_source, logs.MetricWriter.write = self._make, self._write


class _BareStep:
  """train.make_train_step's step, jitted with the state donated, compiled once."""

  def __init__(self, config):
    self.step = jax.jit(train.make_train_step(config), donate_argnums=0)
    self.state = train.init_state(
        config, train.hparams_from_config(config), train.seeds_from_config(config), 1.0
    )
    shape = (config.train.batch_size, config.sae.d_in)
    self.x = jax.random.normal(jax.random.PRNGKey(0), shape)
    self.state, _ = self.step(self.state, self.x)
    jax.block_until_ready(self.state)

  def seconds_per_step(self, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.x)
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - t) / steps


def _loop(config, workdir, bare_step, burst):
  """One run: per log interval (loop s/step, bare s/step), checkpoint s, and
  the fraction of steps whose batch was asked for while the device was busy."""
  with _Timestamps(bare_step, burst) as t:
    state = train.train_and_evaluate(config, workdir)
    jax.block_until_ready(state)
    end = time.perf_counter()
  every = config.log.every_steps
  intervals = [
      ((t.log_in[i + 1] - t.log_out[i]) / every, (t.bare[i] + t.bare[i + 1]) / 2)
      for i in range(len(t.log_in) - 1)
  ]
  # Batch requests between log points (bursts excluded), vs. half a bare step.
  gaps = np.diff(np.asarray(t.batches[every:]))
  gaps = np.delete(gaps, np.arange(every - 1, len(gaps), every))
  ahead = float(np.mean(gaps < 0.5 * float(np.median(t.bare))))
  return intervals, end - t.log_out[-1], ahead


def _with_checkpoints(overhead, save_s, bare_s, cadence):
  """Overhead in % with a checkpoint of save_s seconds every `cadence` steps."""
  return 100 * (overhead + save_s / (cadence * bare_s))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', default='medium', choices=sorted(SHAPES))
  parser.add_argument('--compute_dtypes', default='float32,bfloat16')
  parser.add_argument('--steps', type=int, default=70)
  parser.add_argument('--log_every', type=int, default=10)
  parser.add_argument('--burst', type=int, default=4)
  parser.add_argument('--shuffle_buffer', type=int, default=1 << 17)
  parser.add_argument('--out', default='benchmarks/results/bench_loop.json')
  args = parser.parse_args()
  hostmem.keep_host_memory_on_cpu()  # as the launchers do; before any JAX work
  t_start = time.perf_counter()
  d_in, d_sae, batch = SHAPES[args.shape]
  timed = args.steps - args.log_every  # the intervals between log points
  default_cadence = int(config_lib.default_config().checkpoint.every_steps)
  load_before = os.getloadavg()
  print(
      f'{os.cpu_count()} CPUs, jax {jax.__version__}; gated SAE d_in {d_in}, d_sae '
      f'{d_sae}, batch {batch}; {args.steps} steps, {timed} timed; data from a '
      f'cache, metrics every step, logs every {args.log_every}, bare bursts of '
      f'{args.burst}; load average {load_before[0]:.2f}'
  )
  tmp = tempfile.mkdtemp(prefix='gsae_bench_loop_')
  rows = []
  try:
    cache_dir = os.path.join(tmp, 'cache')
    _write_cache(cache_dir, max(args.shuffle_buffer, 2 * batch), d_in)
    print(
        f'\n{"":10}{"bare":>9}{"loop":>9}{"loop":>10}{"checkpoint":>12}'
        f'{"+ ckpt every":>14}{"+ ckpt every":>14}{"ran":>7}'
        f'\n{"dtype":10}{"ms/step":>9}{"ms/step":>9}{"overhead":>10}{"s":>12}'
        f'{default_cadence:>14}{100:>14}{"ahead":>7}'
    )
    for dtype in args.compute_dtypes.split(','):
      config = _config(args, d_in, d_sae, batch, dtype, cache_dir)
      bare_step = _BareStep(config)
      intervals, save_s, ahead = _loop(
          config, os.path.join(tmp, f'run_{dtype}'), bare_step, args.burst
      )
      ratios = [loop / bare for loop, bare in intervals]
      overhead = float(np.median(ratios)) - 1
      bare_s = float(np.median([bare for _, bare in intervals]))
      loop_s = float(np.median([loop for loop, _ in intervals]))
      row = {
          'compute_dtype': dtype,
          'intervals_ms_per_step': [
              {'loop': loop * 1e3, 'bare': bare * 1e3} for loop, bare in intervals
          ],
          'loop_overhead_percent_per_interval': [100 * (r - 1) for r in ratios],
          'loop_overhead_percent': 100 * overhead,
          'checkpoint_seconds': save_s,
          f'overhead_percent_checkpoint_every_{default_cadence}': _with_checkpoints(
              overhead, save_s, bare_s, default_cadence
          ),
          'overhead_percent_checkpoint_every_100': _with_checkpoints(
              overhead, save_s, bare_s, 100
          ),
          'fraction_of_steps_dispatched_ahead': ahead,
      }
      rows.append(row)
      print(
          f'{dtype:10}{bare_s * 1e3:9.0f}{loop_s * 1e3:9.0f}'
          f'{100 * overhead:9.1f}%{save_s:12.2f}'
          f'{_with_checkpoints(overhead, save_s, bare_s, default_cadence):13.1f}%'
          f'{_with_checkpoints(overhead, save_s, bare_s, 100):13.1f}%{ahead:7.2f}',
          flush=True,
      )
      print(
          f'{"":10}per interval: '
          + ', '.join(f'{lp * 1e3:.0f}/{b * 1e3:.0f}' for lp, b in intervals)
          + ' ms (loop/bare)',
          flush=True,
      )
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  load_after = os.getloadavg()
  print(f'load average {load_before[0]:.2f} -> {load_after[0]:.2f}')
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(
        {
            'shape': {'d_in': d_in, 'd_sae': d_sae, 'batch': batch},
            'steps': args.steps,
            'timed_steps': timed,
            'burst': args.burst,
            'log_every': args.log_every,
            'load_average_before': load_before,
            'load_average_after': load_after,
            'rows': rows,
        },
        f,
        indent=1,
    )
  print(f'wrote {args.out}; total runtime {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
  main()
