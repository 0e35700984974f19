"""Training: the state, the compiled step, and the loop.

The state always holds a stack of SAEs on a leading axis (one SAE is a stack of
one); the step is one pure function (state, batch) -> (state, metrics), the
single-SAE update under jax.vmap with the batch shared, jitted once with the
state donated.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from gsae_jax import cache as cache_lib
from gsae_jax import checkpoints, logs, models, optim, parallel, synthetic
from gsae_jax import config as config_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer steps taken
  params: dict  # each [n_sae, ...]
  opt_state: Any  # Adam moments, each [n_sae, ...]
  hparams: optim.HParams  # each [n_sae]
  steps_since_fired: jax.Array  # [n_sae, d_sae] int32
  last_resample: jax.Array  # [n_sae] int32: step of the last resampling
  norm_scale: jax.Array  # [] float32: x is multiplied by this before the SAE
  rng: jax.Array  # [n_sae, 2] uint32: per-SAE keys (resampling)
  # First step whose loss was NaN/Inf, per SAE (-1: none); with
  # train.on_nonfinite='freeze' such an SAE stops updating from then on.
  bad_step: jax.Array  # [n_sae] int32
  bad_input_step: jax.Array  # [] int32: first step with a non-finite batch


class Preempted(Exception):  # noqa: N818 (it is a stop, not an error)
  """Training stopped on SIGTERM/SIGINT or preemption after a checkpoint."""

  def __init__(self, step: int):
    super().__init__(f'stopped at step {step} with a checkpoint; re-run to resume')
    self.step = step


# The exit status of a run stopped by a signal after checkpointing: "resume me".
EXIT_RESUME = 75


def hparams_from_config(config: ml_collections.ConfigDict) -> optim.HParams:
  """The per-SAE hyperparameters of the run's stack ([n_sae] arrays)."""
  f32 = lambda name: jnp.asarray(config_lib.stack_values(config, name), jnp.float32)
  return optim.HParams(
      l1_coeff=f32('l1_coeff'),
      lr=f32('lr'),
      lr_warmup_steps=f32('lr_warmup_steps'),
      l1_warmup_steps=f32('l1_warmup_steps'),
  )


def seeds_from_config(config: ml_collections.ConfigDict) -> jax.Array:
  """The per-SAE initialisation seeds of the run's stack ([n_sae] uint32)."""
  return jnp.asarray(config_lib.stack_values(config, 'seed'), jnp.uint32)


def init_state(
    config: ml_collections.ConfigDict,
    hparams: optim.HParams,
    seeds: jax.Array,
    norm_scale: float,
) -> TrainState:
  """A fresh state for a stack of SAEs, SAE i initialised from seeds[i]."""
  spec = models.SAESpec.from_config(config.sae)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
  params = jax.vmap(functools.partial(models.init_params, spec))(keys)
  opt_state = jax.vmap(optim.adam(config).init)(params)
  n_sae = keys.shape[0]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=opt_state,
      hparams=hparams,
      steps_since_fired=jnp.zeros((n_sae, spec.d_sae), jnp.int32),
      last_resample=jnp.full((n_sae,), -(10**9), jnp.int32),
      norm_scale=jnp.asarray(norm_scale, jnp.float32),
      rng=jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys),
      bad_step=jnp.full((n_sae,), -1, jnp.int32),
      bad_input_step=jnp.full((), -1, jnp.int32),
  )


def dead_window_steps(config: ml_collections.ConfigDict) -> int:
  return max(1, math.ceil(config.train.dead_window_tokens / config.train.batch_size))


def batch_metrics(x: jax.Array, out: dict) -> dict:
  """Cheap per-batch metrics of one SAE (ratios of batch sums, [P §2 metrics])."""
  x_hat = out['x_hat']
  err = jnp.sum(jnp.square(x - x_hat))
  var = jnp.sum(jnp.square(x - jnp.mean(x, axis=0)))
  return {
      'l0': jnp.sum(out['fires']) / x.shape[0],
      'fvu': err / var,
      'shrinkage_gamma': jnp.sum(jnp.square(x_hat)) / jnp.sum(x * x_hat),
  }


def make_heldout_metrics(config: ml_collections.ConfigDict):
  """(state, x) -> {'heldout_l0', 'heldout_fvu', 'heldout_shrinkage_gamma'} [n_sae]."""
  spec = models.SAESpec.from_config(config.sae)

  def heldout(state: TrainState, x: jax.Array) -> dict:
    x = x.astype(jnp.float32) * state.norm_scale
    zeros = jnp.zeros(state.hparams.l1_coeff.shape, jnp.float32)
    out = models.stacked_forward(spec, state.params, x, zeros)
    m = jax.vmap(batch_metrics, in_axes=(None, 0))(x, out)
    return {f'heldout_{k}': v for k, v in m.items()}

  return heldout


def make_train_step(
    config: ml_collections.ConfigDict,
    data_axis: str | None = None,
    latent_sharding=None,
):
  """The step (state, x [batch, d_in]) -> (state, metrics of [n_sae] arrays).

  `data_axis`: under jax.pmap, the axis name to average gradients and
  metrics over (x is then the device's part of the batch). `latent_sharding`:
  under jit on a mesh, the sharding of the [n_sae, batch, d_sae] latents.

  Losses and gradients of the whole stack come from one `stacked_forward`
  (its encoders are one wide matmul); the sum of the per-SAE losses has each
  SAE's own gradient in its slice. The update (Adam, per-SAE lr, unit-norm
  decoder, dead-latent counters) is elementwise and runs under jax.vmap.
  """
  spec = models.SAESpec.from_config(config.sae)
  schedule = optim.Schedule.from_config(config)
  adam = optim.adam(config)
  window = dead_window_steps(config)
  freeze = config.train.on_nonfinite == 'freeze'

  def update(params, grads, opt_state, hp, fired, since_fired, last_resample, step):
    if spec.unit_norm_decoder:
      grads['W_dec'] = optim.remove_parallel_component(grads['W_dec'], params['W_dec'])
    updates, opt_state = adam.update(grads, opt_state, params)
    lr = optim.learning_rate(schedule, hp, step, last_resample)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    if spec.unit_norm_decoder:
      params['W_dec'] = optim.normalise_rows(params['W_dec'])
    since_fired = jnp.where(fired, 0, since_fired + 1)
    return params, opt_state, since_fired, lr

  def train_step(state: TrainState, x: jax.Array):
    x = x.astype(jnp.float32) * state.norm_scale
    l1 = jax.vmap(optim.l1_coefficient, in_axes=(0, None))(state.hparams, state.step)

    def loss_fn(params):
      out = models.stacked_forward(spec, params, x, l1, latent_sharding)
      per_sae = jnp.mean(out['l_rec'] + out['l_sp'] + out['l_aux'], axis=1)
      return jnp.sum(per_sae), (per_sae, out)

    (_, (loss, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    fired = out['fires'] > 0  # [n_sae, d_sae]
    if data_axis is not None:
      grads = jax.lax.pmean(grads, data_axis)
      fired = jax.lax.pmax(fired.astype(jnp.int32), data_axis) > 0
    params, opt_state, since_fired, lr = jax.vmap(
        update, in_axes=(0, 0, 0, 0, 0, 0, 0, None)
    )(
        state.params,
        grads,
        state.opt_state,
        state.hparams,
        fired,
        state.steps_since_fired,
        state.last_resample,
        state.step,
    )
    metrics = {
        'loss': loss,
        'l_rec': jnp.mean(out['l_rec'], axis=1),
        'l_sp': jnp.mean(out['l_sp'], axis=1),
        'l_aux': jnp.mean(out['l_aux'], axis=1),
        **jax.vmap(batch_metrics, in_axes=(None, 0))(x, out),
        'dead_fraction': jnp.mean((since_fired >= window).astype(jnp.float32), axis=1),
        'lr': lr,
        'l1_coeff': l1,
    }
    if data_axis is not None:
      metrics = jax.lax.pmean(metrics, data_axis)
    # Non-finite input or loss: a batch with NaN/Inf updates no SAE; an SAE
    # whose loss is NaN/Inf on a finite batch is flagged (and, in 'freeze'
    # mode, keeps its last finite parameters from then on).
    x_ok = jnp.all(jnp.isfinite(x))
    if data_axis is not None:
      x_ok = jax.lax.pmin(x_ok.astype(jnp.int32), data_axis) > 0
    loss_ok = jnp.isfinite(loss)  # [n_sae]
    step1 = state.step + 1
    bad_step = jnp.where(x_ok & ~loss_ok & (state.bad_step < 0), step1, state.bad_step)
    keep_new = x_ok & (bad_step < 0) if freeze else jnp.broadcast_to(x_ok, loss.shape)
    select = lambda new, old: jnp.where(
        keep_new.reshape((-1,) + (1,) * (new.ndim - 1)), new, old
    )
    params = jax.tree.map(select, params, state.params)
    opt_state = jax.tree.map(select, opt_state, state.opt_state)
    since_fired = select(since_fired, state.steps_since_fired)
    metrics['frozen'] = (bad_step >= 0).astype(jnp.int32)
    state = state.replace(
        step=step1,
        params=params,
        opt_state=opt_state,
        steps_since_fired=since_fired,
        bad_step=bad_step,
        bad_input_step=jnp.where(
            ~x_ok & (state.bad_input_step < 0), step1, state.bad_input_step
        ),
    )
    return state, metrics

  return train_step


def make_resample(config: ml_collections.ConfigDict):
  """(state, x) -> state with each SAE's dead latents resampled [P App. D]."""
  spec = models.SAESpec.from_config(config.sae)
  window = dead_window_steps(config)
  scale = float(config.resample.encoder_scale)

  def one(params, opt_state, since_fired, last_resample, step, x, key):
    dead = since_fired >= window  # [d_sae]
    params = optim.resample_params(spec, params, dead, x, key, scale)
    opt_state = opt_state._replace(
        mu=optim.reset_latents(opt_state.mu, dead),
        nu=optim.reset_latents(opt_state.nu, dead),
    )
    since_fired = jnp.where(dead, 0, since_fired)
    last_resample = jnp.where(jnp.any(dead), step, last_resample)
    return params, opt_state, since_fired, last_resample, jnp.sum(dead)

  def resample(state: TrainState, x: jax.Array):
    x = x.astype(jnp.float32) * state.norm_scale
    rng, keys = jnp.unstack(jax.vmap(jax.random.split)(state.rng), axis=1)
    params, opt_state, since, last, n_dead = jax.vmap(
        one, in_axes=(0, 0, 0, 0, None, None, 0)
    )(
        state.params,
        state.opt_state,
        state.steps_since_fired,
        state.last_resample,
        state.step,
        x,
        keys,
    )
    state = state.replace(
        params=params,
        opt_state=opt_state,
        steps_since_fired=since,
        last_resample=last,
        rng=rng,
    )
    return state, n_dead

  return resample


class CacheSource:
  """Training batches from an activation cache (launch.harvest).

  Each process reads only its slice of the cache (cache.CacheReader), in a
  background thread; batches become global jax Arrays with `sharding` (or
  plain device arrays). Its position is a small JSON-able dict saved with
  every checkpoint, so a resumed run sees exactly the batches it would have.
  """

  def __init__(self, config: ml_collections.ConfigDict, sharding=None):
    self.sharding = sharding
    self.eval_cache_dir = config.data.eval_cache_dir
    self.reader = cache_lib.CacheReader(
        config.data.cache_dir,
        batch_size=int(config.train.batch_size),
        seed=int(config.data.seed),
        shuffle_buffer=int(config.data.shuffle_buffer),
        d_in=int(config.sae.d_in),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=int(config.data.prefetch),
    )

  def next_batch(self) -> jax.Array:
    local = next(self.reader)
    if self.sharding is None:
      return jnp.asarray(local)
    return cache_lib.to_global_array(local, self.sharding)

  def mean_squared_norm(self, num_batches: int) -> float:
    del num_batches  # the manifest has E||x||^2 over the whole cache
    return self.reader.cache.mean_sq_norm

  def mean_vector(self, num_batches: int) -> np.ndarray:
    del num_batches  # and E[x]
    return np.asarray(self.reader.cache.mean, np.float32)

  def heldout_batch(self):
    """The first batch_size rows of data.eval_cache_dir (None if unset)."""
    if not self.eval_cache_dir:
      return None
    held = cache_lib.Cache(self.eval_cache_dir, d_in=self.reader.d_in)
    rows = min(self.reader.batch_size, held.num_rows)
    x = held.read_range(0, rows).astype(np.float32)
    held.close()
    return x

  def get_state(self) -> dict:
    return self.reader.get_state()

  def set_state(self, state: dict) -> None:
    self.reader.set_state(state)

  def close(self) -> None:
    self.reader.close()


def make_source(config: ml_collections.ConfigDict, sharding=None):
  """The activation source named by config.data."""
  if config.data.source == 'synthetic':
    return synthetic.SyntheticSource(
        config.synthetic, config.sae.d_in, config.train.batch_size
    )
  if not os.path.isdir(config.data.cache_dir):
    raise FileNotFoundError(
        f'config.data.cache_dir: {config.data.cache_dir} does not exist; write it '
        'with python -m launch.harvest --config=<the same config>'
    )
  return CacheSource(config, sharding)


def _check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir holding a run of another config; records this one."""
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
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    logs.atomic_write_text(path, config_lib.to_json(config))


class _Placement:
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
    self.mesh = parallel.make_mesh(config)
    self.state_sharding = parallel.state_shardings(abstract, self.mesh, config)
    self.batch_sharding = parallel.batch_sharding(self.mesh, config)
    size = jax.device_count()
    self.latent_sharding = (
        parallel.latent_sharding(self.mesh, config) if size > 1 else None
    )
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

  def batch(self, x) -> jax.Array:
    if self.pmap:
      n = len(self.devices)
      return jnp.reshape(x, (n, x.shape[0] // n) + x.shape[1:])
    if isinstance(x, jax.Array) and x.sharding == self.batch_sharding:
      return x
    return parallel.to_global(x, self.batch_sharding)

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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the run in `workdir` to config.train.num_steps.

  Returns the final state (with pmap, one copy of it).
  """
  config_lib.validate(config)
  _check_workdir(config, workdir)
  spec = models.SAESpec.from_config(config.sae)
  hparams = hparams_from_config(config)
  seeds = seeds_from_config(config)
  abstract = jax.eval_shape(lambda: init_state(config, hparams, seeds, 1.0))
  place = _Placement(config, abstract)
  source = make_source(config, place.batch_sharding)
  manager = checkpoints.Manager(workdir, config)

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
      make_train_step(
          config,
          data_axis='data' if place.pmap else None,
          latent_sharding=None if place.pmap else place.latent_sharding,
      ),
      make_resample(config),
  )
  num_steps = int(config.train.num_steps)
  start = int(place.host_state(state).step)
  writer = logs.MetricWriter(workdir, config, active=jax.process_index() == 0)
  progress = logs.Progress(num_steps, config.train.batch_size, start)
  log_every = logs.Every(config.log.every_steps, num_steps)
  save_every = logs.Every(config.checkpoint.every_steps, num_steps)
  resample_every = logs.Every(config.resample.every_steps)
  faults = _FaultCheck(config, writer)
  eval_every = logs.Every(config.eval.every_steps)
  heldout_x = source.heldout_batch() if config.eval.every_steps else None
  heldout = jax.jit(make_heldout_metrics(config)) if heldout_x is not None else None

  def save(step, state):
    faults.check(place.host_state(state))  # never checkpoint a NaN state
    manager.save(step, place.host_state(state), {'data_state': source.get_state()})

  try:
    with _StopSignals() as stop:
      for step in range(start + 1, num_steps + 1):
        x = place.batch(source.next_batch())
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
          progress.update(step, metrics)
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


def summary(state: TrainState) -> dict:
  """JSON-able per-SAE facts about a state (for sweep indexes and tests)."""
  return {'step': int(state.step), 'norm_scale': float(state.norm_scale)}


def load_metrics(workdir: str) -> list[dict]:
  """The records of a run's metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def host_params(state: TrainState, index: int = 0) -> dict[str, np.ndarray]:
  """SAE `index`'s parameters as NumPy (normalised units)."""
  return {k: np.asarray(v[index]) for k, v in state.params.items()}
