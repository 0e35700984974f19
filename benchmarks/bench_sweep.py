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

--shared_pass measures a sweep's data pass through the real code path
(gsae_jax.train.sweep.run, metrics, checkpoints and all) on 4 groups x 4 SAEs
(gated and baseline at d_sae/2 and d_sae, 4 l1_coeff each):
  shared:     the 4 groups on one pass, each batch read once (train_together);
  in turn:    sweep.shared_data_pass=off, each group reading every batch;
  sequential: the 16 SAEs as 16 single-SAE runs (train_and_evaluate).
Each read sleeps --data_ms on the host (a wrapped source). The steady rate is
timed between two metric records (the loop syncs there): from the last
group's record at step --log_every to its record at the last step, so
compiling and the final checkpoint are outside the window. Ratios are of
SAE-steps/s within one run; the target is shared >= 0.8 x 16 x sequential
when one read outlasts the 16 SAEs' steps (printed, from a data_ms=0 run):

  python benchmarks/bench_sweep.py --shared_pass --shapes=small --data_ms=250
"""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import synthetic as synthetic_exp  # noqa: E402
from gsae_jax import config as config_lib  # noqa: E402
from gsae_jax import logs, train  # noqa: E402
from gsae_jax.backends import hostmem  # noqa: E402
from gsae_jax.data import sources  # noqa: E402
from gsae_jax.train import sweep  # noqa: E402

SHAPES = {'small': (64, 256, 1024), 'medium': (512, 4096, 4096)}


def _config(d_in, d_sae, batch, n):
  c = synthetic_exp.get_config()
  c.sae.d_in, c.sae.d_sae, c.train.batch_size = d_in, d_sae, batch
  c.stack.l1_coeff = tuple(0.01 * (1 + i) for i in range(n))
  c.stack.seed = tuple(range(n))
  return c


def _time_run(config, steps, data_ms):
  """Seconds per step of one run (after compiling), data read included."""
  source = sources.make_source(config)
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


class _SlowSource:
  """A source whose every read costs `data_ms` of host time."""

  def __init__(self, source, data_ms):
    self.source, self.data_ms = source, data_ms

  def __getattr__(self, name):
    return getattr(self.source, name)

  def next_batch(self):
    time.sleep(self.data_ms / 1e3)
    return self.source.next_batch()


class _RecordTimes:
  """Notes when each metric record (a step's loss) is written, per workdir;
  the loop has synced with the device there."""

  def __init__(self):
    self.times: dict[tuple[str, int], float] = {}
    self._real = logs.MetricWriter.write

  def __enter__(self):
    real, times = self._real, self.times

    def write(writer, step, metrics):
      real(writer, step, metrics)
      if 'loss' in metrics:
        times[(os.path.dirname(writer.path), step)] = time.perf_counter()

    logs.MetricWriter.write = write
    return self

  def __exit__(self, *exc):
    logs.MetricWriter.write = self._real

  def window(self, workdirs, first, last):
    """Seconds from the last of `workdirs` to log `first` to the last to log
    `last`: every run's steps first+1..last."""
    start = max(self.times[(w, first)] for w in workdirs)
    return max(self.times[(w, last)] for w in workdirs) - start


def _sweep_config(d_in, d_sae, batch, steps, log_every):
  c = synthetic_exp.get_config()
  c.sae.d_in, c.train.batch_size = d_in, batch
  c.sweep.architecture = ('gated', 'baseline')
  c.sweep.d_sae = (d_sae // 2, d_sae)
  c.sweep.l1_coeff = (0.005, 0.01, 0.02, 0.04)
  c.train.num_steps = steps
  c.train.lr_warmup_steps = 5
  c.log.every_steps = log_every
  c.log.tensorboard = False
  c.checkpoint.every_steps = steps
  return c


def _single_configs(group):
  """The group's SAEs as single-SAE runs."""
  out = []
  for i in range(group.size):
    c = copy.deepcopy(group.config)
    for name in config_lib.STACK_FIELDS:
      if c.stack[name]:
        c.stack[name] = (c.stack[name][i],)
    out.append(c)
  return out


def _shared_pass(args):
  """4 groups x 4 SAEs on one data pass vs in turn vs 16 single-SAE runs."""
  name = args.shapes.split(',')[0]
  d_in, d_sae, batch = SHAPES[name]
  steps, first = args.steps, args.log_every
  config = _sweep_config(d_in, d_sae, batch, steps, first)
  groups = sweep.plan(config)
  singles = [c for g in groups for c in _single_configs(g)]
  assert len(groups) == 4 and len(singles) == 16

  # One read against the 16 SAEs' steps (no data cost; the bare step).
  step_s = {g.name: _time_run(_single_configs(g)[0], 20, 0.0) for g in groups}
  all_steps_ms = 1e3 * sum(step_s[g.name] * g.size for g in groups)
  print(
      f'{name} d_in {d_in}, batch {batch}, groups '
      f'{", ".join(g.name for g in groups)} x 4 SAEs; one read {args.data_ms:g} '
      f'ms vs the 16 single-SAE steps {all_steps_ms:.0f} ms'
  )
  if args.data_ms < all_steps_ms:
    print('  WARNING: one read does not outlast the 16 steps; raise --data_ms')

  real_make = sources.make_source
  sources.make_source = lambda c: _SlowSource(real_make(c), args.data_ms)
  tmp = tempfile.mkdtemp(prefix='bench_sweep_')
  sae_steps = 16 * (steps - first)
  rates = {}
  try:
    with _RecordTimes() as clock:
      for mode in ('on', 'off'):
        c = copy.deepcopy(config)
        c.sweep.shared_data_pass = mode
        workdir = os.path.join(tmp, mode)
        sweep.run(c, workdir)
        dirs = [sweep.group_workdir(workdir, g) for g in groups]
        if mode == 'on':
          seconds = clock.window(dirs, first, steps)
        else:
          seconds = sum(clock.window([d], first, steps) for d in dirs)
        rates['shared' if mode == 'on' else 'in_turn'] = sae_steps / seconds
      seconds = 0.0
      for i, c in enumerate(singles):
        workdir = os.path.join(tmp, f'single{i}')
        train.train_and_evaluate(c, workdir)
        seconds += clock.window([workdir], first, steps)
      rates['sequential'] = sae_steps / seconds
  finally:
    sources.make_source = real_make
    shutil.rmtree(tmp, ignore_errors=True)
  seq = rates['sequential']
  row = {
      'shape': name,
      'd_in': d_in,
      'd_sae': [g.config.sae.d_sae for g in groups],
      'batch': batch,
      'data_ms': args.data_ms,
      'sixteen_single_steps_ms': all_steps_ms,
      'timed_steps': steps - first,
      **{f'{k}_sae_steps_per_s': v for k, v in rates.items()},
      'shared_ratio': rates['shared'] / seq,
      'in_turn_ratio': rates['in_turn'] / seq,
  }
  print(f'{"mode":>28} {"SAE-steps/s":>12} {"x sequential":>13}')
  for label, key in (
      ('16 single-SAE runs', 'sequential'),
      ('4 groups in turn', 'in_turn'),
      ('4 groups, one data pass', 'shared'),
  ):
    print(f'{label:>28} {rates[key]:>12.2f} {rates[key] / seq:>12.2f}x')
  print(f'shared / sequential = {row["shared_ratio"]:.2f} (target >= 12.8 = 0.8 x 16)')
  return row


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
  parser.add_argument(
      '--shared_pass',
      action='store_true',
      help='4 groups x 4 SAEs on one data pass vs 16 single-SAE runs',
  )
  parser.add_argument('--steps', type=int, default=15, help='--shared_pass steps')
  parser.add_argument('--log_every', type=int, default=5, help='--shared_pass')
  args = parser.parse_args()
  hostmem.keep_host_memory_on_cpu()  # as the launchers do; before any JAX work
  if args.shared_pass:
    row = _shared_pass(args)
    out = args.out.replace('.json', '_shared_pass.json')
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out, 'w') as f:
      json.dump(row, f, indent=1)
    print(f'wrote {out}')
    return
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
