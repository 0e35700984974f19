"""Orbax checkpoints of a run: the train state, and beside it a JSON record.

<workdir>/checkpoints/<step>/state holds the TrainState pytree (stacked SAEs,
Adam moments, hyperparameters, the normalisation scalar); .../meta holds the
run's config, the normalisation scalar and the data source's position.
Orbax writes each step to a temporary directory and renames it when complete,
so an interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gsae_jax import config as config_lib

FORMAT_VERSION = 1


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
    """(state, meta) of the newest checkpoint, or None if there is none."""
    step = self._mngr.latest_step()
    if step is None:
      return None
    restored = self._mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
    )
    meta = restored.meta
    if meta.get('format_version') != FORMAT_VERSION:
      raise ValueError(
          f'checkpoint {step} in {self._mngr.directory} has format version '
          f'{meta.get("format_version")}, this gsae_jax reads {FORMAT_VERSION}'
      )
    return restored.state, meta

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
    if step is None:
      step = available[-1]
    elif step not in available:
      raise FileNotFoundError(
          f'no checkpoint for step {step} in {directory}; available: {available}'
      )
    # Whatever mesh or processes wrote it, read it whole onto this process's
    # first device.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        mngr.item_metadata(step)['state'],
    )
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
  state = jax.tree.map(np.asarray, restored.state)
  return state, restored.meta, step


def config_of(meta: dict) -> ml_collections.ConfigDict:
  return config_lib.from_json_dict(meta['config'])
