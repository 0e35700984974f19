r"""Stacked sweeps vs sequential runs: total SAE-steps/s.

For N = 1, 4, 16 SAEs at a shape, measures in one process:
  stacked:    one jitted step trains all N on each batch (one data pass);
  sequential: N runs one after another, each drawing its own batches and
              running the one-SAE step (what one-SAE-per-run frameworks do).
Data comes from the synthetic source on device (cheap), so this isolates the
compute; `--data_ms` adds a fixed host-side cost per batch read to model a
data-bound source (a cold cache, or activations harvested on the fly).

  python benchmarks/bench_sweep.py                 # small and medium shapes
  python benchmarks/bench_sweep.py --shapes=small --data_ms=20
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import synthetic as synthetic_exp  # noqa: E402
from gsae_jax import train  # noqa: E402
from gsae_jax.backends import hostmem  # noqa: E402

SHAPES = {'small': (64, 256, 1024), 'medium': (512, 4096, 4096)}


def _config(d_in, d_sae, batch, n):
  c = synthetic_exp.get_config()
  c.sae.d_in, c.sae.d_sae, c.train.batch_size = d_in, d_sae, batch
  c.stack.l1_coeff = tuple(0.01 * (1 + i) for i in range(n))
  c.stack.seed = tuple(range(n))
  return c


def _time_run(config, steps, data_ms):
  """Seconds per step of one run (after compiling), data read included."""
  source = train.make_source(config)
  state = train.init_state(
      config, train.hparams_from_config(config), train.seeds_from_config(config), 1.0
  )
  step = jax.jit(train.make_train_step(config), donate_argnums=0)
  state, _ = step(state, source.next_batch())  # compile
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(steps):
    if data_ms:
      time.sleep(data_ms / 1e3)
    state, _ = step(state, source.next_batch())
  jax.block_until_ready(state)
  return (time.perf_counter() - t) / steps


def _matmul_ceiling(n=2048, reps=5):
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  jax.block_until_ready(out)
  return 2 * n**3 * reps / (time.perf_counter() - t)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default='small,medium')
  parser.add_argument('--stacks', default='1,4,16')
  parser.add_argument('--data_ms', type=float, default=0.0)
  parser.add_argument('--out', default='benchmarks/results/bench_sweep.json')
  args = parser.parse_args()
  hostmem.keep_host_memory_on_cpu()  # as the launchers do; before any JAX work
  ceiling = _matmul_ceiling()
  print(f'devices: {jax.devices()}  fp32 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s')
  print(f'data cost per batch read: {args.data_ms} ms')
  print(
      f'{"shape":>22} {"N":>3} {"stacked SAE-steps/s":>20} '
      f'{"sequential":>11} {"ratio":>6} {"stacked GFLOP/s":>16}'
  )
  results = []
  for name in args.shapes.split(','):
    d_in, d_sae, batch = SHAPES[name]
    flops_per_sae_step = 14 * batch * d_in * d_sae
    steps = 40 if name == 'small' else 3
    one = _time_run(_config(d_in, d_sae, batch, 1), steps, args.data_ms)
    for n in [int(v) for v in args.stacks.split(',')]:
      stacked = _time_run(
          _config(d_in, d_sae, batch, n), max(2, steps // n), args.data_ms
      )
      stacked_rate, seq_rate = n / stacked, 1 / one  # N runs of one: N x the time
      row = {
          'shape': name,
          'd_in': d_in,
          'd_sae': d_sae,
          'batch': batch,
          'n': n,
          'data_ms': args.data_ms,
          'stacked_sae_steps_per_s': stacked_rate,
          'sequential_sae_steps_per_s': seq_rate,
          'ratio': stacked_rate / seq_rate,
          'stacked_flops_per_s': stacked_rate * flops_per_sae_step,
          'fraction_of_matmul_ceiling': stacked_rate * flops_per_sae_step / ceiling,
      }
      results.append(row)
      print(
          f'{f"{name} {d_in}x{d_sae} b{batch}":>22} {n:>3} {stacked_rate:>20.2f} '
          f'{seq_rate:>11.2f} {row["ratio"]:>5.2f}x '
          f'{row["stacked_flops_per_s"] / 1e9:>11.0f} ({row["fraction_of_matmul_ceiling"]:.2f})',
          flush=True,
      )
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'matmul_ceiling_flops': ceiling, 'rows': results}, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
