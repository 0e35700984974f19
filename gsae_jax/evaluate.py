"""Evaluation of trained SAEs on held-out data: the metrics of SPEC §2.

Every metric is a ratio of dataset means (never a mean of per-batch or
per-token ratios): batches add float64 sums (NumPy) to a `Sums` per SAE, and
`metrics` divides at the end.

  L0                 E ||f||_0
  MSE                E ||x - x_hat||^2 / d_in
  FVU                E ||x - x_hat||^2 / E ||x - E[x]||^2
  shrinkage gamma    E ||x_hat||^2 / E [x . x_hat]          (1 = no shrinkage)
  dead fraction      latents that never fired on the whole evaluation set
  dense fraction     latents firing on more than 10% of its tokens
  firing frequency   per latent, for the log10 density histogram
  CE clean / SAE / zero, loss recovered = (CE_zero - CE_sae) / (CE_zero -
  CE_clean), delta LM loss = CE_sae - CE_clean

LM-site SAEs are evaluated on text of a held-out split (default 'validation')
of the dataset they were harvested from, packed into contexts as in harvest.
ONE pass of the LM per batch serves every SAE at the site: the activations
are read once, the clean and zero-ablated cross-entropies computed once, and
each SAE adds one spliced run. Every CE run is `lm.cross_entropy` with the
whole activation at the site replaced by given values (`replace_activation`,
splice_params = the values, traced): one compiled LM program serves clean,
zero and every SAE of any shape, and since nothing then depends on the layers
before the site, XLA skips them (a residual-stream site at layer 15 runs 14
of 30 layers per CE run, about half the work). The SAE's reconstruction comes
from one jitted step per SAE shape (weights as arguments), which also yields
the batch's metric sums.

As in harvest, position 0 (an attention sink, SPEC §3) is left unspliced and
out of the SAE metrics, and so are activations whose norm exceeds
`outlier_norm_factor` x the batch median (the other sinks, which harvest kept
out of training); the spliced run still replaces every position >= 1, so the
CE numbers are what the LM sees with the SAE in place. CE is averaged over the predictions made at the spliced
positions (1..context_len - 2); the prediction from position 0 is the same in
all three runs and is left out.

Synthetic-source SAEs (config.data.source == 'synthetic') are evaluated on
held-out batches of their generator (batch indices from 2**31 on, which
training never reaches); they have no CE numbers.

Typical use:

  saes = gsae_jax.load('runs/sweep')
  results = evaluate.evaluate_all(saes, lm=gsae_jax.lm.load())
  # or everything the CLI does (files, index, plots, report):
  evaluate.evaluate_workdir('runs/sweep', num_tokens=20_000)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax import harvest, logs, models
from gsae_jax import sweep as sweep_lib

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction is dense
TOP_K = 8  # top-activating tokens kept per latent (for the HTML report)
SYNTHETIC_HELD_OUT = 2**31  # first synthetic batch index used for evaluation
EVAL_JSON, EVAL_CSV, EVAL_DENSITY = 'eval.json', 'eval.csv', 'eval_density.npz'
REPORT_DIR = 'latents'
# Result entries that are arrays, not scalars (left out of eval.json/csv).
ARRAY_KEYS = ('firing_frequency', 'top_values', 'top_tokens', 'contexts')
# Result entries that describe the SAE rather than measure it.
IDENTITY_KEYS = (
    'index',
    'architecture',
    'd_in',
    'd_sae',
    'l1_coeff',
    'lr',
    'seed',
    'loss_scale',
    'step',
    'site',
)


# ---------------------------------------------------------------------------
# Metrics from dataset sums.


def batch_stats(
    x: jax.Array, x_hat: jax.Array, f: jax.Array, mask: jax.Array, top_k: int = 0
) -> dict[str, jax.Array]:
  """Per-token and per-latent quantities of one batch (jittable).

  Args:
    x: activations [n, d_in].
    x_hat: reconstructions [n, d_in].
    f: latents [n, d_sae].
    mask: [n] weights, 1 for tokens that count and 0 for the others.
    top_k: also return each latent's top_k activations over the batch.

  Returns:
    l0, sq_err, x_sq, x_hat_sq, x_dot_x_hat: [n] (unmasked; `Sums.add_batch`
    weighs them); fire_count [d_sae] int32 over the counted tokens; with
    top_k, top_values and top_rows [d_sae, top_k] (values -1 where masked).
  """
  fired = f > 0
  counted = mask > 0
  out = {
      'l0': jnp.sum(fired, axis=-1).astype(jnp.float32),
      'sq_err': jnp.sum(jnp.square(x - x_hat), axis=-1),
      'x_sq': jnp.sum(jnp.square(x), axis=-1),
      'x_hat_sq': jnp.sum(jnp.square(x_hat), axis=-1),
      'x_dot_x_hat': jnp.sum(x * x_hat, axis=-1),
      'fire_count': jnp.sum(fired & counted[:, None], axis=0, dtype=jnp.int32),
  }
  if top_k:
    masked = jnp.where(counted[:, None], f, -1.0)  # [n, d_sae]
    out['top_values'], out['top_rows'] = jax.lax.top_k(masked.T, top_k)
  return out


_jit_batch_stats = jax.jit(batch_stats, static_argnames='top_k')


@dataclasses.dataclass
class Sums:
  """Float64 dataset sums of one SAE's evaluation (means come at the end)."""

  d_in: int
  d_sae: int
  n_tokens: int = 0
  l0: float = 0.0
  sq_err: float = 0.0
  x_sq: float = 0.0
  x_hat_sq: float = 0.0
  x_dot_x_hat: float = 0.0
  sum_x: np.ndarray = None  # [d_in]
  fire_count: np.ndarray = None  # [d_sae] int64
  n_ce: int = 0
  ce_clean: float = 0.0
  ce_sae: float = 0.0
  ce_zero: float = 0.0

  def __post_init__(self):
    if self.sum_x is None:
      self.sum_x = np.zeros(self.d_in, np.float64)
    if self.fire_count is None:
      self.fire_count = np.zeros(self.d_sae, np.int64)

  def add_batch(self, x: Any, stats: dict, mask: Any) -> None:
    """Adds one batch: activations x [n, d_in], `batch_stats` output, mask [n]."""
    m = np.asarray(mask, np.float64)
    keep = m > 0
    self.n_tokens += int(keep.sum())
    for name in ('l0', 'sq_err', 'x_sq', 'x_hat_sq', 'x_dot_x_hat'):
      value = float(np.dot(np.asarray(stats[name], np.float64), m))
      setattr(self, name, getattr(self, name) + value)
    self.sum_x += np.asarray(x, np.float64)[keep].sum(axis=0)
    self.fire_count += np.asarray(stats['fire_count'], np.int64)

  def add_ce(self, ce_clean: Any, ce_sae: Any, ce_zero: Any) -> None:
    """Adds per-token cross-entropies (same shape, nats) of the three runs."""
    clean = np.asarray(ce_clean, np.float64)
    self.n_ce += clean.size
    self.ce_clean += float(clean.sum())
    self.ce_sae += float(np.asarray(ce_sae, np.float64).sum())
    self.ce_zero += float(np.asarray(ce_zero, np.float64).sum())

  @classmethod
  def from_arrays(cls, x: Any, x_hat: Any, f: Any, mask: Any = None) -> Sums:
    """Sums of one batch of (x, x_hat, f) arrays; mask [n] defaults to all."""
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.ones(x.shape[0], jnp.float32) if mask is None else jnp.asarray(mask)
    stats = _jit_batch_stats(x, jnp.asarray(x_hat, jnp.float32), jnp.asarray(f), mask)
    sums = cls(d_in=x.shape[-1], d_sae=np.shape(f)[-1])
    sums.add_batch(np.asarray(x), jax.device_get(stats), np.asarray(mask))
    return sums


def _ratio(num: float, den: float) -> float:
  return num / den if den != 0 else math.nan


def loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
  """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = as good as the clean LM,
  0 = as bad as zero-ablating the site; can exceed 1 (SPEC §2)."""
  return _ratio(ce_zero - ce_sae, ce_zero - ce_clean)


def firing_frequency(sums: Sums) -> np.ndarray:
  """Fraction of evaluated tokens on which each latent fired [d_sae]."""
  return sums.fire_count / max(sums.n_tokens, 1)


def metrics(sums: Sums, dense_threshold: float = DENSE_THRESHOLD) -> dict[str, float]:
  """The SPEC §2 metrics from dataset sums: means first, ratios second."""
  n = sums.n_tokens
  if n == 0:
    raise ValueError('no tokens were evaluated (all masked out?)')
  mean_x = sums.sum_x / n
  variance = sums.x_sq / n - float(mean_x @ mean_x)  # E||x - E[x]||^2
  freq = firing_frequency(sums)
  out = {
      'num_tokens': n,
      'l0': sums.l0 / n,
      'mse': sums.sq_err / n / sums.d_in,
      'fvu': _ratio(sums.sq_err / n, variance),
      'shrinkage_gamma': _ratio(sums.x_hat_sq / n, sums.x_dot_x_hat / n),
      'dead_fraction': float(np.mean(sums.fire_count == 0)),
      'dense_fraction': float(np.mean(freq > dense_threshold)),
  }
  if sums.n_ce:
    clean, sae, zero = (
        sums.ce_clean / sums.n_ce,
        sums.ce_sae / sums.n_ce,
        sums.ce_zero / sums.n_ce,
    )
    out.update(
        num_ce_tokens=sums.n_ce,
        ce_clean=clean,
        ce_sae=sae,
        ce_zero=zero,
        loss_recovered=loss_recovered(clean, sae, zero),
        delta_lm_loss=sae - clean,
    )
  return out


class TopExamples:
  """The k largest activations of every latent, with their token positions.

  Tokens are global ids: context * context_len + position.
  """

  def __init__(self, d_sae: int, k: int):
    self.values = np.full((d_sae, k), -np.inf, np.float32)
    self.tokens = np.full((d_sae, k), -1, np.int64)

  def add(self, values: np.ndarray, tokens: np.ndarray) -> None:
    """Merges candidates values/tokens [d_sae, k'] (values <= 0 are ignored)."""
    values = np.where(values > 0, values, -np.inf).astype(np.float32)
    all_values = np.concatenate([self.values, values], axis=1)
    all_tokens = np.concatenate([self.tokens, tokens], axis=1)
    k = self.values.shape[1]
    order = np.argsort(-all_values, axis=1, kind='stable')[:, :k]
    self.values = np.take_along_axis(all_values, order, axis=1)
    self.tokens = np.take_along_axis(all_tokens, order, axis=1)
    self.tokens[~np.isfinite(self.values)] = -1


# ---------------------------------------------------------------------------
# Evaluating SAEs.


def describe(sae: Any) -> dict[str, Any]:
  """The identity fields of an SAE's result row (IDENTITY_KEYS)."""
  c = sae.config
  synthetic = c.data.source == 'synthetic'
  return {
      'index': int(getattr(sae, 'index', 0)),
      'architecture': c.sae.architecture,
      'd_in': int(c.sae.d_in),
      'd_sae': int(c.sae.d_sae),
      'l1_coeff': float(c.sae.l1_coeff),
      'lr': float(c.train.lr),
      'seed': int(c.seed),
      'loss_scale': c.sae.loss_scale,
      'step': getattr(sae, 'step', None),
      'site': 'synthetic' if synthetic else c.harvest.site,
  }


def _spec(sae: Any) -> models.SAESpec:
  return models.SAESpec.from_config(sae.config.sae)


def _device_params(sae: Any) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v, jnp.float32) for k, v in sae.params.items()}


@functools.cache
def _stats_fn(spec: models.SAESpec, top_k: int):
  """(params, x [n, d_in], mask [n]) -> batch_stats, one program per spec."""

  def stats(params, x, mask):
    f = models.encode(spec, params, x)
    return batch_stats(x, models.decode(spec, params, f), f, mask, top_k)

  return jax.jit(stats)


@functools.cache
def _lm_step_fn(spec: models.SAESpec, top_k: int):
  """(params, acts [b, s, d_in], mask [b * (s - 1)]) -> (batch_stats, splice).

  The stats cover positions 1.. (rows of acts[:, 1:] flattened); the splice
  [b, s, d_in] is the SAE's reconstruction with position 0 left as it was.
  One program per spec; the weights are an argument.
  """

  def step(params, acts, mask):
    f = models.encode(spec, params, acts)  # [b, s, d_sae]
    x_hat = models.decode(spec, params, f)  # [b, s, d_in]
    d_in, d_sae = acts.shape[-1], f.shape[-1]
    stats = batch_stats(
        acts[:, 1:].reshape(-1, d_in),
        x_hat[:, 1:].reshape(-1, d_in),
        f[:, 1:].reshape(-1, d_sae),
        mask,
        top_k,
    )
    return stats, x_hat.at[:, 0].set(acts[:, 0])

  return jax.jit(step)


@functools.cache
def splice_fn(spec: models.SAESpec):
  """act [..., d_in], params -> the SAE's reconstruction, for lm splicing.

  For splicing an SAE directly: lm.cross_entropy(ids, site, splice_fn(spec),
  splice_params=params). One function object per spec, so the LM compiles
  once per SAE shape and the weights are traced. (`evaluate` instead passes
  reconstructions it has already computed, see `replace_activation`.)
  """

  def reconstruct(act: jax.Array, params: dict) -> jax.Array:
    return models.decode(spec, params, models.encode(spec, params, act))

  return reconstruct


def replace_activation(act: jax.Array, new: jax.Array) -> jax.Array:
  """A splice_fn that puts `new` (the splice_params) in place of the activation.

  With splice_from=0 the rest of the LM depends only on `new`, so for a
  residual-stream site XLA drops the layers before the site: the suffix of
  the model is all that runs (14 of 30 layers at blocks.15.hook_resid_post).
  """
  del act
  return new


def _replaced_ce(lm: Any, ids: np.ndarray, site: str, new_acts: Any, n: int):
  """Per-token CE [n, context_len - 2] with the activation at site := new_acts.

  The whole activation is replaced (position 0 by its clean value where the
  caller leaves it unspliced), so only the layers after the site run. The
  clean run is the replacement by the activations themselves: the same
  numbers as lm.cross_entropy(ids) (tests/test_evaluate.py). CE entry t
  predicts token t + 1 from positions <= t; entries t >= 1 are the
  predictions made at spliced positions, the ones kept; rows >= n (batch
  padding) are dropped.
  """
  ce = lm.cross_entropy(
      ids, site, replace_activation, splice_params=new_acts, splice_from=0
  )
  return np.asarray(ce)[:n, 1:]


class _Progress:
  """A progress line on stderr, at most every 2 s: tokens/s and ETA.

  The clock starts after the first batch (which includes compilation).
  """

  def __init__(self, total: int, what: str, enabled: bool = True):
    self.total, self.what, self.enabled = total, what, enabled
    self.t0 = self.last = None
    self.done0 = 0

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if self.t0 is None:
      self.t0, self.last, self.done0 = now, now, done
      rate = math.nan
    elif now - self.last < 2.0 and done < self.total:
      return
    else:
      rate = (done - self.done0) / max(now - self.t0, 1e-9)
    self.last = now
    if not self.enabled:
      return
    eta = (self.total - done) / rate if rate > 0 else math.nan
    speed = f'{rate:,.0f} tok/s' if math.isfinite(rate) else 'compiling'
    print(
        f'eval {self.what}: {done:,}/{self.total:,} tokens '
        f'({100 * done / max(self.total, 1):.0f}%) | {speed} | '
        f'ETA {logs.format_duration(eta)}',
        file=sys.stderr,
        flush=True,
    )


def _harvest_field(saes: Sequence[Any], name: str) -> Any:
  values = {str(s.config.harvest[name]) for s in saes}
  if len(values) > 1:
    raise ValueError(
        f'SAEs evaluated together must share config.harvest.{name}; got '
        f'{sorted(values)}: evaluate them separately (evaluate_all groups them)'
    )
  return saes[0].config.harvest[name]


def _result(sae: Any, sums: Sums, dense_threshold: float, top: TopExamples | None):
  out = {**describe(sae), **metrics(sums, dense_threshold)}
  out['firing_frequency'] = firing_frequency(sums)
  if top is not None:
    out['top_values'], out['top_tokens'] = top.values, top.tokens
  return out


def evaluate(
    saes: Sequence[Any],
    lm: Any,
    *,
    site: str | None = None,
    dataset: str | None = None,
    split: str = 'validation',
    data_dir: str | None = None,
    text_key: str | None = None,
    context_len: int | None = None,
    num_tokens: int = 20_000,
    batch_size: int | None = None,
    outlier_norm_factor: float | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
    top_k: int = TOP_K,
    shuffle_seed: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
  """Evaluates SAEs of one LM site on held-out text, one LM pass per batch.

  Args:
    saes: `gsae_jax.SAE` objects (raw-activation params) at the same site.
    lm: the language model (`gsae_jax.lm.load()`).
    site: hook site; default the SAEs' config.harvest.site.
    dataset: TFDS text dataset; default config.harvest.dataset.
    split: the held-out split (the bundled corpus has 'validation').
    data_dir: TFDS data dir; default config.harvest.data_dir.
    text_key: the text feature; default config.harvest.text_key.
    context_len: tokens per context; default config.harvest.context_len.
    num_tokens: SAE-evaluated positions to aim for (positions 1.. of
      ceil(num_tokens / (context_len - 1)) contexts).
    batch_size: contexts per LM call; default config.harvest.lm_batch_size.
    outlier_norm_factor: leave activations with norm > this x the batch
      median out of the SAE metrics; default config.harvest's; 0 keeps all.
    dense_threshold: firing frequency above which a latent is dense.
    top_k: top-activating tokens kept per latent (0: none).
    shuffle_seed: document order (None: corpus order, as harvest reads).
    progress: print a progress line on stderr.

  Returns:
    One dict per SAE, in order: `describe` fields, `metrics`, and arrays
    firing_frequency [d_sae], top_values / top_tokens [d_sae, top_k] and
    contexts [n_contexts, context_len] (token ids, shared by all results).
  """
  from gsae_jax import text  # noqa: PLC0415 (tensorflow-datasets is slow to import)

  saes = list(saes)
  if not saes:
    raise ValueError('evaluate() got no SAEs')
  site = site or _harvest_field(saes, 'site')
  lm.site(site)  # a bad site fails here, before any work
  for s in saes:
    if int(s.config.sae.d_in) != lm.d_model:
      raise ValueError(
          f'SAE index {getattr(s, "index", "?")} has d_in {s.config.sae.d_in} but '
          f'the LM at {site} has width {lm.d_model}'
      )
  context_len = int(context_len or _harvest_field(saes, 'context_len'))
  if context_len < 3:
    raise ValueError(
        f'context_len must be >= 3 to score spliced tokens, got {context_len}'
    )
  batch_size = int(batch_size or saes[0].config.harvest.lm_batch_size)
  if outlier_norm_factor is None:
    outlier_norm_factor = float(_harvest_field(saes, 'outlier_norm_factor'))
  docs = text.iter_documents(
      dataset or _harvest_field(saes, 'dataset'),
      split=split,
      data_dir=(data_dir if data_dir is not None else _harvest_field(saes, 'data_dir'))
      or None,
      text_key=text_key or _harvest_field(saes, 'text_key'),
      shuffle_seed=shuffle_seed,
  )
  per_context = context_len - 1  # positions 1.. of each context
  n_contexts = max(1, -(-int(num_tokens) // per_context))
  contexts = list(
      itertools.islice(text.iter_contexts(docs, lm, context_len), n_contexts)
  )
  if not contexts:
    raise ValueError(
        f'split {split!r} has no text for a context of {context_len} tokens'
    )
  if len(contexts) < n_contexts:
    logs.info(
        f'the {split} split ran out after {len(contexts) * per_context:,} tokens '
        f'({num_tokens:,} asked for)'
    )
  ids_all = np.stack(contexts).astype(np.int32)  # [n_contexts, context_len]

  specs = [_spec(s) for s in saes]
  params = [_device_params(s) for s in saes]
  sums = [Sums(d_in=lm.d_model, d_sae=sp.d_sae) for sp in specs]
  k = min(top_k, batch_size * per_context)
  tops = [TopExamples(sp.d_sae, k) if k else None for sp in specs]
  bar = _Progress(len(ids_all) * per_context, f'{len(saes)} SAE(s) at {site}', progress)
  for start in range(0, len(ids_all), batch_size):
    ids = ids_all[start : start + batch_size]
    n = len(ids)
    if n < batch_size:  # one compiled shape; the padding is masked out
      ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - n, axis=0)])
    acts = lm.activations(ids, site)  # [batch, context_len, d_in]
    # Position 0 is an attention sink: out of the metrics, never spliced.
    x_host = np.asarray(acts[:, 1:]).reshape(-1, lm.d_model)
    real = np.arange(x_host.shape[0]) < n * per_context
    keep = real.copy()
    keep[real] = harvest.inliers(x_host[real], outlier_norm_factor)
    mask = jnp.asarray(keep, jnp.float32)

    ce_clean = _replaced_ce(lm, ids, site, acts, n)
    ce_zero = _replaced_ce(lm, ids, site, acts.at[:, 1:].set(0.0), n)
    for spec, p, s, top in zip(specs, params, sums, tops, strict=True):
      stats, spliced = _lm_step_fn(spec, k)(p, acts, mask)
      stats = jax.device_get(stats)
      s.add_batch(x_host, stats, keep)
      s.add_ce(ce_clean, _replaced_ce(lm, ids, site, spliced, n), ce_zero)
      if top is not None:
        rows = stats['top_rows'].astype(np.int64)  # rows of x_host
        tokens = (start + rows // per_context) * context_len + rows % per_context + 1
        top.add(stats['top_values'], tokens)
    bar.update((start + n) * per_context)
  results = [
      _result(sae, s, dense_threshold, top)
      for sae, s, top in zip(saes, sums, tops, strict=True)
  ]
  for r in results:
    r['contexts'] = ids_all
    r['split'] = split
  return results


def evaluate_synthetic(
    saes: Sequence[Any],
    *,
    num_tokens: int = 20_000,
    batch_size: int | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
    progress: bool = True,
) -> list[dict[str, Any]]:
  """Evaluates synthetic-source SAEs on held-out batches of their generator.

  The batches are `SyntheticSource.batch_at(SYNTHETIC_HELD_OUT + i)`, indices
  that training (0, 1, ... num_steps) never uses. The SAEs must share
  config.synthetic and d_in. Returns dicts as `evaluate`, without CE.
  """
  from gsae_jax import synthetic  # noqa: PLC0415

  saes = list(saes)
  if not saes:
    raise ValueError('evaluate_synthetic() got no SAEs')
  c = saes[0].config
  for s in saes:
    if s.config.synthetic.to_dict() != c.synthetic.to_dict() or int(
        s.config.sae.d_in
    ) != int(c.sae.d_in):
      raise ValueError(
          f'SAE index {getattr(s, "index", "?")} has another synthetic source '
          '(config.synthetic or d_in) than the first; evaluate them separately'
      )
  batch_size = int(batch_size or c.train.batch_size)
  source = synthetic.SyntheticSource(c.synthetic, int(c.sae.d_in), batch_size)
  specs = [_spec(s) for s in saes]
  params = [_device_params(s) for s in saes]
  sums = [Sums(d_in=int(c.sae.d_in), d_sae=sp.d_sae) for sp in specs]
  n_batches = max(1, -(-int(num_tokens) // batch_size))
  mask = jnp.ones(batch_size, jnp.float32)
  keep = np.ones(batch_size, bool)
  bar = _Progress(n_batches * batch_size, f'{len(saes)} synthetic SAE(s)', progress)
  for i in range(n_batches):
    x = source.batch_at(SYNTHETIC_HELD_OUT + i)  # [batch, d_in]
    x_host = np.asarray(x)
    for spec, p, s in zip(specs, params, sums, strict=True):
      s.add_batch(x_host, jax.device_get(_stats_fn(spec, 0)(p, x, mask)), keep)
    bar.update((i + 1) * batch_size)
  results = [
      _result(sae, s, dense_threshold, None) for sae, s in zip(saes, sums, strict=True)
  ]
  for r in results:
    r['split'] = 'held-out synthetic batches'
  return results


def _source_key(sae: Any) -> tuple:
  c = sae.config
  if c.data.source == 'synthetic':
    return ('synthetic', json.dumps(c.synthetic.to_dict(), sort_keys=True), c.sae.d_in)
  h = c.harvest
  return (
      'lm',
      h.model,
      h.site,
      h.context_len,
      h.dataset,
      h.data_dir,
      h.text_key,
      h.outlier_norm_factor,
  )


def needs_lm(saes: Sequence[Any]) -> bool:
  """True if any SAE reads an LM site (not a synthetic source)."""
  return any(s.config.data.source != 'synthetic' for s in saes)


def load_lm_for(saes: Sequence[Any]):
  """The LM the SAEs were harvested from (config.harvest.model; '' = bundled)."""
  from gsae_jax import lm as lm_lib  # noqa: PLC0415 (heavy)

  models_named = {
      s.config.harvest.model for s in saes if s.config.data.source != 'synthetic'
  }
  if len(models_named) != 1:
    raise ValueError(
        f'the SAEs were harvested from different LMs {sorted(models_named)}; '
        "evaluate each model's SAEs separately"
    )
  return lm_lib.load(next(iter(models_named)) or None)


def evaluate_all(saes: Sequence[Any], lm: Any = None, **kwargs) -> list[dict[str, Any]]:
  """Evaluates any mix of SAEs, grouping them by data source and LM site.

  Each group is one `evaluate` (one LM pass per batch for all its SAEs) or
  `evaluate_synthetic` call. kwargs go to those (num_tokens, batch_size,
  split, ... ; synthetic groups take only num_tokens, batch_size,
  dense_threshold and progress). Results come back in the order of `saes`.
  """
  saes = list(saes)
  groups: dict[tuple, list[int]] = {}
  for i, s in enumerate(saes):
    groups.setdefault(_source_key(s), []).append(i)
  results: list[dict | None] = [None] * len(saes)
  synthetic_args = ('num_tokens', 'batch_size', 'dense_threshold', 'progress')
  # Arguments only LM groups use (split, site, ...) are dropped for the others.
  for key, members in groups.items():
    group = [saes[i] for i in members]
    if key[0] == 'synthetic':
      out = evaluate_synthetic(
          group, **{k: v for k, v in kwargs.items() if k in synthetic_args}
      )
    else:
      if lm is None:
        lm = load_lm_for(saes)
      out = evaluate(group, lm, **kwargs)
    for i, r in zip(members, out, strict=True):
      results[i] = r
  return results


# ---------------------------------------------------------------------------
# Files: eval.json, eval.csv, eval_density.npz and the sweep index.


def scalars(result: dict[str, Any]) -> dict[str, Any]:
  """The JSON/CSV-able part of a result (ARRAY_KEYS left out, NaN -> None)."""
  out = {}
  for k, v in result.items():
    if k in ARRAY_KEYS:
      continue
    if isinstance(v, np.generic):
      v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
      v = None
    out[k] = v
  return out


def _csv_text(rows: list[dict]) -> str:
  fields = list(dict.fromkeys(k for row in rows for k in row))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=fields)
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def write_results(
    results: Sequence[dict], out_dir: str, settings: dict | None = None
) -> dict[str, str]:
  """Writes eval.json, eval.csv (one row per SAE) and eval_density.npz.

  eval_density.npz holds each SAE's firing frequency as 'sae_<index>'.
  Returns {'json': path, 'csv': path, 'density': path}.
  """
  os.makedirs(out_dir, exist_ok=True)
  rows = [scalars(r) for r in results]
  doc = {'settings': settings or {}, 'results': rows}
  paths = {
      'json': os.path.join(out_dir, EVAL_JSON),
      'csv': os.path.join(out_dir, EVAL_CSV),
      'density': os.path.join(out_dir, EVAL_DENSITY),
  }
  logs.atomic_write_text(paths['json'], json.dumps(doc, indent=1))
  logs.atomic_write_text(paths['csv'], _csv_text(rows))
  buf = io.BytesIO()
  np.savez(buf, **{f'sae_{r["index"]}': r['firing_frequency'] for r in results})
  tmp = paths['density'] + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(buf.getvalue())
  os.replace(tmp, paths['density'])
  return paths


def merge_into_sweep_index(workdir: str, results: Sequence[dict]) -> list[dict]:
  """Adds eval_<metric> keys to the sweep index rows (by index), atomically.

  Rewrites sweep.json and sweep.csv; rows without a result keep their
  earlier eval_* values. Returns the rows.
  """
  path = os.path.join(workdir, sweep_lib.INDEX_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} is not a sweep directory (no {path})')
  with open(path) as f:
    doc = json.load(f)
  by_index = {r['index']: scalars(r) for r in results}
  for row in doc['rows']:
    result = by_index.get(row['index'])
    if result is None:
      continue
    row.update({f'eval_{k}': v for k, v in result.items() if k not in IDENTITY_KEYS})
  logs.atomic_write_text(path, json.dumps(doc, indent=1))
  logs.atomic_write_text(
      os.path.join(workdir, sweep_lib.INDEX_CSV), _csv_text(doc['rows'])
  )
  return doc['rows']


def _load_saes(workdir: str, step: int | None) -> list[Any]:
  """Every loadable SAE of a run or sweep dir (pending sweep groups skipped)."""
  from gsae_jax import api  # noqa: PLC0415

  if os.path.exists(os.path.join(workdir, sweep_lib.INDEX_JSON)):
    rows = sweep_lib.read_index(workdir)['rows']
    ready = [r for r in rows if r['status'] != 'pending']
    if not ready:
      raise FileNotFoundError(
          f'no group of the sweep in {workdir} has a checkpoint yet; train it with '
          'python -m launch.sweep'
      )
    if len(ready) < len(rows):
      logs.info(
          f'skipping {len(rows) - len(ready)} SAE(s) of groups not yet trained: '
          f'{sorted({r["group"] for r in rows if r["status"] == "pending"})}'
      )
      return [api.load(workdir, step=step, index=r['index']) for r in ready]
  saes = api.load(workdir, step=step)
  return list(saes) if isinstance(saes, list) else [saes]


def evaluate_workdir(
    workdir: str,
    *,
    out_dir: str | None = None,
    num_tokens: int = 20_000,
    split: str = 'validation',
    batch_size: int | None = None,
    step: int | None = None,
    lm: Any = None,
    merge_index: bool = True,
    plots: bool = True,
    report_latents: int = 24,
    progress: bool = True,
) -> list[dict[str, Any]]:
  """Evaluates every SAE of a run or sweep directory and writes the results.

  Writes into out_dir (default workdir): eval.json, eval.csv,
  eval_density.npz, plots (pareto.png, shrinkage.png, density.png) and, for
  LM SAEs, per-latent HTML reports (latents/sae_<index>.html). For a sweep
  directory with merge_index, the sweep index rows get eval_* keys.

  Args:
    workdir: a run's or a sweep's workdir.
    out_dir: where to write (default: workdir).
    num_tokens: tokens to evaluate on.
    split: the held-out text split (LM SAEs).
    batch_size: contexts per LM call (LM) or activations per batch
      (synthetic); default from the config.
    step: checkpoint step (None: newest).
    lm: the LM, if already loaded (default: loaded from the SAEs' config).
    merge_index: merge the metrics into sweep.json/sweep.csv.
    plots: write the PNG plots.
    report_latents: latents per SAE in the HTML report (0: none).
    progress: print a progress line on stderr.

  Returns:
    The results, as `evaluate_all`.
  """
  out_dir = out_dir or workdir
  saes = _load_saes(workdir, step)
  if lm is None and needs_lm(saes):
    lm = load_lm_for(saes)
  t0 = time.perf_counter()
  results = evaluate_all(
      saes,
      lm,
      num_tokens=num_tokens,
      batch_size=batch_size,
      split=split,
      progress=progress,
  )
  settings = {
      'workdir': os.path.abspath(workdir),
      'num_tokens_requested': int(num_tokens),
      'split': split if needs_lm(saes) else 'held-out synthetic batches',
      'dead_window': 'the whole evaluation set (num_tokens of each result)',
      'dense_threshold': DENSE_THRESHOLD,
      'positions': 'position 0 unspliced and excluded; norm outliers excluded '
      'from SAE metrics (harvest.outlier_norm_factor); CE over predictions at '
      'spliced positions',
      'mse': 'E||x - x_hat||^2 / d_in in raw activation units',
      'seconds': round(time.perf_counter() - t0, 2),
  }
  write_results(results, out_dir, settings)
  if merge_index and os.path.exists(os.path.join(workdir, sweep_lib.INDEX_JSON)):
    merge_into_sweep_index(workdir, results)
  if plots:
    from gsae_jax import plots as plots_lib  # noqa: PLC0415 (matplotlib)

    plots_lib.write_all(results, out_dir)
  if report_latents and lm is not None:
    from gsae_jax import report  # noqa: PLC0415

    for r in results:
      if 'top_tokens' in r:
        report.write_report(
            r,
            lm,
            os.path.join(out_dir, REPORT_DIR, f'sae_{r["index"]}.html'),
            n_latents=report_latents,
        )
  return results


def format_table(results: Sequence[dict]) -> str:
  """A plain-text table of the headline numbers, one line per SAE."""
  cols = [
      ('index', '{:>5}'),
      ('architecture', '{:>9}'),
      ('d_sae', '{:>6}'),
      ('l1_coeff', '{:>9.3g}'),
      ('l0', '{:>8.2f}'),
      ('fvu', '{:>7.4f}'),
      ('shrinkage_gamma', '{:>6.3f}'),
      ('loss_recovered', '{:>7.4f}'),
      ('delta_lm_loss', '{:>7.4f}'),
      ('dead_fraction', '{:>6.3f}'),
      ('dense_fraction', '{:>6.3f}'),
  ]
  heads = [
      'index',
      'arch',
      'd_sae',
      'l1',
      'L0',
      'FVU',
      'gamma',
      'LR',
      'dLM',
      'dead',
      'dense',
  ]
  widths = [len(fmt.format(0.0)) for _, fmt in cols]
  lines = [' '.join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
  for r in results:
    cells = []
    for (name, fmt), w in zip(cols, widths, strict=True):
      v = r.get(name)
      if v is None or (isinstance(v, float) and not math.isfinite(v)):
        cells.append('-'.rjust(w))
      else:
        cells.append(fmt.format(v))
    lines.append(' '.join(cells))
  return '\n'.join(lines)
