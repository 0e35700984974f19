r"""The bare training step against this machine's own matmul ceilings.

  python benchmarks/bench_step.py                  # gated, d_in 512, d_sae 4096,
                                                   # batch 4096; ~2 min on 2 cores
  python benchmarks/bench_step.py --shape=small --rounds=9
  python benchmarks/bench_step.py --arch=baseline --no-autodiff

Model FLOPs per step are counted from the shapes, not measured: a step must do
the products of batch x d_in x d_sae terms that a gated SAE's loss and
gradient need -- forward: encoder, decoder, auxiliary decoder; backward:
encoder-weight, decoder-weight, decoder-input and auxiliary-input products --
each 2 * batch * d_in * d_sae FLOPs, so

  FLOPs/step = 14 * batch * d_in * d_sae   (gated; 7 products)
               10 * batch * d_in * d_sae   (baseline; 5 products)

per SAE. Everything else (elementwise passes, reductions, Adam) counts as
overhead. Ceilings measured in the same run, in each compute dtype (bfloat16
matmul inputs accumulate in float32, as in the step):

  A: the step's own must-do products alone, same shapes and dtype, each laid
     out [i, k] @ [k, j] with its inputs ready in memory, run back to back;
  B: one large square matmul (4096^3);
  and a memcpy (np.copyto of 256 MiB), for scale.

Rounds interleave A, B, the float32 step and the mixed-precision step (and,
unless --no-autodiff, the step with the plain jax.grad formulation,
models._autodiff_forward: what the custom VJP replaced on CPU and what other
backends run; and, for a gated SAE with the fused CPU kernels available,
the float32 step with its elementwise work as plain XLA ops instead,
gsae_jax/cpu_kernels.py), so that other load on the machine hits all alike. Each number
is a median over rounds; each fraction is the median of per-round ratios.
The step is train.make_train_step as the training loop compiles it (donated
state, metrics included), fed one device-resident batch. Freed host memory
is kept mapped, as the launchers keep it (gsae_jax/hostmem.py), so neither
the step nor the ceilings page-fault their temporaries in anew at each call;
GSAE_JAX_KEEP_HOST_MEMORY=0 measures glibc's default instead. Writes
benchmarks/results/bench_step.json.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import synthetic as synthetic_exp  # noqa: E402
from gsae_jax import cpu_kernels, hostmem, models, train  # noqa: E402

SHAPES = {'small': (64, 256, 1024), 'medium': (512, 4096, 4096)}  # d_in, d_sae, batch
SQUARE = 4096


def _config(arch, d_in, d_sae, batch, compute_dtype):
  c = synthetic_exp.get_config()
  c.sae.architecture = arch
  c.sae.d_in, c.sae.d_sae, c.train.batch_size = d_in, d_sae, batch
  c.sae.compute_dtype = compute_dtype
  return c


def _step_runner(config, x, forward=None, kernels=True):
  """() -> runs one step (blocking). `forward` replaces stacked_forward;
  kernels=False compiles it without the fused CPU kernels."""
  real, real_fused = models.stacked_forward, models._fused
  if forward is not None:
    models.stacked_forward = forward
  if not kernels:
    models._fused = lambda *args: False
  try:
    step = jax.jit(train.make_train_step(config), donate_argnums=0)
    state = train.init_state(
        config, train.hparams_from_config(config), train.seeds_from_config(config), 1.0
    )
    state, _ = step(state, x)  # compile
    jax.block_until_ready(state)
  finally:
    models.stacked_forward, models._fused = real, real_fused
  box = [state]

  def run():
    box[0], metrics = step(box[0], x)
    jax.block_until_ready((box[0], metrics))

  return run


def _products(arch, d_in, d_sae, batch, dtype):
  """The must-do products of one step: (lhs [i, k], rhs [k, j]) pairs."""
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 16))
  r = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32).astype(dtype)
  x, w_enc, w_dec, w_dec_t = (
      r(batch, d_in),
      r(d_in, d_sae),
      r(d_sae, d_in),
      r(d_in, d_sae),
  )
  f, d_pre, d_xhat, x_t, d_xhat_t = (
      r(batch, d_sae),
      r(batch, d_sae),
      r(batch, d_in),
      r(d_in, batch),
      r(d_in, batch),
  )
  prods = [
      (x, w_enc),  # encoder
      (f, w_dec),  # decoder
      (x_t, d_pre),  # encoder weight
      (d_xhat_t, f),  # decoder weight
      (d_xhat, w_dec_t),  # decoder input
  ]
  if arch == 'gated':
    acts, d_aux = r(batch, d_sae), r(batch, d_in)
    prods += [(acts, w_dec), (d_aux, w_dec_t)]  # auxiliary decoder and input
  return prods


def _ceiling_a(prods):
  """() -> runs the products back to back, each alone."""
  mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  for a, b in prods:
    jax.block_until_ready(mm(a, b))

  def run():
    for a, b in prods:
      jax.block_until_ready(mm(a, b))

  return run


def _ceiling_b(dtype):
  a = jax.random.normal(jax.random.PRNGKey(2), (SQUARE, SQUARE), jnp.float32).astype(
      dtype
  )
  mm = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
  jax.block_until_ready(mm(a))
  return lambda: jax.block_until_ready(mm(a))


def _memcpy_rate(reps=5):
  src = np.ones(1 << 28, np.uint8)
  dst = np.zeros_like(src)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - t)
  return src.nbytes / float(np.median(times))


def _cpu_name():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', default='medium', choices=sorted(SHAPES))
  parser.add_argument('--arch', default='gated', choices=models.ARCHITECTURES)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument(
      '--autodiff',
      action=argparse.BooleanOptionalAction,
      default=True,
      help='also time the step with the plain jax.grad formulation (float32)',
  )
  parser.add_argument('--out', default='benchmarks/results/bench_step.json')
  args = parser.parse_args()
  kept = hostmem.keep_host_memory()  # as the launchers do; before any JAX work
  t_start = time.perf_counter()
  d_in, d_sae, batch = SHAPES[args.shape]
  n_products = 7 if args.arch == 'gated' else 5
  flops = n_products * 2 * batch * d_in * d_sae
  dtypes = ('float32', 'bfloat16')
  load_before = os.getloadavg()
  print(
      f'{_cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__}, '
      f'{jax.devices()[0].platform}; load average {load_before[0]:.2f}'
  )
  print(
      f'{args.arch} SAE, d_in {d_in}, d_sae {d_sae}, batch {batch}: model FLOPs/step = '
      f'{2 * n_products} * batch * d_in * d_sae = {flops / 1e9:.1f} GFLOP'
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, d_in), jnp.float32)
  runs = {}
  for dt in dtypes:
    runs[f'A {dt}'] = _ceiling_a(
        _products(args.arch, d_in, d_sae, batch, jnp.dtype(dt))
    )
    runs[f'B {dt}'] = _ceiling_b(jnp.dtype(dt))
    runs[f'step {dt}'] = _step_runner(_config(args.arch, d_in, d_sae, batch, dt), x)
  if args.autodiff:
    runs['step float32 autodiff'] = _step_runner(
        _config(args.arch, d_in, d_sae, batch, 'float32'), x, models._autodiff_forward
    )
  kernels = args.arch == 'gated' and cpu_kernels.available()
  if kernels:
    runs['step float32 XLA passes'] = _step_runner(
        _config(args.arch, d_in, d_sae, batch, 'float32'), x, kernels=False
    )
  memcpy = []
  times = {k: [] for k in runs}
  for _ in range(args.rounds):
    memcpy.append(_memcpy_rate(reps=2))
    for name, run in runs.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  load_after = os.getloadavg()
  med = {k: float(np.median(v)) for k, v in times.items()}
  ratio = lambda a, b: float(np.median(np.asarray(times[a]) / np.asarray(times[b])))
  rows = []
  print(f'\n{"":24}{"ms/step":>9}{"tokens/s":>10}{"GFLOP/s":>9}{"of A":>7}{"of B":>7}')
  for dt in dtypes:
    a_rate = flops / med[f'A {dt}']
    b_rate = 2 * SQUARE**3 / med[f'B {dt}']
    print(
        f'{"ceiling A " + dt:24}{med[f"A {dt}"] * 1e3:9.0f}{"":10}{a_rate / 1e9:9.0f}'
        f'{1:7.2f}{ratio(f"B {dt}", f"A {dt}") * flops / (2 * SQUARE**3):7.2f}'
    )
    print(f'{"ceiling B " + dt:24}{"":9}{"":10}{b_rate / 1e9:9.0f}{"":7}{1:7.2f}')
    names = [f'step {dt}']
    if dt == 'float32':
      names += [
          n for n in ('step float32 XLA passes', 'step float32 autodiff') if n in runs
      ]
    for name in names:
      row = {
          'name': name,
          'compute_dtype': dt,
          'ms_per_step': med[name] * 1e3,
          'tokens_per_s': batch / med[name],
          'flops_per_step': flops,
          'flops_per_s': flops / med[name],
          'fraction_of_ceiling_a': ratio(f'A {dt}', name),
          # per round: (flops / t_step) / (2 S^3 / t_B)
          'fraction_of_ceiling_b': ratio(f'B {dt}', name) * flops / (2 * SQUARE**3),
          'ceiling_a_ms': med[f'A {dt}'] * 1e3,
          'ceiling_a_flops_per_s': a_rate,
          'ceiling_b_flops_per_s': b_rate,
      }
      rows.append(row)
      print(
          f'{name:24}{row["ms_per_step"]:9.0f}{row["tokens_per_s"]:10.0f}'
          f'{row["flops_per_s"] / 1e9:9.0f}{row["fraction_of_ceiling_a"]:7.2f}'
          f'{row["fraction_of_ceiling_b"]:7.2f}'
      )
  speedup = ratio('step float32', 'step bfloat16')
  print(f'\nmixed precision (bfloat16) / float32 step, tokens/s: {speedup:.2f}x')
  if args.autodiff:
    print(
        'custom-VJP step / plain-autodiff step (float32), tokens/s: '
        f'{ratio("step float32 autodiff", "step float32"):.2f}x'
    )
  if kernels:
    print(
        'fused CPU kernels / plain XLA passes (float32), tokens/s: '
        f'{ratio("step float32 XLA passes", "step float32"):.2f}x'
    )
  print(
      f'memcpy {np.median(memcpy) / 1e9:.1f} GB/s copied; load average '
      f'{load_before[0]:.2f} -> {load_after[0]:.2f}; '
      f'freed host memory kept mapped: {kept} (gsae_jax.hostmem); '
      f'fused CPU kernels: {kernels} (gsae_jax.cpu_kernels)'
  )
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(
        {
            'machine': {
                'cpu': _cpu_name(),
                'cpus': os.cpu_count(),
                'jax': jax.__version__,
                'load_average_before': load_before,
                'load_average_after': load_after,
                'keep_host_memory': kept,
                'cpu_kernels': kernels,
            },
            'shape': {'arch': args.arch, 'd_in': d_in, 'd_sae': d_sae, 'batch': batch},
            'flops_formula': f'{2 * n_products} * batch * d_in * d_sae',
            'rounds': args.rounds,
            'memcpy_bytes_per_s': float(np.median(memcpy)),
            'bf16_over_fp32_tokens_per_s': speedup,
            'times_s': times,
            'rows': rows,
        },
        f,
        indent=1,
    )
  print(f'wrote {args.out}; total runtime {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
  main()
