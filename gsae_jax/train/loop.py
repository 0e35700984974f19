"""The training loop: train_and_evaluate(config, workdir).

Reads top to bottom: validate, place the state (fresh or restored), compile the
step, loop (log, evaluate on held-out data, resample, checkpoint), and stop
cleanly on SIGTERM/SIGINT or a NaN with the step that went bad.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading

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
  config_lib.validate(config)
  _check_workdir(config, workdir)
  spec = models.SAESpec.for_run(config)
  hparams = hparams_from_config(config)
  seeds = seeds_from_config(config)
  abstract = jax.eval_shape(lambda: init_state(config, hparams, seeds, 1.0))
  place = placement.Placement(config, abstract)
  source = sources.make_source(config)
  try:
    heldout_x = source.heldout_batch() if config.eval.every_steps else None
  except BaseException:
    source.close()
    raise
  _record_config(config, workdir)
  manager = checkpoints.Manager(workdir, config)
  warning = backends.slow_dtype_warning(spec)
  if warning:
    logs.info(warning)

  restored = manager.restore_latest(place.abstract(abstract))
  if restored is not None:
    state, meta = restored
    state = place.place(state)
    source.set_state(meta['data_state'])
    logging.info('Resumed %s at step %d.', workdir, int(meta.get('step', 0)))
  else:
    scale = 1.0
    if config.train.normalize_activations:
      ms = source.mean_squared_norm(config.train.norm_estimate_batches)
      scale = math.sqrt(spec.d_in / ms)
    mean = None
    if config.train.b_dec_init == 'mean':
      mean = np.asarray(source.mean_vector(config.train.norm_estimate_batches)) * scale

    def make():
      state = init_state(config, hparams, seeds, scale)
      if mean is not None:
        b_dec = jnp.broadcast_to(
            jnp.asarray(mean, jnp.float32), state.params['b_dec'].shape
        )
        state = state.replace(params={**state.params, 'b_dec': b_dec})
      return state

    state = place.init(make)

  train_step, resample = place.compile(
      step_lib.make_train_step(
          config,
          data_axis='data' if place.pmap else None,
          latent_sharding=None if place.pmap else place.latent_sharding,
      ),
      step_lib.make_resample(config),
  )
  num_steps = int(config.train.num_steps)
  start = int(place.host_state(state).step)
  writer = logs.MetricWriter(workdir, config, active=jax.process_index() == 0)
  progress = logs.Progress(
      'train', num_steps, 'steps', start, int(config.train.batch_size), True, 0.0
  )
  log_every = logs.Every(config.log.every_steps, num_steps)
  save_every = logs.Every(config.checkpoint.every_steps, num_steps)
  resample_every = logs.Every(config.resample.every_steps)
  faults = _FaultCheck(config, writer)
  eval_every = logs.Every(config.eval.every_steps)
  heldout = (
      jax.jit(step_lib.make_heldout_metrics(config)) if heldout_x is not None else None
  )

  def save(step, state):
    faults.check(place.host_state(state))  # never checkpoint a NaN state
    manager.save(step, place.host_state(state), {'data_state': source.get_state()})

  try:
    with _StopSignals() as stop:
      for step in range(start + 1, num_steps + 1):
        x = place.batch(source.next_batch(), source.process_rows)
        state, metrics = train_step(state, x)
        if (
            config.resample.enabled
            and resample_every(step)
            and step <= config.resample.stop_after_step
        ):
          state, n_dead = resample(state, x)
          writer.write(step, {'resampled': place.metrics(n_dead)})
        if log_every(step):
          metrics = jax.device_get(place.metrics(metrics))
          faults.check(place.host_state(state))
          if heldout is not None and eval_every(step):
            metrics.update(jax.device_get(heldout(place.host_state(state), heldout_x)))
          writer.write(step, metrics)
          progress.update(step, logs.summarize(metrics))
        if save_every(step):
          save(step, state)
        elif stop.requested or manager.reached_preemption(step):
          save(step, state)
        if stop.requested or manager.reached_preemption(step):
          manager.wait()
          logs.info(f'{stop.reason or "preemption"}: checkpointed step {step}; exiting')
          raise Preempted(step)
  finally:
    manager.close()
    writer.close()
    source.close()
  return place.host_state(state)


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

  def __init__(self, config: ml_collections.ConfigDict, writer):
    self.freeze = config.train.on_nonfinite == 'freeze'
    self.writer = writer
    self.reported: set[int] = set()

  def check(self, state: TrainState) -> None:
    bad_input = int(jax.device_get(state.bad_input_step))
    bad = np.asarray(jax.device_get(state.bad_step))
    if bad_input >= 0 and not self.freeze:
      raise FloatingPointError(
          f'non-finite values (NaN/Inf) in the input batch of step {bad_input}; '
          'no checkpoint after it was written. Check the activation cache.'
      )
    idx = np.flatnonzero(bad >= 0)
    if idx.size and not self.freeze:
      detail = ', '.join(f'SAE {i} at step {bad[i]}' for i in idx)
      raise FloatingPointError(
          f'non-finite loss: {detail}; the last checkpoint before it is intact. '
          'Lower train.lr, or set train.on_nonfinite=freeze to go on without it.'
      )
    for i in idx:
      if int(i) not in self.reported:
        self.reported.add(int(i))
        logs.info(f'WARNING: SAE {i} had a non-finite loss at step {bad[i]}; frozen')


def load_metrics(workdir: str) -> list[dict]:
  """The records of a run's metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
