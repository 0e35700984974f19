"""Device meshes and shardings: data, model (dictionary) and sweep parallelism.

The mesh has three named axes: 'data' shards the batch, 'model' shards the
d_sae dimension of the encoder/decoder weights and of the latents, 'sweep'
shards the stacked-SAE axis. Arrays carry logical axis names (models.
LOGICAL_AXES plus 'sae' for the stack and 'batch'); `config.mesh.rules` maps
them to mesh axes (MaxText style), so changing the parallelism is a config
change:

  --config.mesh.data=2 --config.mesh.model=4      # 2-way data x 4-way model

The state is created already sharded (init runs under jit with
out_shardings), restored sharded by Orbax, and batches arrive as global
jax.Arrays with the data sharding, each process supplying only its rows.
`strategy='pmap'` is the classic alternative for single-host data
parallelism: jax.pmap over the local devices with lax.pmean of gradients.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gsae_jax.sae import models
from gsae_jax.train.state import TrainState

MESH_AXES = ('data', 'model', 'sweep')
STRATEGIES = ('jit', 'pmap')


def mesh_shape(config: ml_collections.ConfigDict, n_devices: int) -> tuple[int, ...]:
  """The (data, model, sweep) sizes; one of them may be -1: the rest."""
  sizes = [int(config.mesh[a]) for a in MESH_AXES]
  fill = [a for a, s in zip(MESH_AXES, sizes, strict=True) if s == -1]
  if len(fill) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {fill}')
  for a, s in zip(MESH_AXES, sizes, strict=True):
    if s == 0 or s < -1:
      raise ValueError(f'config.mesh.{a}: must be > 0 or -1, got {s}')
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if n_devices % known:
      raise ValueError(
          f'config.mesh: {n_devices} devices do not divide by the fixed axes '
          f'({known}); set config.mesh.{fill[0]} explicitly'
      )
    sizes[MESH_AXES.index(fill[0])] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(
        f'config.mesh: data x model x sweep = {math.prod(sizes)} but there are '
        f'{n_devices} devices'
    )
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  shape = mesh_shape(config, jax.device_count())
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto)


def _rules(config: ml_collections.ConfigDict) -> dict[str, str | None]:
  rules = {}
  for rule in config.mesh.rules:
    logical, axis = rule
    if axis is not None and axis not in MESH_AXES:
      raise ValueError(
          f'config.mesh.rules: {logical!r} -> {axis!r}, not a mesh axis {MESH_AXES}'
      )
    rules[logical] = axis
  return rules


def spec(logical: tuple[str | None, ...], config: ml_collections.ConfigDict) -> P:
  """PartitionSpec of an array with these logical axes."""
  rules = _rules(config)
  return P(*(rules.get(name) if name else None for name in logical))


def _state_logical(path, leaf) -> tuple[str | None, ...]:
  """Logical axes of a TrainState leaf, from its path in the pytree."""
  names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  ndim = np.ndim(leaf) if not hasattr(leaf, 'shape') else len(leaf.shape)
  for name in reversed(names):
    if name in models.LOGICAL_AXES:
      return ('sae',) + models.LOGICAL_AXES[name]
  if 'steps_since_fired' in names:
    return ('sae', 'd_sae')
  if ndim == 0:
    return ()
  return ('sae',) + (None,) * (ndim - 1)


def state_shardings(abstract_state: Any, mesh, config: ml_collections.ConfigDict):
  """NamedShardings for every leaf of a TrainState (or its abstract shape)."""

  def one(path, leaf):
    logical = _state_logical(path, leaf)
    pspec = spec(logical, config)
    for dim, axis in zip(leaf.shape, pspec, strict=False):
      if axis is not None and dim % mesh.shape[axis]:
        where = jax.tree_util.keystr(path)
        raise ValueError(
            f'state{where}: dimension {dim} ({logical}) does not divide over mesh '
            f'axis {axis!r} of size {mesh.shape[axis]}; change config.mesh or '
            'the stack/width'
        )
    return NamedSharding(mesh, pspec)

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh, config: ml_collections.ConfigDict) -> NamedSharding:
  return NamedSharding(mesh, spec(('batch', 'd_in'), config))


def latent_sharding(mesh, config: ml_collections.ConfigDict) -> NamedSharding:
  """For the [n_sae, batch, d_sae] latents inside the step."""
  return NamedSharding(mesh, spec(('sae', 'batch', 'd_sae'), config))


def to_global(x: Any, sharding: NamedSharding, process_rows: bool = False) -> jax.Array:
  """A host batch -> the global jax.Array [batch, ...] with `sharding`.

  process_rows=False: every process holds the whole batch (each contributes
  the rows its devices hold). True: x is this process's own rows, in process
  order (jax.make_array_from_process_local_data), as a cache reader gives them.
  """
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  if process_rows:
    shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def local_bytes(tree: Any) -> int:
  """Bytes of `tree`'s arrays held by this process's first device."""
  device = jax.local_devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def initialize_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """Joins the JAX cluster (jax.distributed); on CPU, collectives over gloo.

  With no arguments on a Cloud TPU VM or under Slurm, JAX detects the cluster
  itself.
  """
  # Must run before anything touches a backend; only CPU collectives use it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=num_processes,
      process_id=process_id,
  )


class Placement:
  """Where state and batches live: a device mesh under jit (the default), or
  replicas under jax.pmap (config.mesh.strategy == 'pmap')."""

  def __init__(self, config: ml_collections.ConfigDict, abstract: TrainState):
    self.config = config
    self.pmap = config.mesh.strategy == 'pmap'
    if self.pmap:
      self.devices = jax.local_devices()
      n = len(self.devices)
      if config.train.batch_size % n:
        raise ValueError(
            f'config.train.batch_size: {config.train.batch_size} does not split '
            f'over {n} local devices (mesh.strategy=pmap)'
        )
      self.batch_sharding = None
      return
    self.mesh = make_mesh(config)
    self.state_sharding = state_shardings(abstract, self.mesh, config)
    self.batch_sharding = batch_sharding(self.mesh, config)
    size = jax.device_count()
    self.latent_sharding = latent_sharding(self.mesh, config) if size > 1 else None
    self.replicated = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec()
    )

  def abstract(self, abstract: TrainState) -> TrainState:
    """The restore target: shapes with their shardings."""
    if self.pmap:
      return abstract
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        self.state_sharding,
    )

  def init(self, make) -> TrainState:
    """Runs `make()` -> state, creating it sharded (never whole on one device)."""
    if self.pmap:
      return self.place(make())
    return jax.jit(make, out_shardings=self.state_sharding)()

  def place(self, state: TrainState) -> TrainState:
    """A restored or fresh single-copy state, put where training needs it."""
    if self.pmap:
      n = len(self.devices)  # one copy per device; pmap spreads the leading axis
      return jax.tree.map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), state)
    return state

  def host_state(self, state: TrainState) -> TrainState:
    """The state as checkpoints hold it (one copy)."""
    return jax.tree.map(lambda v: v[0], state) if self.pmap else state

  def batch(self, x, process_rows: bool = False) -> jax.Array:
    """A source's batch, placed for the step (see `to_global`)."""
    if self.pmap:
      n = len(self.devices)
      return jnp.reshape(x, (n, x.shape[0] // n) + x.shape[1:])
    if isinstance(x, jax.Array) and x.sharding == self.batch_sharding:
      return x
    return to_global(x, self.batch_sharding, process_rows)

  def compile(self, train_step_fn, resample_fn):
    if self.pmap:
      step = jax.pmap(train_step_fn, axis_name='data', donate_argnums=0)
      resample = jax.pmap(
          resample_fn, axis_name='data', in_axes=(0, None), donate_argnums=0
      )
      unstack = lambda x: jnp.reshape(x, (-1,) + x.shape[2:])
      return step, lambda state, x: resample(state, unstack(x))
    step = jax.jit(
        train_step_fn,
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, self.replicated),
        donate_argnums=0,
    )
    resample = jax.jit(
        resample_fn,
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, self.replicated),
        donate_argnums=0,
    )
    return step, resample

  def metrics(self, metrics):
    return jax.tree.map(lambda m: m[0], metrics) if self.pmap else metrics
