"""Metrics logging (JSONL and TensorBoard), progress lines, periodic work."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` so readers see the old file or the new, never half."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      dir=directory, prefix='.tmp-', suffix=os.path.basename(path)
  )
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


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
      atomic_write_text(self.path, ''.join(keep))

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
  """Prints one progress line per logged step: tokens/s and ETA."""

  def __init__(self, num_steps: int, batch_size: int, start_step: int, stream=None):
    self.num_steps, self.batch_size = num_steps, batch_size
    self.stream = stream or sys.stderr
    self._t0, self._step0 = time.perf_counter(), start_step
    self._first = True

  def update(self, step: int, metrics: dict) -> None:
    now = time.perf_counter()
    if self._first:
      # The first interval includes compilation: restart the clock here.
      self._first = False
      self._t0, self._step0 = now, step
      rate = float('nan')
    else:
      rate = (step - self._step0) / max(now - self._t0, 1e-9)
    tokens_per_s = rate * self.batch_size
    eta = (self.num_steps - step) / rate if rate > 0 else float('nan')

    def show(name):
      v = np.asarray(metrics[name], np.float64).reshape(-1)
      return f'{v.mean():.4g}' if v.size == 1 else f'{v.min():.3g}..{v.max():.3g}'

    parts = [
        f'step {step}/{self.num_steps}',
        f'{tokens_per_s:,.0f} tok/s' if math.isfinite(tokens_per_s) else 'compiling',
        f'ETA {format_duration(eta)}',
        f'loss {show("loss")}',
        f'L0 {show("l0")}',
        f'FVU {show("fvu")}',
    ]
    print(' | '.join(parts), file=self.stream, flush=True)


def info(message: str) -> None:
  """A status line for the user on stderr (process 0 only)."""
  import jax  # noqa: PLC0415 (keep this module importable without JAX set up)

  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)
