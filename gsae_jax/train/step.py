"""The compiled step: (state, batch) -> (state, metrics), and resampling.

Both are pure functions of the state, compiled once by train/placement.py
(jit with shardings, or jax.pmap).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from gsae_jax import backends
from gsae_jax.sae import models, optim
from gsae_jax.train.state import TrainState, dead_window_steps


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
  """(state, x) -> {'heldout_l0', 'heldout_fvu', 'heldout_shrinkage_gamma'} [n_sae].

  Measured on the inference-time latents (`models.encode`: BatchTopK SAEs
  through their estimated threshold), as evaluation and exports see them.
  """
  spec = backends.resolve(models.SAESpec.for_run(config))

  def one(params, k, x):
    f = models.latents(spec, params, x, k=k, training=False)[0]
    return {'x_hat': models.decode(spec, params, f), 'fires': jnp.sum(f > 0, axis=0)}

  def heldout(state: TrainState, x: jax.Array) -> dict:
    x = x.astype(jnp.float32) * state.norm_scale
    out = jax.vmap(one, in_axes=(0, 0, None))(state.params, state.hparams.k, x)
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
  spec = models.SAESpec.for_run(config)
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
    coeff = jax.vmap(
        lambda hp: optim.sparsity_coefficient(hp, state.step, spec.architecture)
    )(state.hparams)
    # AuxK's dead latents [T App. A.2]: silent for the dead window so far.
    dead = state.steps_since_fired >= window if spec.k_max else None

    def loss_fn(params):
      out = backends.stacked_forward(
          spec, params, x, coeff, latent_sharding, state.hparams.k, dead
      )
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
    # Running statistics (BatchTopK's threshold) are set, not trained.
    stats = out.get('stats', {})
    if data_axis is not None:
      stats = jax.lax.pmean(stats, data_axis)
    params = {**params, **stats}
    metrics = {
        'loss': loss,
        'l_rec': jnp.mean(out['l_rec'], axis=1),
        'l_sp': jnp.mean(out['l_sp'], axis=1),
        'l_aux': jnp.mean(out['l_aux'], axis=1),
        **jax.vmap(batch_metrics, in_axes=(None, 0))(x, out),
        'dead_fraction': jnp.mean((since_fired >= window).astype(jnp.float32), axis=1),
        'lr': lr,
        'sparsity_coeff': coeff,
    }
    if 'threshold' in stats:
      metrics['threshold'] = stats['threshold']
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
  spec = models.SAESpec.for_run(config)
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
