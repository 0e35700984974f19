"""The training loop: train_and_evaluate(config, workdir), and train_together
for several runs (a sweep's groups) on one pass over the data.

Reads top to bottom: validate, place each run's state (fresh or restored),
compile its step, loop (read a batch once; each run steps on it, logs,
evaluates on held-out data, resamples, checkpoints), and stop cleanly on
SIGTERM/SIGINT or a NaN with the step that went bad. One run is a pass of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from gsae_jax import backends, files, logs
from gsae_jax import config as config_lib
from gsae_jax.data import sources
from gsae_jax.sae import models
from gsae_jax.train import checkpoints, placement
from gsae_jax.train import step as step_lib
from gsae_jax.train.state import (
    TrainState,
    hparams_from_config,
    init_state,
    seeds_from_config,
)


class Preempted(Exception):  # noqa: N818 (it is a stop, not an error)
  """Training stopped on SIGTERM/SIGINT or preemption after a checkpoint."""

  def __init__(self, step: int):
    super().__init__(f'stopped at step {step} with a checkpoint; re-run to resume')
    self.step = step


# The exit status of a run stopped by a signal after checkpointing: "resume me".
EXIT_RESUME = 75


def _check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir holding a run of another config (writes nothing)."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      stored = config_lib.with_defaults(json.load(f))
    diffs = config_lib.incompatible_fields(stored, config)
    if diffs:
      raise ValueError(
          f'workdir {workdir} holds a run of another config; differing fields:\n  '
          + '\n  '.join(diffs)
          + '\nUse a new --workdir, or pass the stored config to resume it.'
      )


def _record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json (once the inputs are known to be good)."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    files.atomic_write_text(
        os.path.join(workdir, 'config.json'), config_lib.to_json(config)
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the run in `workdir` to config.train.num_steps.

  Returns the final state (with pmap, one copy of it). Every input is checked
  (config, workdir, mesh, data source) before anything is written.
  """
  return train_together([(config, workdir)])[0]


def train_together(
    runs: Sequence[tuple[ml_collections.ConfigDict, str]],
) -> list[TrainState]:
  """Trains (or resumes) several runs on one pass over their shared data.

  Each batch is read once and every run's own compiled step trains on it;
  each run keeps its own workdir (config.json, checkpoints holding the
  source's position, metrics.jsonl). The runs must read the same data
  (`_STREAM_FIELDS`), so a run gets the batches, normalisation and b_dec
  init it would get alone. Resuming, each run restores its newest checkpoint;
  the pass restarts at the run furthest behind (from the source position in
  its checkpoint), and a run that is ahead (a kill between two runs' saves)
  sits out the batches it has trained on until the pass reaches its step.

  Returns the final states, in the order of `runs`.
  """
  runs = [_prepare(config, workdir) for config, workdir in runs]
  _check_same_stream(runs)
  with contextlib.ExitStack() as cleanup:
    source = sources.make_source(runs[0].config)
    cleanup.callback(source.close)
    wants_heldout = any(run.config.eval.every_steps for run in runs)
    heldout_x = source.heldout_batch() if wants_heldout else None
    for run in runs:
      _record_config(run.config, run.workdir)
      run.manager = checkpoints.Manager(run.workdir, run.config)
      cleanup.callback(run.manager.close)
      warning = backends.slow_dtype_warning(run.spec)
      if warning:
        logs.info(warning)

    # Each run's state: restored, or fresh (the source's statistics are
    # estimated once, before its position is set, as for a run alone).
    statistics = _Statistics(source)
    for run in runs:
      restored = run.manager.restore_latest(run.place.abstract(run.abstract))
      if restored is not None:
        state, run.meta = restored
        run.state = run.place.place(state)
        run.start = int(run.place.host_state(run.state).step)
        logging.info('Resumed %s at step %d.', run.workdir, run.start)
    for run in runs:
      if run.state is None:
        run.state = _fresh_state(run, statistics)
    laggard = min(runs, key=lambda run: run.start)
    start = laggard.start
    if start > 0:
      source.set_state(laggard.meta['data_state'])

    for run in runs:
      config = run.config
      run.train_step, run.resample = run.place.compile(
          step_lib.make_train_step(
              config,
              data_axis='data' if run.place.pmap else None,
              latent_sharding=None if run.place.pmap else run.place.latent_sharding,
          ),
          step_lib.make_resample(config),
      )
      if heldout_x is not None and config.eval.every_steps:
        run.heldout = jax.jit(step_lib.make_heldout_metrics(config))
      run.writer = logs.MetricWriter(
          run.workdir, config, active=jax.process_index() == 0
      )
      cleanup.callback(run.writer.close)
      run.faults = _FaultCheck(config, run.writer, run.name if len(runs) > 1 else '')
    num_steps = max(run.num_steps for run in runs)
    progress = logs.Progress(
        'train',
        num_steps,
        'steps',
        start,
        int(runs[0].config.train.batch_size),
        True,
        0.0,
    )

    with _StopSignals() as stop:
      for step in range(start + 1, num_steps + 1):
        x = runs[0].place.batch(source.next_batch(), source.process_rows)
        # Runs that resumed ahead of the pass have seen this batch.
        due = [run for run in runs if run.start < step <= run.num_steps]
        summaries = []
        for run in due:
          run.state, metrics = run.train_step(run.state, x)
          if (
              run.config.resample.enabled
              and run.resample_every(step)
              and step <= run.config.resample.stop_after_step
          ):
            run.state, n_dead = run.resample(run.state, x)
            run.writer.write(step, {'resampled': run.place.metrics(n_dead)})
          if run.log_every(step):
            metrics = jax.device_get(run.place.metrics(metrics))
            run.faults.check(run.place.host_state(run.state))
            if run.heldout is not None and run.eval_every(step):
              held = run.heldout(run.place.host_state(run.state), heldout_x)
              metrics.update(jax.device_get(held))
            run.writer.write(step, metrics)
            summary = logs.summarize(metrics)
            summaries.append(f'{run.name}: {summary}' if len(runs) > 1 else summary)
        if summaries:
          progress.update(step, ' | '.join(summaries))
        stopping = stop.requested or runs[0].manager.reached_preemption(step)
        for run in due:
          if run.save_every(step) or stopping:
            run.save(step, source.get_state())
        if stopping:
          for run in runs:
            run.manager.wait()
          logs.info(f'{stop.reason or "preemption"}: checkpointed step {step}; exiting')
          raise Preempted(step)
  return [run.place.host_state(run.state) for run in runs]


# What decides a run's batches and where they live: the runs of one data pass
# must agree on these.
_STREAM_FIELDS = ('data', 'synthetic', 'sae.d_in', 'train.batch_size', 'mesh')


@dataclasses.dataclass(eq=False)
class _Run:
  """One run of a data pass: its config and workdir, placement, state and
  periodic work."""

  config: ml_collections.ConfigDict
  workdir: str
  spec: models.SAESpec
  abstract: TrainState
  place: placement.Placement
  state: TrainState | None = None
  start: int = 0  # the step its state starts at (restored, or 0)
  meta: dict | None = None  # the restored checkpoint's record
  manager: Any = None
  writer: Any = None
  faults: Any = None
  train_step: Any = None
  resample: Any = None
  heldout: Any = None

  def __post_init__(self):
    self.num_steps = int(self.config.train.num_steps)
    self.name = os.path.basename(os.path.normpath(self.workdir))
    self.log_every = logs.Every(self.config.log.every_steps, self.num_steps)
    self.save_every = logs.Every(self.config.checkpoint.every_steps, self.num_steps)
    self.resample_every = logs.Every(self.config.resample.every_steps)
    self.eval_every = logs.Every(self.config.eval.every_steps)

  def save(self, step: int, data_state: dict) -> None:
    state = self.place.host_state(self.state)
    self.faults.check(state)  # never checkpoint a NaN state
    self.manager.save(step, state, {'data_state': data_state})


def _prepare(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Checks a run's config, workdir and mesh (writing nothing)."""
  config_lib.validate(config)
  _check_workdir(config, workdir)
  hparams, seeds = hparams_from_config(config), seeds_from_config(config)
  abstract = jax.eval_shape(lambda: init_state(config, hparams, seeds, 1.0))
  return _Run(
      config,
      workdir,
      models.SAESpec.for_run(config),
      abstract,
      placement.Placement(config, abstract),
  )


def _stream_value(config: ml_collections.ConfigDict, name: str) -> Any:
  node = config
  for part in name.split('.'):
    node = node[part]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _check_same_stream(runs: list[_Run]) -> None:
  """Refuses runs that would not read the same batches (or one workdir twice)."""
  if not runs:
    raise ValueError('train_together: no runs given')
  workdirs = [os.path.abspath(run.workdir) for run in runs]
  if len(set(workdirs)) != len(workdirs):
    raise ValueError(f'train_together: a workdir is given twice: {workdirs}')
  first = runs[0]
  for run in runs[1:]:
    differ = [
        f'config.{name}'
        for name in _STREAM_FIELDS
        if _stream_value(run.config, name) != _stream_value(first.config, name)
    ]
    if differ:
      raise ValueError(
          f'{run.workdir} reads other data than {first.workdir} (differing: '
          f'{", ".join(differ)}); runs of one data pass need the same data source, '
          'batch and mesh: train them separately'
      )


class _Statistics:
  """The source's E||x||^2 and E[x], each estimated once and shared by the
  runs that start fresh (the numbers a run trained alone gets)."""

  def __init__(self, source):
    self.source, self._cache = source, {}

  def _get(self, name: str, num_batches: int):
    key = (name, int(num_batches))
    if key not in self._cache:
      self._cache[key] = getattr(self.source, name)(num_batches)
    return self._cache[key]

  def mean_squared_norm(self, num_batches: int) -> float:
    return self._get('mean_squared_norm', num_batches)

  def mean_vector(self, num_batches: int) -> np.ndarray:
    return self._get('mean_vector', num_batches)


def _fresh_state(run: _Run, statistics: _Statistics) -> TrainState:
  """A new state, created sharded: normalisation and b_dec from the source."""
  config = run.config
  scale = 1.0
  if config.train.normalize_activations:
    ms = statistics.mean_squared_norm(config.train.norm_estimate_batches)
    scale = math.sqrt(run.spec.d_in / ms)
  mean = None
  if config.train.b_dec_init == 'mean':
    mean = statistics.mean_vector(config.train.norm_estimate_batches)
    mean = np.asarray(mean) * scale
  hparams, seeds = hparams_from_config(config), seeds_from_config(config)

  def make():
    state = init_state(config, hparams, seeds, scale)
    if mean is not None:
      b_dec = jnp.broadcast_to(
          jnp.asarray(mean, jnp.float32), state.params['b_dec'].shape
      )
      state = state.replace(params={**state.params, 'b_dec': b_dec})
    return state

  return run.place.init(make)


class _StopSignals:
  """Turns SIGTERM/SIGINT into a request to checkpoint and stop after the
  current step (a second SIGINT interrupts at once)."""

  def __init__(self):
    self.requested, self.reason, self._old = False, None, {}

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested, self.reason = True, signal.Signals(signum).name
    logs.info(f'{self.reason}: finishing the step, then checkpointing')

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


class _FaultCheck:
  """Stops on (or reports) NaN/Inf recorded in the state, naming step and SAE."""

  def __init__(self, config: ml_collections.ConfigDict, writer, name: str = ''):
    self.freeze = config.train.on_nonfinite == 'freeze'
    self.writer = writer
    self.where = f'{name}: ' if name else ''  # which run of a shared data pass
    self.reported: set[int] = set()

  def check(self, state: TrainState) -> None:
    bad_input = int(jax.device_get(state.bad_input_step))
    bad = np.asarray(jax.device_get(state.bad_step))
    if bad_input >= 0 and not self.freeze:
      raise FloatingPointError(
          f'{self.where}non-finite values (NaN/Inf) in the input batch of step {bad_input}; '
          'no checkpoint after it was written. Check the activation cache.'
      )
    idx = np.flatnonzero(bad >= 0)
    if idx.size and not self.freeze:
      detail = ', '.join(f'SAE {i} at step {bad[i]}' for i in idx)
      raise FloatingPointError(
          f'{self.where}non-finite loss: {detail}; the last checkpoint before it is intact. '
          'Lower train.lr, or set train.on_nonfinite=freeze to go on without it.'
      )
    for i in idx:
      if int(i) not in self.reported:
        self.reported.add(int(i))
        logs.info(
            f'WARNING: {self.where}SAE {i} had a non-finite loss at step {bad[i]}; frozen'
        )


def load_metrics(workdir: str) -> list[dict]:
  """The records of a run's metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
