"""Harvest: run the LM over text once and store its activations, site by site.

Documents from a TFDS text dataset are tokenised and packed into contexts of
`harvest.context_len` tokens (stream order, no BOS: SmolLM2 adds none); the LM
runs ONCE per batch of contexts up to the deepest of `harvest.sites` and every
site's activations go to that site's store (`store_path`); position 0 of every
context (an attention sink, ~100x the median norm, docs/design.md §3) and
outliers are dropped.

Work is split in shards (store.py): shard s holds contexts
[s * cps, (s + 1) * cps), cps = shard_rows // (context_len - 1), a function
of the config alone. Process p of P harvests the shards s with s % P == p
that are not complete yet, so:
  - many processes (--num_processes/--process_id, or jax.distributed) harvest
    disjoint shards, each writing its own chunks;
  - a killed process re-run with the same arguments redoes only its
    unfinished shards;
  - the store is marked complete (its manifest written) once, by the process
    that finds every shard done; the result is byte-identical to a
    one-process harvest.
Every process reads the text stream from its start (tokenising is ~100x
cheaper than the LM) and runs the LM only on its own shards' contexts.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator

import ml_collections
import numpy as np

from gsae_jax import config as config_lib
from gsae_jax import logs
from gsae_jax.data import store as store_lib
from gsae_jax.data import text


def sites(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The sites a harvest writes: harvest.sites, or (harvest.site,)."""
  return tuple(config.harvest.sites) or (config.harvest.site,)


def store_path(path: str, site: str, n_sites: int = 1) -> str:
  """A site's store: `path` with '{site}' replaced by the hook name.

  Raises:
    ValueError: several sites but no '{site}' in the path.
  """
  if '{site}' in path:
    return path.replace('{site}', site)
  if n_sites > 1:
    raise ValueError(
        f"config.data.cache_dir: {path!r} must contain '{{site}}' to hold the "
        f'stores of {n_sites} sites (e.g. cache/smollm2/{{site}})'
    )
  return path


def train_store(config: ml_collections.ConfigDict, field: str = 'cache_dir') -> str:
  """The store a training run reads: data.<field> at harvest.site."""
  return store_path(config.data[field], config.harvest.site)


def _shard_plan(h: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(contexts per shard, contexts, shards) for the harvest settings."""
  rows_per_context = int(h.context_len) - 1  # position 0 is dropped
  per_shard = int(h.shard_rows) // rows_per_context
  contexts = math.ceil(int(h.num_tokens) / rows_per_context)
  return per_shard, contexts, math.ceil(contexts / per_shard)


def _contexts(model, h: ml_collections.ConfigDict) -> Iterator[np.ndarray]:
  docs = text.iter_documents(
      h.dataset, split=h.split, data_dir=h.data_dir or None, text_key=h.text_key
  )
  # BOS first where the model's tokenizer config says so (e.g. Gemma).
  bos_id = getattr(model, 'context_bos_id', None)
  return text.iter_contexts(docs, model, int(h.context_len), bos_id=bos_id)


def harvest(
    config: ml_collections.ConfigDict,
    cache_dir: str | None = None,
    model=None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict[str, dict | None]:
  """Writes (or completes) this process's shards of every site's store.

  Args:
    config: the run config (harvest.*, data.cache_dir).
    cache_dir: overrides data.cache_dir (may hold '{site}').
    model: an already loaded LM (default: harvest.model).
    process_index, process_count: this process's slice of the shards
      (default: jax.process_index() / jax.process_count()).

  Returns:
    {site: manifest}, None for a store still waiting on other processes'
    shards. A complete store of the same model and site is left as it is;
    one of another model or site is an error.
  """
  from gsae_jax import lm as lm_lib  # noqa: PLC0415 (heavy; only harvest needs it)

  config_lib.validate(config)
  h = config.harvest
  if process_index is None or process_count is None:
    import jax  # noqa: PLC0415

    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'--process_id {process_index} not in [0, {process_count})')
  root = cache_dir or config.data.cache_dir
  if not root:
    raise ValueError('config.data.cache_dir: required to harvest (where to write)')
  all_sites = sites(config)
  paths = {s: store_path(root, s, len(all_sites)) for s in all_sites}
  # The text must exist before the LM is loaded or any store is made.
  text.get_builder(h.dataset, h.data_dir or None)
  model = model or lm_lib.load(h.model or None, dtype=h.get('model_dtype', 'float32'))
  for site in all_sites:
    model.site(site)  # a bad site fails here, before any work
  model.check_seq_len(int(h.context_len))  # and a context the model cannot run
  model_name = getattr(model, 'name', '') or os.path.basename(model.path)

  results: dict[str, dict | None] = {}
  for site, path in paths.items():
    if store_lib.exists(path):
      done = store_lib.Store(path, d_in=model.d_model)
      m = done.manifest
      if (m['model'], m['site']) != (model_name, site):
        raise store_lib.StoreError(
            f'{path}: a complete store of {m["model"]} at {m["site"]}, not '
            f'{model_name} at {site}; use another data.cache_dir'
        )
      logs.info(f'store {path} is complete ({m["count"]:,} activations)')
      results[site] = m
  todo_sites = [s for s in all_sites if s not in results]
  if not todo_sites:
    return results

  per_shard, num_contexts, num_shards = _shard_plan(h)
  layout = store_lib.Layout(
      d_in=model.d_model,
      dtype=h.dtype,
      record_rows=int(h.record_rows),
      shard_rows=int(h.shard_rows),
      num_shards=num_shards,
  )
  metadata = {
      'dataset': h.dataset,
      'split': h.split,
      'context_len': int(h.context_len),
      'contexts_per_shard': per_shard,
      'num_contexts': num_contexts,
      'lm_batch_size': int(h.lm_batch_size),
      'dropped_positions': [0],
      'outlier_norm_factor': float(h.outlier_norm_factor),
  }
  writers = {
      s: store_lib.StoreWriter(
          paths[s], layout, model=model_name, site=s, metadata=metadata
      )
      for s in todo_sites
  }
  done = {s: w.done_shards() for s, w in writers.items()}
  # This process's shards, each with the sites still missing it.
  mine = {
      shard: [s for s in todo_sites if shard not in done[s]]
      for shard in range(process_index, num_shards, process_count)
  }
  mine = {shard: ss for shard, ss in mine.items() if ss}
  resumed = len(range(process_index, num_shards, process_count)) - len(mine)
  logs.info(
      f'harvest: {len(mine)} of {num_shards} shards for process {process_index}/'
      f'{process_count} ({per_shard} contexts each)'
      + (f'; {resumed} already done' if resumed else '')
  )
  if mine:
    _harvest_shards(model, h, mine, writers, per_shard, num_contexts)
  for site, writer in writers.items():
    results[site] = writer.finalize()
    if results[site] is None:
      missing = sorted(set(range(num_shards)) - writer.done_shards())
      logs.info(
          f'store {paths[site]}: waiting for shards {missing} from other processes '
          '(the process that finishes last writes the manifest)'
      )
  return results


def _harvest_shards(model, h, mine, writers, per_shard, num_contexts) -> None:
  """Runs the LM over the contexts of the shards in `mine`, shard by shard."""
  lm_batch = int(h.lm_batch_size)
  factor = float(h.outlier_norm_factor)
  expected = sum(
      min(per_shard, num_contexts - s * per_shard) * (int(h.context_len) - 1)
      for s in mine
  )
  progress = logs.Progress('harvest', expected, 'activations', 0)
  contexts = itertools.islice(_contexts(model, h), num_contexts)
  rows_done = 0
  for shard in range(max(mine) + 1):
    block = list(itertools.islice(contexts, per_shard))  # this shard's contexts
    if shard not in mine:
      continue  # another process's, or already stored
    shard_sites = mine[shard]
    shard_writers = {s: writers[s].shard(shard) for s in shard_sites}
    dropped = dict.fromkeys(shard_sites, 0)
    for start in range(0, len(block), lm_batch):
      ids = block[start : start + lm_batch]
      n = len(ids)
      ids = ids + [ids[-1]] * (lm_batch - n)  # one compiled shape; padding dropped
      acts = model.activations_at(np.stack(ids), tuple(shard_sites))
      for site, a in zip(shard_sites, acts, strict=True):
        a = np.asarray(a)[:n, 1:].reshape(-1, model.d_model)
        keep = inliers(a, factor)
        dropped[site] += int(a.shape[0] - keep.sum())
        shard_writers[site].append(a[keep])
      rows_done += n * (int(h.context_len) - 1)
      progress.update(rows_done)
    for site, w in shard_writers.items():
      w.finish(
          first_context=shard * per_shard, contexts=len(block), dropped=dropped[site]
      )
    if len(block) < per_shard and shard * per_shard + len(block) < num_contexts:
      logs.info(
          f'the text ran out in shard {shard} after {shard * per_shard + len(block):,} '
          f'contexts (harvest.num_tokens asked for {num_contexts:,})'
      )


def inliers(acts: np.ndarray, factor: float) -> np.ndarray:
  """Rows whose norm is at most `factor` x the batch's median norm.

  Besides position 0, SmolLM2 makes a few other tokens attention sinks (~0.1%
  of positions, norms 10-150x the median); left in, they would dominate the
  squared-error loss and the normalisation. factor 0 keeps every row.
  """
  if factor <= 0 or acts.shape[0] == 0:
    return np.ones(acts.shape[0], bool)
  norms = np.linalg.norm(acts.astype(np.float32), axis=-1)
  return norms <= factor * np.median(norms)
