r"""Finding the TopK family's threshold: lax.top_k vs bisection, per backend.

  python benchmarks/bench_select.py            # the main job's and a large shape

TopK, BatchTopK and Matryoshka SAEs need the k-th largest pre-activation of
each row (TopK; AuxK) or of the whole batch (BatchTopK). gsae_jax/sae/select.py
has two exact ways: jax.lax.top_k(k_max) and a 32-pass bisection on the
values' bit patterns. This times both at the shapes of one SAE's step, in the
same run, against the step's own encoder matmul ([batch, d_in] @ [d_in,
d_sae], float32) as the yardstick, and checks they agree. Rounds interleave
the variants; numbers are medians. `sae.select_impl='auto'` picks by these
numbers (gsae_jax/backends/__init__.py).
"""

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from gsae_jax.sae import select

SHAPES = {  # name: (batch, d_in, d_sae, k)
    'main': (512, 576, 1152, 24),
    'large': (4096, 576, 4608, 64),
}


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--shapes', default='main,large')
  args = ap.parse_args()
  out = {'backend': jax.default_backend(), 'shapes': {}}
  for name in args.shapes.split(','):
    batch, d_in, d_sae, k = SHAPES[name]
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (batch, d_in))
    w = jax.random.normal(kw, (d_in, d_sae)) / np.sqrt(d_in)
    z = x @ w
    fns = {'encoder matmul': (jax.jit(lambda a, b: a @ b), (x, w))}
    aux_k = d_in // 2  # AuxK's per-row selection [T App. A.2]
    for impl in ('top_k', 'bisect'):
      fns[f'row {impl}'] = (
          jax.jit(lambda v, i=impl, k=k: select.kth_largest(v, k, k, i)),
          (z,),
      )
      fns[f'aux {impl}'] = (
          jax.jit(lambda v, i=impl, k=aux_k: select.kth_largest(v, k, k, i)),
          (z,),
      )
      fns[f'batch {impl}'] = (
          jax.jit(
              lambda v, i=impl, k=k, batch=batch: select.kth_largest(
                  jax.nn.relu(v).reshape(-1), k * batch, k * batch, i
              )
          ),
          (z,),
      )
    for kind in ('row', 'aux', 'batch'):
      a, b = (
          np.asarray(fns[f'{kind} {i}'][0](*fns[f'{kind} {i}'][1]))
          for i in ('top_k', 'bisect')
      )
      assert np.array_equal(a, b), f'{kind}: the two selections disagree'
    times = {n: [] for n in fns}
    for _ in range(args.rounds):
      for n, (fn, a) in fns.items():
        times[n].append(_time(fn, *a))
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    print(
        f'{name}: batch {batch}, d_in {d_in}, d_sae {d_sae}, k {k} ({jax.default_backend()})'
    )
    for n, ms in med.items():
      print(
          f'  {n:16s} {ms:8.2f} ms  ({ms / med["encoder matmul"]:.2f} x the encoder matmul)'
      )
    for kind in ('row', 'aux', 'batch'):
      print(
          f'  {kind}: top_k / bisect = {med[f"{kind} top_k"] / med[f"{kind} bisect"]:.1f}x'
      )
    out['shapes'][name] = {'shape': [batch, d_in, d_sae, k], 'ms': med}
  os.makedirs('benchmarks/results', exist_ok=True)
  with open('benchmarks/results/bench_select.json', 'w') as f:
    json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
