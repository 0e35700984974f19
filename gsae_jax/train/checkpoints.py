"""Orbax checkpoints of a run: the train state, and beside it a JSON record.

<workdir>/checkpoints/<step>/state holds the TrainState pytree (stacked SAEs,
Adam moments, hyperparameters, the normalisation scalar); .../meta holds the
run's config, the normalisation scalar and the data source's position.
Orbax writes each step to a temporary directory and renames it when complete,
so an interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gsae_jax import config as config_lib
from gsae_jax import logs

# 2: the hyperparameters gained l0_coeff and k (JumpReLU and the TopK family).
# gsae_jax.load still reads format 1; resuming needs the state's own format.
FORMAT_VERSION = 2


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Manager:
  """Periodic, keep-last-K, optionally async saves of one run."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.config = config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(config.checkpoint.max_to_keep),
        enable_async_checkpointing=bool(config.checkpoint.async_save),
        create=True,
    )
    self._mngr = ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=('state', 'meta')
    )

  def save(self, step: int, state: Any, extra: dict) -> None:
    """Saves `step` (async by default); a failure names the step and says the
    previous checkpoint is intact (Orbax renames a step into place only when
    it is complete)."""
    previous = self._mngr.latest_step()
    try:
      self._save(step, state, extra)
    except Exception as e:
      raise OSError(
          f'writing checkpoint step {step} in {self._mngr.directory} failed '
          f'({type(e).__name__}: {e}); the previous checkpoint (step {previous}) '
          'is intact'
      ) from e

  def _save(self, step: int, state: Any, extra: dict) -> None:
    meta = {
        'format_version': FORMAT_VERSION,
        'config': self.config.to_dict(),
        'norm_scale': float(np.asarray(jax.device_get(state.norm_scale))),
        **extra,
    }
    self._mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """(state, meta) of the newest readable checkpoint, or None if there is none.

    Orbax renames a step's directory into place only when it is complete, so
    a kill mid-save leaves no half checkpoint behind; a checkpoint damaged
    afterwards (a truncated or corrupt file) fails to restore and is skipped
    with a warning naming it, falling back to the one before. A checkpoint of
    another format version is an error (read from its meta before the state),
    not skipped.
    """
    steps = sorted(self._mngr.all_steps(), reverse=True)
    for step in steps:
      self._check_format(step)
      try:
        restored = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
      except Exception as e:  # noqa: BLE001 (any damage: fall back, loudly)
        path = os.path.join(str(self._mngr.directory), str(step))
        msg = f'checkpoint {path} is unreadable ({type(e).__name__}: {e}); '
        if step == steps[-1]:
          raise ValueError(msg + 'no older checkpoint to fall back to') from e
        # Kept for inspection, out of the way of the step's next save.
        aside = os.path.join(os.path.dirname(str(self._mngr.directory)), 'corrupt')
        os.makedirs(aside, exist_ok=True)
        os.replace(path, os.path.join(aside, f'{step}-{int(time.time())}'))
        self._mngr.reload()
        logging.warning(msg + 'moved to %s; falling back to the previous one', aside)
        logs.info(f'WARNING: {msg}moved to {aside}; using an older checkpoint')
        continue
      return restored.state, restored.meta
    return None

  def _check_format(self, step: int) -> None:
    try:
      meta = self._mngr.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
      ).meta
    except Exception:  # noqa: BLE001 (damage: restore_latest's fallback handles it)
      return
    version = meta.get('format_version')
    if version != FORMAT_VERSION:
      raise ValueError(
          f'checkpoint {step} in {self._mngr.directory} has format version '
          f'{version}; this gsae_jax resumes format {FORMAT_VERSION} only (the '
          'SAEs still load with gsae_jax.load); finish the run with the version '
          'that wrote it, or train in a new workdir'
      )

  def reached_preemption(self, step: int) -> bool:
    """Orbax's multi-host preemption sync point (TPU VMs): save and stop."""
    return self._mngr.reached_preemption(step)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in `workdir`, oldest first."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  with ocp.CheckpointManager(directory, item_names=('state', 'meta')) as mngr:
    return sorted(mngr.all_steps())


def read(workdir: str, step: int | None = None) -> tuple[dict, dict, int]:
  """(state as a nested dict of NumPy arrays, meta, step) without a train loop.

  `step` None reads the newest complete checkpoint.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoints in {workdir} (expected {directory})')
  handlers = {
      'state': ocp.StandardCheckpointHandler(),
      'meta': ocp.JsonCheckpointHandler(),
  }
  with ocp.CheckpointManager(directory, item_handlers=handlers) as mngr:
    available = sorted(mngr.all_steps())
    if not available:
      raise FileNotFoundError(f'no complete checkpoint in {directory}')
    if step is not None and step not in available:
      raise FileNotFoundError(
          f'no checkpoint for step {step} in {directory}; available: {available}'
      )
    candidates = [step] if step is not None else available[::-1]
    for step in candidates:
      try:
        restored = _restore_whole(mngr, step)
        break
      except Exception as e:  # noqa: BLE001 (newest damaged: fall back, loudly)
        path = os.path.join(directory, str(step))
        if step == candidates[-1]:
          raise ValueError(f'checkpoint {path} is unreadable: {e}') from e
        logs.info(f'WARNING: checkpoint {path} is unreadable ({e}); using an older one')
  state = jax.tree.map(np.asarray, restored.state)
  return state, restored.meta, step


def _restore_whole(mngr, step: int):
  """Restores `step` onto this process's first device, whatever mesh or
  processes wrote it."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      mngr.item_metadata(step)['state'],
  )
  return mngr.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
      ),
  )


def config_of(meta: dict) -> ml_collections.ConfigDict:
  return config_lib.with_defaults(meta['config'])
