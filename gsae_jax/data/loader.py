"""Shuffled, exactly resumable training batches from an activation store, on grain.

The pipeline (grain's MapDataset / IterDataset):

  record ids 0..R-1                       a record = one zarr chunk of the store
    [p::P]                                this process's records (per-process
                                          sharding: every P-th record, so each
                                          process sees all shards and texts)
    .shuffle(seed).repeat()               a global record order, new each epoch
    .batch(k)                             windows of k records (~shuffle_buffer
                                          rows)
    .map(read window)                     the k records read concurrently into
                                          memory; yields the window's row
                                          permutation (seeded per window)
    [w:]                                  resume at window w ...
    -> iter, prefetch 1 window ahead
    Rebatch(local_batch)                  ... and row offset in it
    .map(gather, to float32)              one gather per batch from its window
    ThreadPrefetch                        batches ready ahead of the step

Rows are shuffled by NumPy gathers, not as grain elements: one element per
activation row would cost grain's per-element overhead (microseconds) a
million times per window.

A batch is a pure function of (store, seed, shuffle_buffer, batch_size, step,
process slice). The state saved with a checkpoint is the step (plus the
settings it depends on); restoring finds the window and offset of that step
by summing window sizes (record lengths only, no data is read), so a kill -9
and resume yields exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from gsae_jax.data import store as store_lib

DEFAULT_SHUFFLE_BUFFER = 1 << 20  # rows; the paper used ~1e6 [P App. D]


class StoreRecords:
  """A store's records as a grain random-access source ([rows, d_in] each)."""

  def __init__(self, store: store_lib.Store):
    self.store = store

  def __len__(self) -> int:
    return self.store.num_records

  def __getitem__(self, index: int) -> np.ndarray:
    return self.store.read_records([index])

  def _getitems(self, indices) -> list[np.ndarray]:
    """Many records at once, read concurrently (grain's batched read)."""
    indices = list(indices)
    x = self.store.read_records(indices)
    cuts = np.cumsum([self.store.records[i, 1] for i in indices])[:-1]
    return np.split(x, cuts)


class ActivationLoader:
  """Endless batches [batch_size / process_count, d_in] from a store.

  loader = ActivationLoader(store, batch_size=4096, seed=0)
  loader.set_state(saved)        # optional: resume exactly
  x = next(loader)               # float32 [4096 / P, d_in]
  saved = loader.get_state()     # JSON-able; saved with each checkpoint
  """

  def __init__(
      self,
      store: store_lib.Store | str,
      *,
      batch_size: int,
      seed: int = 0,
      shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
      shuffle: bool = True,
      d_in: int | None = None,
      process_index: int = 0,
      process_count: int = 1,
      prefetch: int = 4,
      dtype: Any = np.float32,
      with_rows: bool = False,
  ):
    """Creates a loader; nothing is read until the first batch.

    Args:
      store: a Store or its path.
      batch_size: GLOBAL batch size B (all processes together).
      seed: shuffle seed.
      shuffle_buffer: rows per shuffle window (whole records, at least one,
        at most this process's records).
      shuffle: False streams the process's records in stored order.
      d_in: expected activation width.
      process_index, process_count: this process's slice; B % P == 0.
      prefetch: batches prepared ahead.
      dtype: float32 (default) or the store's disk dtype.
      with_rows: next() returns (logical row ids [b], batch) instead.
    """
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(
          f'batch_size ({batch_size}) must be a positive multiple of process_count '
          f'({process_count})'
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    self.store = (
        store
        if isinstance(store, store_lib.Store)
        else store_lib.Store(store, d_in=d_in)
    )
    if d_in is not None and self.store.d_in != d_in:
      raise store_lib.StoreError(
          f'activation store {self.store.path} holds d_in={self.store.d_in}, '
          f'expected {d_in}'
      )
    self.dtype = np.dtype(dtype)
    if self.dtype not in (np.dtype(np.float32), self.store.dtype):
      raise ValueError(f'dtype must be float32 or {self.store.dtype}, got {self.dtype}')
    n_records = self.store.num_records
    if n_records < process_count:
      raise store_lib.StoreError(
          f'activation store {self.store.path} has {n_records} records '
          f'({self.store.num_rows} rows), fewer than process_count={process_count}; '
          'harvest more activations or use fewer processes'
      )
    self.batch_size = int(batch_size)
    self.local_batch_size = self.batch_size // process_count
    self.seed, self.shuffle = int(seed), bool(shuffle)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.prefetch = max(1, int(prefetch))
    self.with_rows = with_rows
    self.d_in = self.store.d_in
    self.num_rows = self.store.num_rows
    local = np.arange(process_index, n_records, process_count)
    self._record_len = self.store.records[:, 1]  # [n_records]
    self.local_rows = int(self._record_len[local].sum())
    self.records_per_window = int(
        min(max(1, shuffle_buffer // self.store.record_rows), len(local))
    )

    ids = grain.MapDataset.range(n_records)[process_index::process_count]
    if self.shuffle:
      ids = ids.shuffle(seed=self.seed)
    # Windows of record ids, in stream order; each epoch reshuffled.
    self._window_ids = ids.repeat().batch(
        self.records_per_window, batch_fn=lambda items: np.asarray(items, np.int64)
    )
    self._window_ends: list[int] = [0]  # local stream row where window w ends
    self._step = 0
    self._iter: Iterator | None = None
    self._cancel = threading.Event()

  # -- the deterministic stream ---------------------------------------------

  def _read_window(
      self, window: int, record_ids: np.ndarray, data: dict, cancel: threading.Event
  ) -> dict[str, np.ndarray]:
    """Reads one window into `data[window]`; returns its shuffled positions.

    The rows stay in record order in memory (one copy); what grain rebatches
    is the window's permutation (4 bytes a row), and each batch is then one
    gather from the window: the same work as a bare in-memory gather, where
    permuting the window itself would copy every row once more.
    """
    x = self.store.read_records(record_ids.tolist(), cancel)  # [W, d_in]
    rows = np.concatenate([self.store.record_rows_of(int(r)) for r in record_ids])
    data[window] = (rows, x)
    if self.shuffle:
      rng = np.random.default_rng(
          [self.seed, self.process_index, self.process_count, window]
      )
      pos = rng.permutation(len(rows))
    else:
      pos = np.arange(len(rows))
    return {'pos': pos, 'window': np.full(len(rows), window, np.int64)}

  def _gather(self, batch: dict[str, np.ndarray], data: dict) -> dict[str, np.ndarray]:
    """A batch's rows from its window(s), converted; frees passed windows."""
    windows = batch['window']
    first, last = int(windows[0]), int(windows[-1])  # ascending in a batch
    rows, xs = [], []
    for w in range(first, last + 1):
      pos = batch['pos'][windows == w] if first != last else batch['pos']
      window_rows, window_x = data[w]
      rows.append(window_rows[pos])
      xs.append(np.take(window_x, pos, axis=0).astype(self.dtype, copy=False))
    for w in [w for w in list(data) if w < last]:  # no later batch needs them
      data.pop(w, None)
    if len(xs) == 1:
      return {'rows': rows[0], 'x': xs[0]}
    return {'rows': np.concatenate(rows), 'x': np.concatenate(xs)}

  def _window_start(self, step: int) -> tuple[int, int]:
    """(window, row offset in it) where batch `step` begins."""
    target = step * self.local_batch_size
    ends = self._window_ends
    while ends[-1] <= target:
      ids = self._window_ids[len(ends) - 1]
      ends.append(ends[-1] + int(self._record_len[ids].sum()))
    window = int(np.searchsorted(ends, target, side='right')) - 1
    return window, target - ends[window]

  def _pipeline(self, step: int) -> Iterator:
    window, offset = self._window_start(step)
    cancel = self._cancel = threading.Event()
    data: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # window -> (rows, x)
    windows = self._window_ids[window:].map_with_index(
        lambda i, ids: self._read_window(window + i, ids, data, cancel)
    )
    if offset:
      trim = offset
      windows = windows.map_with_index(
          lambda i, w: w if i else {k: v[trim:] for k, v in w.items()}
      )
    batches = windows.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
    )
    batches = grain.experimental.RebatchIterDataset(
        batches, batch_size=self.local_batch_size
    )
    batches = batches.map(lambda b: self._gather(b, data))
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=self.prefetch
    )
    return iter(batches)

  # -- iteration -------------------------------------------------------------

  def __iter__(self) -> ActivationLoader:
    return self

  def __next__(self):
    """The next batch (never raises StopIteration)."""
    if self._iter is None:
      self._iter = self._pipeline(self._step)
    batch = next(self._iter)
    self._step += 1
    return (batch['rows'], batch['x']) if self.with_rows else batch['x']

  @property
  def step(self) -> int:
    """Index of the batch next() returns next."""
    return self._step

  @property
  def epoch(self) -> int:
    """This process's epoch at the next batch's first row."""
    return self._step * self.local_batch_size // self.local_rows

  def get_state(self) -> dict[str, Any]:
    """The position as a small JSON-able dict (saved with each checkpoint).

    'step' is the position; the other entries are the settings the batches
    depend on, checked by set_state.
    """
    return {
        'step': self._step,
        'epoch': self.epoch,
        'seed': self.seed,
        'batch_size': self.batch_size,
        'num_rows': self.num_rows,
        'records_per_window': self.records_per_window,
        'shuffle': self.shuffle,
        'process_count': self.process_count,
        'reader': 'grain',
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a position from get_state().

    A state saved with another process_count is accepted: the loader moves
    to the same step, but each process now owns other records.

    Raises:
      StoreError: the state was saved for another store or shuffle setting.
    """
    mine = self.get_state()
    for key in ('seed', 'batch_size', 'num_rows', 'shuffle'):
      if key in state and state[key] != mine[key]:
        raise store_lib.StoreError(
            f'reader state was saved with {key}={state[key]!r} but this reader of '
            f'{self.store.path} has {key}={mine[key]!r}; use the same settings to '
            'resume exactly'
        )
    if (
        state.get('process_count', self.process_count) == self.process_count
        and 'records_per_window' in state
        and state['records_per_window'] != self.records_per_window
    ):
      raise store_lib.StoreError(
          f'reader state was saved with records_per_window='
          f'{state["records_per_window"]} but this reader of {self.store.path} has '
          f'{self.records_per_window} (data.shuffle_buffer changed); use the same '
          'settings to resume exactly'
      )
    if 'step' not in state or int(state['step']) < 0:
      raise store_lib.StoreError(f'reader state {dict(state)!r} has no valid step')
    self.close()
    self._step = int(state['step'])

  def close(self) -> None:
    """Stops the pipeline's threads (cancelling reads in flight); a later
    next() rebuilds it."""
    if self._iter is not None:
      self._cancel.set()
      self._iter.close()  # grain closes the whole chain of iterators
      self._iter = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass

  def __enter__(self) -> ActivationLoader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
