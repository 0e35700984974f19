r"""Harvest throughput against its ceiling: the bare LM forward on the same batches.

  python benchmarks/bench_harvest.py                   # 64 contexts x 128, layer 15
  python benchmarks/bench_harvest.py --contexts=128 --sites=blocks.5.hook_resid_post,blocks.15.hook_resid_post

(from the repository root, with gsae_jax installed). Per round, in one
process, on the same contexts (the bundled corpus, the main job's shapes:
lm_batch 8, context 128):

  bare:    LanguageModel.activations_at on each batch of contexts, blocking on
           the result and nothing else: the ceiling a harvest can reach;
  harvest: gsae_jax.data.harvest.harvest of the same contexts into a fresh
           local store (tokenising, the forward pass, dropping position 0 and
           outliers, float16 conversion, checksummed chunk writes, shard
           markers and the manifest).

Prints tokens/s of each and harvest / bare (target >= 0.9), medians over
--rounds interleaved rounds (compilation excluded: one warm-up of each).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import smollm2  # noqa: E402
from gsae_jax import lm as lm_lib  # noqa: E402
from gsae_jax.backends import hostmem  # noqa: E402
from gsae_jax.data import harvest, text  # noqa: E402


def _config(root, contexts, sites):
  c = smollm2.get_config()
  c.data.cache_dir = os.path.join(root, '{site}')
  c.harvest.sites = tuple(sites)
  c.harvest.site = sites[0]
  c.harvest.num_tokens = contexts * (c.harvest.context_len - 1)
  return c


def _bare(model, config, sites):
  h = config.harvest
  docs = text.iter_documents(h.dataset, split=h.split)
  contexts = list(text.iter_contexts(docs, model, int(h.context_len)))
  n = int(h.num_tokens) // (int(h.context_len) - 1)
  contexts = contexts[:n] if len(contexts) >= n else contexts
  b = int(h.lm_batch_size)
  t = time.perf_counter()
  for start in range(0, len(contexts), b):
    ids = contexts[start : start + b]
    ids = ids + [ids[-1]] * (b - len(ids))
    for a in model.activations_at(np.stack(ids), tuple(sites)):
      a.block_until_ready()
  return time.perf_counter() - t


def _harvest(model, config, root):
  shutil.rmtree(root, ignore_errors=True)
  t = time.perf_counter()
  harvest.harvest(config, model=model, process_index=0, process_count=1)
  return time.perf_counter() - t


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--contexts', type=int, default=64)
  parser.add_argument('--sites', default='blocks.15.hook_resid_post')
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  hostmem.keep_host_memory()
  sites = args.sites.split(',')
  model = lm_lib.load()
  root = tempfile.mkdtemp(prefix='bench_harvest_')
  config = _config(root, args.contexts, sites)
  tokens = args.contexts * (config.harvest.context_len - 1)  # rows kept
  warm = _config(root + '_warm', 8, sites)
  _bare(model, warm, sites)
  _harvest(model, warm, root + '_warm')
  bare, harv = [], []
  for r in range(args.rounds):
    bare.append(_bare(model, config, sites))
    harv.append(_harvest(model, config, root))
    print(
        f'round {r}: bare {tokens / bare[-1]:,.0f} tok/s, harvest '
        f'{tokens / harv[-1]:,.0f} tok/s, ratio {bare[-1] / harv[-1]:.3f}',
        flush=True,
    )
  result = {
      'contexts': args.contexts,
      'sites': sites,
      'bare_tokens_per_s': tokens / float(np.median(bare)),
      'harvest_tokens_per_s': tokens / float(np.median(harv)),
      'ratio': float(np.median(np.asarray(bare) / np.asarray(harv))),
  }
  print(json.dumps(result, indent=1))
  print(f'harvest / bare forward = {result["ratio"]:.3f} (target >= 0.9)')
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'bench_harvest.json'), 'w') as f:
    json.dump(result, f, indent=1)
  shutil.rmtree(root, ignore_errors=True)
  shutil.rmtree(root + '_warm', ignore_errors=True)


if __name__ == '__main__':
  main()
