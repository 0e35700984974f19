"""Harvest: run the LM over text once and store its activations as a cache.

Documents from a TFDS text dataset are tokenised and packed into contexts of
`harvest.context_len` tokens (stream order, no BOS: SmolLM2 adds none); the LM
runs up to the site; position 0 of every context (an attention sink, ~100x the
median norm, docs/design.md §3) is dropped and the other positions are appended to a
`cache.CacheWriter`. The contexts are a pure function of the config, so an
interrupted harvest resumes: the writer keeps its complete shards, the
harvest skips the contexts they hold without running the LM on them, and the
finished cache is byte-identical to an uninterrupted one. The manifest is
written last; until then the cache does not look complete.
"""

from __future__ import annotations

import itertools
import json
import os

import ml_collections
import numpy as np

from gsae_jax import config as config_lib
from gsae_jax import logs
from gsae_jax.data import cache as cache_lib
from gsae_jax.data import text


def _model_path(h: ml_collections.ConfigDict) -> str | None:
  return h.model or None


def _contexts(model, h: ml_collections.ConfigDict):
  docs = text.iter_documents(
      h.dataset, split=h.split, data_dir=h.data_dir or None, text_key=h.text_key
  )
  # BOS first where the model's tokenizer config says so (e.g. Gemma).
  bos_id = getattr(model, 'context_bos_id', None)
  return text.iter_contexts(docs, model, int(h.context_len), bos_id=bos_id)


def harvest(
    config: ml_collections.ConfigDict, cache_dir: str | None = None, model=None
) -> dict:
  """Writes (or completes) the cache at `cache_dir` (default data.cache_dir).

  Returns the cache's manifest. A complete cache with the same model, site and
  width is left as it is; one with others is an error.
  """
  from gsae_jax import lm as lm_lib  # noqa: PLC0415 (heavy; only harvest needs it)

  config_lib.validate(config)
  h = config.harvest
  cache_dir = cache_dir or config.data.cache_dir
  if not cache_dir:
    raise ValueError('config.data.cache_dir: required to harvest (where to write)')
  # The text must exist before the LM is loaded or the cache directory made.
  text.get_builder(h.dataset, h.data_dir or None)
  model = model or lm_lib.load(_model_path(h), dtype=h.get('model_dtype', 'float32'))
  model.site(h.site)  # a bad site fails here, before any work
  model.check_seq_len(int(h.context_len))  # and a context the model cannot run
  model_name = getattr(model, 'name', '') or os.path.basename(model.path)
  manifest_path = os.path.join(cache_dir, cache_lib.MANIFEST)
  if os.path.exists(manifest_path):
    done = cache_lib.Cache(cache_dir, d_in=model.d_model, verify='none')
    manifest = done.manifest
    done.close()
    if (manifest['model'], manifest['site']) != (model_name, h.site):
      raise cache_lib.CacheError(
          f'{manifest_path}: a complete cache of {manifest["model"]} at '
          f'{manifest["site"]}, not {model_name} at {h.site}; use another '
          'data.cache_dir'
      )
    logs.info(f'cache {cache_dir} is complete ({manifest["count"]:,} activations)')
    return manifest

  lm_batch = int(h.lm_batch_size)
  metadata = {
      'dataset': h.dataset,
      'split': h.split,
      'context_len': int(h.context_len),
      'dropped_positions': [0],
      'outlier_norm_factor': float(h.outlier_norm_factor),
  }
  with cache_lib.CacheWriter(
      cache_dir,
      d_in=model.d_model,
      dtype=h.dtype,
      model=model_name,
      site=h.site,
      shard_rows=int(h.shard_rows),
      record_rows=int(h.record_rows),
      metadata=metadata,
  ) as writer:
    journal = _Journal(os.path.join(cache_dir, JOURNAL))
    skip, rows = journal.resume_point(writer.resumed_rows)
    if writer.resumed_rows:
      logs.info(f'resuming harvest into {cache_dir} after {writer.resumed_rows:,} rows')
    contexts = _contexts(model, h)
    progress = logs.Progress('harvest', int(h.num_tokens), 'activations', rows)
    done, dropped = 0, 0
    while rows < int(h.num_tokens):
      ids = list(itertools.islice(contexts, lm_batch))
      if not ids:
        break
      done += len(ids)
      if done <= skip:
        continue  # stored by an earlier, interrupted harvest
      n = len(ids)
      ids += [ids[-1]] * (lm_batch - n)  # one compiled shape; padding dropped
      acts = np.asarray(model.activations(np.stack(ids), h.site))[:n, 1:]
      acts = acts.reshape(-1, model.d_model)
      keep = inliers(acts, float(h.outlier_norm_factor))
      dropped += int(acts.shape[0] - keep.sum())
      acts = acts[keep][: int(h.num_tokens) - rows]
      writer.append(acts, start_row=rows)
      rows += acts.shape[0]
      journal.record(done, rows)
      progress.update(rows)
    if rows < int(h.num_tokens):
      logs.info(
          f'the text ran out after {rows:,} activations '
          f'(harvest.num_tokens asked for {int(h.num_tokens):,})'
      )
    if dropped:
      logs.info(f'dropped {dropped:,} outlier activations (norm > factor x median)')
    manifest = writer.finish()
  os.remove(journal.path)
  return manifest


JOURNAL = 'harvest_journal.jsonl'


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


class _Journal:
  """(contexts consumed, rows stored) after every LM batch, for resuming.

  Rows per context vary (outliers are dropped), so the writer's row count
  alone does not say where the text stream stands. Lines are appended and
  fsynced; a torn last line is ignored.
  """

  def __init__(self, path: str):
    self.path = path

  def resume_point(self, resumed_rows: int) -> tuple[int, int]:
    """The newest (contexts, rows) with rows <= the rows kept by the writer."""
    best = (0, 0)
    if resumed_rows and os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            contexts, rows = json.loads(line)
          except (ValueError, TypeError):
            continue
          if rows <= resumed_rows and rows >= best[1]:
            best = (contexts, rows)
    elif os.path.exists(self.path):
      os.remove(self.path)
    return best

  def record(self, contexts: int, rows: int) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps([contexts, rows]) + '\n')
      f.flush()
      os.fsync(f.fileno())
