r"""The full training loop against the bare step: the loop's overhead in %.

  python benchmarks/bench_loop.py            # gated, d_in 512, d_sae 4096, batch
                                             # 4096, float32 and bfloat16; ~3 min
  python benchmarks/bench_loop.py --shape=small --steps=200 --log_every=20 \
      --checkpoint_every=50

The loop is train.train_and_evaluate as a run uses it: batches from an
activation cache on disk (a float16 cache of random activations written to a
temp dir first; the reader's shuffle window and prefetch thread included),
metrics every step, logging (metrics.jsonl, TensorBoard, progress line) every
--log_every steps and orbax checkpoints every --checkpoint_every steps (and at
the last). Its time per step is measured from the first step after the first
log (so compilation and the first window fill are out) to the return of
train_and_evaluate with the final state ready (the last checkpoint written).

The bare step is train.make_train_step's step, jitted with the state donated,
fed one device-resident batch, for as many steps; it runs just before and
just after the loop, and the overhead is against their mean. Both are timed
in the same process, so that other load on the machine hits both alike.

Per-step host syncs would show as every step's batch being requested only
after the previous step finished; the loop's dispatch times are recorded and
the fraction of steps requested while the previous one was still running
(less than half a bare step after it) is reported. Writes
benchmarks/results/bench_loop.json.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import synthetic as synthetic_exp  # noqa: E402
from gsae_jax import cache as cache_lib  # noqa: E402
from gsae_jax import train  # noqa: E402

SHAPES = {'small': (64, 256, 1024), 'medium': (512, 4096, 4096)}  # d_in, d_sae, batch


def _write_cache(path: str, rows: int, d_in: int) -> None:
  block = np.random.default_rng(0).standard_normal((1 << 14, d_in), np.float32)
  with cache_lib.CacheWriter(
      path, d_in=d_in, dtype='float16', model='random', site='none'
  ) as writer:
    for start in range(0, rows, len(block)):
      writer.append(block[: min(len(block), rows - start)] * (1 + start % 7))


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
  c.checkpoint.every_steps = args.checkpoint_every
  return c


class _Timestamps:
  """Wraps train.make_source: records when each batch is requested."""

  def __init__(self):
    self.times: list[float] = []
    self._make = train.make_source

  def __enter__(self):
    def make(*a, **kw):
      source = self._make(*a, **kw)
      next_batch = source.next_batch

      def timed():
        self.times.append(time.perf_counter())
        return next_batch()

      source.next_batch = timed
      return source

    train.make_source = make
    return self

  def __exit__(self, *exc):
    train.make_source = self._make


def _bare_step(config, steps):
  """Seconds per step of the bare step (compiled before timing)."""
  step = jax.jit(train.make_train_step(config), donate_argnums=0)
  state = train.init_state(
      config, train.hparams_from_config(config), train.seeds_from_config(config), 1.0
  )
  x = jax.random.normal(
      jax.random.PRNGKey(0), (config.train.batch_size, config.sae.d_in)
  )
  state, _ = step(state, x)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, x)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - t) / steps


def _loop(config, workdir):
  """(seconds per step after the first log, dispatch times) of one run."""
  with _Timestamps() as stamps:
    state = train.train_and_evaluate(config, workdir)
    jax.block_until_ready(state)
    end = time.perf_counter()
  first = config.log.every_steps  # stamps[first] asks for step first + 1
  measured = config.train.num_steps - first
  return (end - stamps.times[first]) / measured, np.asarray(stamps.times[first:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', default='medium', choices=sorted(SHAPES))
  parser.add_argument('--compute_dtypes', default='float32,bfloat16')
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--log_every', type=int, default=10)
  parser.add_argument('--checkpoint_every', type=int, default=25)
  parser.add_argument('--shuffle_buffer', type=int, default=1 << 17)
  parser.add_argument('--out', default='benchmarks/results/bench_loop.json')
  args = parser.parse_args()
  t_start = time.perf_counter()
  d_in, d_sae, batch = SHAPES[args.shape]
  measured = args.steps - args.log_every
  load_before = os.getloadavg()
  print(
      f'{os.cpu_count()} CPUs, jax {jax.__version__}; gated SAE d_in {d_in}, d_sae '
      f'{d_sae}, batch {batch}; {args.steps} steps, timed over the last {measured}; '
      f'log every {args.log_every}, checkpoint every {args.checkpoint_every}; '
      f'load average {load_before[0]:.2f}'
  )
  tmp = tempfile.mkdtemp(prefix='gsae_bench_loop_')
  rows = []
  try:
    cache_dir = os.path.join(tmp, 'cache')
    _write_cache(cache_dir, max(args.shuffle_buffer, 2 * batch), d_in)
    print(
        f'\n{"compute dtype":16}{"bare ms/step":>14}{"loop ms/step":>14}'
        f'{"overhead":>10}{"dispatched ahead":>18}'
    )
    for dtype in args.compute_dtypes.split(','):
      config = _config(args, d_in, d_sae, batch, dtype, cache_dir)
      before = _bare_step(config, measured)
      loop, stamps = _loop(config, os.path.join(tmp, f'run_{dtype}'))
      after = _bare_step(config, measured)
      bare = (before + after) / 2
      ahead = float(np.mean(np.diff(stamps) < 0.5 * bare))
      row = {
          'compute_dtype': dtype,
          'bare_ms_per_step_before': before * 1e3,
          'bare_ms_per_step_after': after * 1e3,
          'loop_ms_per_step': loop * 1e3,
          'overhead_percent': 100 * (loop / bare - 1),
          'fraction_of_steps_dispatched_ahead': ahead,
      }
      rows.append(row)
      print(
          f'{dtype:16}{bare * 1e3:14.0f}{loop * 1e3:14.0f}'
          f'{row["overhead_percent"]:9.1f}%{ahead:18.2f}'
          f'   (bare before/after: {before * 1e3:.0f}/{after * 1e3:.0f} ms)',
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
            'timed_steps': measured,
            'log_every': args.log_every,
            'checkpoint_every': args.checkpoint_every,
            'load_average_before': load_before,
            'load_average_after': load_after,
            'rows': rows,
        },
        f,
        indent=1,
    )
  print(f'wrote {args.out}; total runtime {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
  jnp.zeros(())  # initialise the backend before the timers
  main()
