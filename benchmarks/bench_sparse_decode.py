r"""Sparse decode (only active latents) against the dense decoder product.

  python benchmarks/bench_sparse_decode.py            # ~1 min on 2 cores
  python benchmarks/bench_sparse_decode.py --l0=8,16,32,64,128

The decoder product x_hat = f W_dec (batch 4096, d_sae 4096, d_in 512, float32)
at several L0s, three ways, timed in the same run (medians of interleaved
rounds):

  dense:        f @ W_dec, one [batch, d_sae] x [d_sae, d_in] matmul, as the
                training step does it;
  top_k+gather: each row's K largest latents (jax.lax.top_k), their decoder
                rows gathered and summed -- sum_k v_bk W_dec[i_bk];
  gather only:  the same with the active (value, index) pairs already given,
                as an encoder that emitted them would -- the best case.

K is the batch's largest row L0, so all three are exact (checked against
dense). Latents fire independently with probability L0 / d_sae. Writes
benchmarks/results/bench_sparse_decode.json.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gsae_jax.backends import hostmem  # noqa: E402

BATCH, D_IN, D_SAE = 4096, 512, 4096


def _latents(l0: int, seed: int) -> jax.Array:
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  active = jax.random.uniform(k1, (BATCH, D_SAE)) < l0 / D_SAE
  return jnp.where(active, jax.random.uniform(k2, (BATCH, D_SAE)) + 0.1, 0.0)


def _gather_decode(vals, idx, w_dec):
  return jnp.einsum('bk,bkd->bd', vals, w_dec[idx])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--l0', default='8,16,32,64,128,256')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--out', default='benchmarks/results/bench_sparse_decode.json')
  args = parser.parse_args()
  hostmem.keep_host_memory_on_cpu()  # as the launchers do; before any JAX work
  w_dec = jax.random.normal(jax.random.PRNGKey(0), (D_SAE, D_IN))
  dense = jax.jit(lambda f, w: f @ w)
  gather = jax.jit(_gather_decode)
  print(
      f'decoder product, batch {BATCH}, d_sae {D_SAE}, d_in {D_IN}, float32; '
      f'jax {jax.__version__}, {os.cpu_count()} CPUs'
  )
  print(f'{"L0":>5}{"K":>6}{"dense ms":>10}{"top_k+gather":>14}{"gather only":>13}')
  rows = []
  for seed, l0 in enumerate(int(v) for v in args.l0.split(',')):
    f = _latents(l0, seed)
    k = int(jnp.max(jnp.sum(f > 0, axis=1)))
    top = jax.jit(lambda f, w, k=k: _gather_decode(*jax.lax.top_k(f, k), w))
    vals, idx = jax.lax.top_k(f, k)
    runs = {
        'dense': lambda f=f: dense(f, w_dec),
        'top_k+gather': lambda f=f, top=top: top(f, w_dec),
        'gather only': lambda v=vals, i=idx: gather(v, i, w_dec),
    }
    want = np.asarray(runs['dense']())
    for name, run in runs.items():
      got = np.asarray(run())  # compiles, and checks
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3, err_msg=name)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
      for name, run in runs.items():
        t = time.perf_counter()
        jax.block_until_ready(run())
        times[name].append(time.perf_counter() - t)
    ms = {name: float(np.median(v)) * 1e3 for name, v in times.items()}
    rows.append({'l0': l0, 'k': k, 'ms': ms})
    print(
        f'{l0:5}{k:6}{ms["dense"]:10.1f}{ms["top_k+gather"]:14.1f}'
        f'{ms["gather only"]:13.1f}'
        f'   (dense / gather only: {ms["dense"] / ms["gather only"]:.2f}x)'
    )
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as fh:
    json.dump(
        {'batch': BATCH, 'd_in': D_IN, 'd_sae': D_SAE, 'rows': rows}, fh, indent=1
    )
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
