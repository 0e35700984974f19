"""Wall time of `gsae_jax.evaluate` for a sweep of SAEs at one SmolLM2 site.

  python benchmarks/bench_evaluate.py [--workdir runs/sweep] [--num_saes 4]
      [--d_sae 2304] [--num_tokens 20000] [--context_len 128] [--batch_size 8]

(from the repository root, with gsae_jax installed: `pip install -e .`).

Without --workdir it builds --num_saes SAEs with random weights (half gated,
half baseline, d_in 576) at blocks.15.hook_resid_post: evaluation cost does
not depend on how well they were trained. With --workdir it loads that run's
or sweep's SAEs. It prints the one-batch breakdown of an evaluation step
(activations up to the site; one CE run with the activation replaced, which
runs only the layers after the site; the same CE as a full forward pass, for
comparison; one SAE step) and then times `evaluate` end to end (compilation
included, LM loading excluded).

Results: docs/benchmarks.md, "Evaluation".
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import gsae_jax
from gsae_jax import api, evaluate
from gsae_jax import config as config_lib
from gsae_jax import lm as lm_lib
from gsae_jax.backends import hostmem
from gsae_jax.data import text
from gsae_jax.sae import models

SITE = 'blocks.15.hook_resid_post'


def random_saes(n: int, d_in: int, d_sae: int, context_len: int, batch_size: int):
  saes = []
  for i in range(n):
    c = config_lib.default_config()
    c.data.source = 'cache'
    c.sae.architecture = 'gated' if i % 2 == 0 else 'baseline'
    c.sae.d_in, c.sae.d_sae = d_in, d_sae
    c.harvest.site, c.harvest.context_len = SITE, context_len
    c.harvest.lm_batch_size = batch_size
    spec = models.SAESpec.from_config(c.sae)
    params = models.init_params(spec, jax.random.PRNGKey(i))
    params = {
        k: np.asarray(v) * (0.05 if k == 'W_enc' else 1) for k, v in params.items()
    }
    saes.append(api.SAE(c, params, index=i))
  return saes


def _best(fn, repeats: int = 2) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def breakdown(lm, sae, context_len: int, batch_size: int) -> dict:
  """Seconds of each part of one evaluation batch."""
  docs = text.iter_documents(split='validation')
  ids = text.pack_documents(docs, lm, context_len, max_contexts=batch_size)
  acts = lm.activations(ids, SITE)
  params = {k: jnp.asarray(v) for k, v in sae.params.items()}
  mask = jnp.ones(batch_size * (context_len - 1), jnp.float32)
  step = evaluate._lm_step_fn(sae.spec, evaluate.TOP_K)
  return {
      'activations': _best(lambda: lm.activations(ids, SITE)),
      'ce_replaced': _best(
          lambda: lm.cross_entropy(
              ids, SITE, evaluate.replace_activation, splice_params=acts, splice_from=0
          )
      ),
      'ce_full_pass': _best(lambda: lm.cross_entropy(ids)),
      'sae_step': _best(lambda: step(params, acts, mask)),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--num_saes', type=int, default=4)
  parser.add_argument('--d_sae', type=int, default=2304)
  parser.add_argument('--num_tokens', type=int, default=20_000)
  parser.add_argument('--context_len', type=int, default=128)
  parser.add_argument('--batch_size', type=int, default=8)
  args = parser.parse_args()
  hostmem.keep_host_memory_on_cpu()  # as the launchers do; before any JAX work
  lm = lm_lib.load()
  if args.workdir:
    saes = gsae_jax.load(args.workdir)
    saes = saes if isinstance(saes, list) else [saes]
  else:
    saes = random_saes(
        args.num_saes, lm.d_model, args.d_sae, args.context_len, args.batch_size
    )
  parts = breakdown(lm, saes[0], args.context_len, args.batch_size)
  tokens = args.batch_size * args.context_len
  print(f'one batch of {args.batch_size}x{args.context_len} tokens:')
  for name, seconds in parts.items():
    print(f'  {name:>13}: {seconds:.3f} s ({tokens / seconds:,.0f} tok/s)')
  per_batch = parts['activations'] + (2 + len(saes)) * (
      parts['ce_replaced'] + parts['sae_step']
  )
  print(
      f'  predicted per batch for {len(saes)} SAEs: {per_batch:.2f} s '
      f'(with full-pass CE runs: '
      f'{parts["activations"] + (2 + len(saes)) * parts["ce_full_pass"]:.2f} s)'
  )
  start = time.perf_counter()
  results = evaluate.evaluate(
      saes,
      lm,
      num_tokens=args.num_tokens,
      context_len=args.context_len,
      batch_size=args.batch_size,
  )
  seconds = time.perf_counter() - start
  n = results[0]['num_tokens']
  print(
      json.dumps(
          {
              'num_saes': len(saes),
              'd_sae': [int(s.d_sae) for s in saes],
              'tokens': int(n),
              'seconds': round(seconds, 1),
              'tokens_per_s': round(n / seconds, 1),
              'breakdown_s': {k: round(v, 3) for k, v in parts.items()},
          }
      )
  )


if __name__ == '__main__':
  main()
