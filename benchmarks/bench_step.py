r"""The bare training step, per formulation and dtype, against this machine's ceilings.

  python benchmarks/bench_step.py                  # gated, d_in 512, d_sae 4096,
                                                   # batch 4096; ~3 min on 2 cores
  python benchmarks/bench_step.py --shape=main     # the main job's groups: 4 SAEs,
                                                   # d_in 576, d_sae 1152, batch 512
  python benchmarks/bench_step.py --shape=large --dtypes=bfloat16   # an accelerator's
  python benchmarks/bench_step.py --arch=baseline --rounds=9

Every (sae.step_impl, sae.compute_dtype) pair is timed: 'autodiff' (the
reference, gsae_jax/sae/models.py, differentiated by JAX) and 'custom_vjp'
(gsae_jax/backends/custom_vjp.py), each chosen through the config as a user
chooses it. Model FLOPs per step are counted from the shapes, not measured: a
step must do the products of batch x d_in x d_sae terms that a gated SAE's
loss and gradient need -- forward: encoder, decoder, auxiliary decoder;
backward: encoder-weight, decoder-weight, decoder-input and auxiliary-input
products -- each 2 * batch * d_in * d_sae FLOPs, so

  FLOPs/step = 14 * batch * d_in * d_sae   (gated; 7 products)
               10 * batch * d_in * d_sae   (baseline; 5 products)

per SAE. Everything else (elementwise passes, reductions, Adam) counts as
overhead. Ceilings measured in the same run, in each compute dtype (bfloat16
matmul inputs accumulate in float32, as in the step):

  A: the step's own must-do products alone, same shapes and dtype, each laid
     out [i, k] @ [k, j] with its inputs ready in memory, run back to back;
  B: one large square matmul (4096^3);
  and a memcpy (np.copyto of 256 MiB), for scale.

Rounds interleave every variant and ceiling, so that other load on the
machine hits all alike. Each number is a median over rounds; each fraction is
the median of per-round ratios. The step is train.make_train_step as the
training loop compiles it (donated state, metrics included), fed one
device-resident batch. Writes benchmarks/results/bench_step[_<shape>].json.
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
from gsae_jax import backends, train  # noqa: E402
from gsae_jax.backends import hostmem  # noqa: E402
from gsae_jax.sae import models  # noqa: E402

# d_in, d_sae, batch, SAEs in the stack
SHAPES = {
    'small': (64, 256, 1024, 1),
    'synthetic': (64, 512, 2048, 1),  # experiments/synthetic.py
    'medium': (512, 4096, 4096, 1),
    'main': (576, 1152, 512, 4),  # README command 1's gated group
    'large': (2304, 16384, 4096, 1),  # for accelerators
}
IMPLS = ('autodiff', 'custom_vjp')
SQUARE = 4096


def _config(arch, d_in, d_sae, batch, n_sae, compute_dtype, step_impl):
  c = synthetic_exp.get_config()
  c.sae.architecture = arch
  c.sae.d_in, c.sae.d_sae, c.train.batch_size = d_in, d_sae, batch
  c.sae.compute_dtype, c.sae.step_impl = compute_dtype, step_impl
  c.stack.l1_coeff = tuple(float(v) for v in np.linspace(0.01, 0.04, n_sae))
  return c


def _step_runner(config, x):
  """() -> runs one step of `config` (blocking), compiled once."""
  step = jax.jit(train.make_train_step(config), donate_argnums=0)
  state = train.init_state(
      config, train.hparams_from_config(config), train.seeds_from_config(config), 1.0
  )
  state, _ = step(state, x)  # compile
  jax.block_until_ready(state)
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
  parser.add_argument('--impls', default=','.join(IMPLS))
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  hostmem.keep_host_memory_on_cpu()  # as the launchers do; before any JAX work
  out = args.out or (
      'benchmarks/results/bench_step.json'
      if args.shape == 'medium'
      else f'benchmarks/results/bench_step_{args.shape}.json'
  )
  t_start = time.perf_counter()
  d_in, d_sae, batch, n_sae = SHAPES[args.shape]
  impls, dtypes = args.impls.split(','), args.dtypes.split(',')
  n_products = 7 if args.arch == 'gated' else 5
  flops = n_sae * n_products * 2 * batch * d_in * d_sae
  load_before = os.getloadavg()
  backend = jax.default_backend()
  print(
      f'{_cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__}, {backend} '
      f'({jax.devices()[0].device_kind}); load average {load_before[0]:.2f}'
  )
  print(
      f'{n_sae} {args.arch} SAE(s), d_in {d_in}, d_sae {d_sae}, batch {batch}: model '
      f'FLOPs/step = {n_sae} * {2 * n_products} * batch * d_in * d_sae = '
      f'{flops / 1e9:.1f} GFLOP'
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, d_in), jnp.float32)
  runs = {}
  for dt in dtypes:
    prods = _products(args.arch, d_in, d_sae, batch, jnp.dtype(dt)) * n_sae
    runs[f'A {dt}'] = _ceiling_a(prods)
    runs[f'B {dt}'] = _ceiling_b(jnp.dtype(dt))
    for impl in impls:
      config = _config(args.arch, d_in, d_sae, batch, n_sae, dt, impl)
      runs[f'{impl} {dt}'] = _step_runner(config, x)
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
        f'{"ceiling A " + dt:24}{med[f"A {dt}"] * 1e3:9.1f}{"":10}{a_rate / 1e9:9.0f}'
    )
    print(f'{"ceiling B " + dt:24}{"":9}{"":10}{b_rate / 1e9:9.0f}')
    for impl in impls:
      name = f'{impl} {dt}'
      row = {
          'name': name,
          'step_impl': impl,
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
          f'{"step " + name:24}{row["ms_per_step"]:9.1f}{row["tokens_per_s"]:10.0f}'
          f'{row["flops_per_s"] / 1e9:9.0f}{row["fraction_of_ceiling_a"]:7.2f}'
          f'{row["fraction_of_ceiling_b"]:7.2f}'
      )
  ratios = {}
  if set(IMPLS) <= set(impls):
    for dt in dtypes:
      key = f'custom_vjp / autodiff {dt}'
      ratios[key] = ratio(f'autodiff {dt}', f'custom_vjp {dt}')
  if {'float32', 'bfloat16'} <= set(dtypes):
    for impl in impls:
      ratios[f'bfloat16 / float32 {impl}'] = ratio(
          f'{impl} float32', f'{impl} bfloat16'
      )
  print()
  for key, value in ratios.items():
    print(f'{key}, tokens/s: {value:.2f}x')
  print(
      f"sae.step_impl='auto' runs {backends.resolve_step_impl('auto')} on {backend}; "
      f'memcpy {np.median(memcpy) / 1e9:.1f} GB/s; load average '
      f'{load_before[0]:.2f} -> {load_after[0]:.2f}'
  )
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  with open(out, 'w') as f:
    json.dump(
        {
            'machine': {
                'cpu': _cpu_name(),
                'cpus': os.cpu_count(),
                'backend': backend,
                'device_kind': jax.devices()[0].device_kind,
                'jax': jax.__version__,
                'load_average_before': load_before,
                'load_average_after': load_after,
            },
            'shape': {
                'arch': args.arch,
                'd_in': d_in,
                'd_sae': d_sae,
                'batch': batch,
                'n_sae': n_sae,
            },
            'flops_formula': f'{n_sae} * {2 * n_products} * batch * d_in * d_sae',
            'rounds': args.rounds,
            'memcpy_bytes_per_s': float(np.median(memcpy)),
            'ratios': ratios,
            'times_s': times,
            'rows': rows,
        },
        f,
        indent=1,
    )
  print(f'wrote {out}; total runtime {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
  main()
