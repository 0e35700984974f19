"""Where training batches come from: a source per `config.data.source`.

A source has one small interface, used by the training loop:
  next_batch() -> [batch, d_in]; mean_squared_norm(n) / mean_vector(n) for the
  activation normalisation and b_dec's init; heldout_batch() (or None);
  get_state() / set_state(dict): a JSON-able position saved with every
  checkpoint, so a resumed run sees exactly the batches it would have;
  close().
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from gsae_jax.data import harvest, loader, store, synthetic


class CacheSource:
  """Training batches from an activation store (launch.harvest).

  Each process reads only its slice of the store through the grain pipeline
  of loader.ActivationLoader, prefetched in background threads, and gets its
  own rows of each global batch.
  """

  process_rows = True  # next_batch() is this process's rows of the batch

  def __init__(self, config: ml_collections.ConfigDict):
    self.eval_path = (
        harvest.train_store(config, 'eval_cache_dir')
        if config.data.eval_cache_dir
        else ''
    )
    self.reader = loader.ActivationLoader(
        harvest.train_store(config),
        batch_size=int(config.train.batch_size),
        seed=int(config.data.seed),
        shuffle_buffer=int(config.data.shuffle_buffer),
        d_in=int(config.sae.d_in),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=int(config.data.prefetch),
    )

  def next_batch(self) -> np.ndarray:
    return next(self.reader)

  def mean_squared_norm(self, num_batches: int) -> float:
    del num_batches  # the manifest has E||x||^2 over the whole store
    return self.reader.store.mean_sq_norm

  def mean_vector(self, num_batches: int) -> np.ndarray:
    del num_batches  # and E[x]
    return np.asarray(self.reader.store.mean, np.float32)

  def heldout_batch(self):
    """The first batch_size rows of data.eval_cache_dir (None if unset)."""
    if not self.eval_path:
      return None
    held = store.Store(self.eval_path, d_in=self.reader.d_in)
    return held.read_range(0, min(self.reader.batch_size, held.num_rows))

  def get_state(self) -> dict:
    return self.reader.get_state()

  def set_state(self, state: dict) -> None:
    self.reader.set_state(state)

  def close(self) -> None:
    self.reader.close()


def make_source(config: ml_collections.ConfigDict):
  """The activation source named by config.data."""
  if config.data.source == 'synthetic':
    return synthetic.SyntheticSource(
        config.synthetic, config.sae.d_in, config.train.batch_size
    )
  check_source(config)
  return CacheSource(config)


def check_source(config: ml_collections.ConfigDict) -> None:
  """Raises the error `make_source` would (a missing or mismatched store),
  without starting a reader: for callers that must check before writing."""
  if config.data.source != 'cache':
    return
  for field in ('cache_dir', 'eval_cache_dir'):
    if field == 'eval_cache_dir' and not (
        config.data[field] and config.eval.every_steps
    ):
      continue
    path = harvest.train_store(config, field)
    if store.is_local(path) and not os.path.isdir(path):
      raise FileNotFoundError(
          f'config.data.{field}: {path} does not exist; write it with '
          'python -m launch.harvest --config=<the same config>'
      )
    store.Store(path, d_in=int(config.sae.d_in))
