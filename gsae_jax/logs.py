"""Metrics logging (JSONL and TensorBoard), the progress line, periodic work."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from gsae_jax import files


class Every:
  """Answers "is it time?" for periodic work at steps 1..num_steps.

  True every `period` steps, and at `last` (the final step) if given.
  """

  def __init__(self, period: int, last: int | None = None):
    self.period, self.last = int(period), last

  def __call__(self, step: int) -> bool:
    return (self.period > 0 and step % self.period == 0) or step == self.last


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    return value.item()
  return value.tolist()


class MetricWriter:
  """Appends one JSON record per logged step to metrics.jsonl (and TensorBoard).

  Per-SAE metrics of a stack are lists, index i for SAE i. On resume, records
  at or after the first step written again are replaced, so the file has one
  record per step.
  """

  def __init__(self, workdir: str, config: Any, active: bool = True):
    self.active = active
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not active:
      return
    if config.log.tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional, slow import)

      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._resumed_from: int | None = None

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    record = {'step': int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    if self._resumed_from is None:
      self._drop_records_from(step)
      self._resumed_from = step
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for name, value in record.items():
        if name == 'step':
          continue
        values = np.asarray(value, np.float64).reshape(-1)
        for i, v in enumerate(values):
          tag = name if values.size == 1 else f'{name}/sae_{i}'
          self._tb.add_scalar(tag, float(v), step)

  def _drop_records_from(self, step: int) -> None:
    """Forgets records a resumed run is about to write again."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
      try:
        if json.loads(ln)['step'] < step:
          keep.append(ln)
      except (json.JSONDecodeError, KeyError):
        continue  # a line torn by a kill: drop it
    if len(keep) != len(lines):
      files.atomic_write_text(self.path, ''.join(keep))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """The one progress display: `label: done/total unit (pct) | tok/s | ETA | extra`.

  Harvest, training and evaluation all report through it, on stderr, from
  process 0 only. `tokens_per_unit` turns the rate of `unit` into tokens/s
  (a training step is batch_size tokens). With `first_compiles`, the first
  update (which includes compilation) restarts the clock and shows
  'compiling'. Lines come at most every `min_interval` seconds, and always at
  the end.
  """

  def __init__(
      self,
      label: str,
      total: int,
      unit: str = 'tokens',
      start: int = 0,
      tokens_per_unit: int = 1,
      first_compiles: bool = False,
      min_interval: float = 2.0,
      enabled: bool = True,
      stream=None,
  ):
    self.label, self.total, self.unit = label, int(total), unit
    self.tokens_per_unit = tokens_per_unit
    self.min_interval, self.enabled = min_interval, enabled
    self.stream = stream or sys.stderr
    self._compiling = first_compiles
    self._t0 = self._last = time.perf_counter()
    self._done0 = start

  def update(self, done: int, extra: str = '') -> None:
    now = time.perf_counter()
    if self._compiling:
      self._compiling = False
      self._t0, self._done0 = now, done
      rate = math.nan
    elif now - self._last < self.min_interval and done < self.total:
      return
    else:
      rate = (done - self._done0) / max(now - self._t0, 1e-9)
    self._last = now
    if not self.enabled:
      return
    eta = (self.total - done) / rate if rate > 0 else math.nan
    tokens = rate * self.tokens_per_unit
    parts = [
        f'{self.label}: {done:,}/{self.total:,} {self.unit} '
        f'({100 * done / max(self.total, 1):.0f}%)',
        f'{tokens:,.0f} tok/s' if math.isfinite(tokens) else 'compiling',
        f'ETA {format_duration(eta)}',
    ]
    if extra:
      parts.append(extra)
    _print(' | '.join(parts), self.stream)


def summarize(metrics: dict, names: tuple[str, ...] = ('loss', 'l0', 'fvu')) -> str:
  """'loss 0.12 | L0 30.1 | FVU 0.05' (a stack's min..max) for a progress line."""

  def show(name):
    v = np.asarray(metrics[name], np.float64).reshape(-1)
    return f'{v.mean():.4g}' if v.size == 1 else f'{v.min():.3g}..{v.max():.3g}'

  labels = {'l0': 'L0', 'fvu': 'FVU'}
  return ' | '.join(f'{labels.get(n, n)} {show(n)}' for n in names if n in metrics)


def _print(message: str, stream=None) -> None:
  import jax  # noqa: PLC0415 (keep this module importable without JAX set up)

  if jax.process_index() == 0:
    print(message, file=stream or sys.stderr, flush=True)


def info(message: str) -> None:
  """A status line for the user on stderr (process 0 only)."""
  _print(message)
