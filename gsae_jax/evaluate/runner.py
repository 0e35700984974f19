"""Evaluation of trained SAEs on held-out data (the metrics: evaluate/metrics.py).

Batches add float64 sums to a `metrics.Sums` per SAE, and `metrics.summary`
divides at the end: every metric is a ratio of dataset means.

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

As in harvest, position 0 (an attention sink, docs/design.md §3) is left unspliced and
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

import functools
import io
import itertools
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax import files, logs
from gsae_jax.data import harvest
from gsae_jax.evaluate import metrics
from gsae_jax.evaluate.saes import device_params, spec_of
from gsae_jax.sae import models
from gsae_jax.train import sweep as sweep_lib

TOP_K = 8  # top-activating tokens kept per latent (for the HTML report)
SYNTHETIC_HELD_OUT = 2**31  # first synthetic batch index used for evaluation
EVAL_JSON, EVAL_CSV, EVAL_DENSITY = 'eval.json', 'eval.csv', 'eval_density.npz'
REPORT_DIR = 'latents'
# Result entries that are arrays, not scalars (left out of eval.json/csv).
ARRAY_KEYS = ('firing_frequency', 'top_values', 'top_tokens', 'contexts', 'per_letter')
# The evaluations `evaluate_workdir` runs (launch.evaluate --evals): core =
# the metrics of evaluate/metrics.py; probing = evaluate/probing.py;
# absorption = evaluate/absorption.py.
EVALS = ('core', 'probing', 'absorption')
# Result entries that describe the SAE rather than measure it.
IDENTITY_KEYS = (
    'index',
    'architecture',
    'd_in',
    'd_sae',
    'l1_coeff',
    'l0_coeff',
    'k',
    'sparsity',
    'lr',
    'seed',
    'loss_scale',
    'step',
    'site',
)


# ---------------------------------------------------------------------------
# Evaluating SAEs.


def parse_evals(evals: str | Sequence[str]) -> tuple[str, ...]:
  """'core,probing' (or a sequence) -> ('core', 'probing'), checked against EVALS."""
  names = evals.split(',') if isinstance(evals, str) else list(evals)
  names = [n.strip() for n in names if n.strip()]
  unknown = [n for n in names if n not in EVALS]
  if unknown or not names:
    raise ValueError(
        f'unknown eval(s) {unknown or names} in evals {evals!r}; valid: '
        f'{", ".join(EVALS)} (a comma list, e.g. core,probing,absorption)'
    )
  return tuple(dict.fromkeys(names))


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
      'l0_coeff': float(c.sae.l0_coeff),
      'k': int(c.sae.k),
      'sparsity': sparsity_label(c),
      'lr': float(c.train.lr),
      'seed': int(c.seed),
      'loss_scale': c.sae.loss_scale,
      'step': getattr(sae, 'step', None),
      'site': 'synthetic' if synthetic else c.harvest.site,
  }


def sparsity_label(config) -> str:
  """The SAE's sparsity knob as text: 'l1=0.003', 'l0=0.001' or 'k=32'."""
  knob = models.SPARSITY_KNOB[config.sae.architecture]
  short = {'l1_coeff': 'l1', 'l0_coeff': 'l0', 'k': 'k'}[knob]
  return f'{short}={config.sae[knob]:.3g}'


@functools.cache
def _stats_fn(spec: models.SAESpec, top_k: int):
  """(params, x [n, d_in], mask [n]) -> batch_stats, one program per spec."""

  def stats(params, x, mask):
    f = models.encode(spec, params, x)
    return metrics.batch_stats(x, models.decode(spec, params, f), f, mask, top_k)

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
    stats = metrics.batch_stats(
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
  numbers as lm.cross_entropy(ids) (tests/evaluate/test_runner.py). CE entry t
  predicts token t + 1 from positions <= t; entries t >= 1 are the
  predictions made at spliced positions, the ones kept; rows >= n (batch
  padding) are dropped.
  """
  ce = lm.cross_entropy(
      ids, site, replace_activation, splice_params=new_acts, splice_from=0
  )
  return np.asarray(ce)[:n, 1:]


def _harvest_field(saes: Sequence[Any], name: str) -> Any:
  values = {str(s.config.harvest[name]) for s in saes}
  if len(values) > 1:
    raise ValueError(
        f'SAEs evaluated together must share config.harvest.{name}; got '
        f'{sorted(values)}: evaluate them separately (evaluate_all groups them)'
    )
  return saes[0].config.harvest[name]


def _result(
    sae: Any,
    sums: metrics.Sums,
    dense_threshold: float,
    top: metrics.TopExamples | None,
):
  out = {**describe(sae), **metrics.summary(sums, dense_threshold)}
  out['firing_frequency'] = metrics.firing_frequency(sums)
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
    dense_threshold: float = metrics.DENSE_THRESHOLD,
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
    One dict per SAE, in order: `describe` fields, `metrics.summary`, and arrays
    firing_frequency [d_sae], top_values / top_tokens [d_sae, top_k] and
    contexts [n_contexts, context_len] (token ids, shared by all results).
  """
  from gsae_jax.data import text  # noqa: PLC0415 (tensorflow-datasets is slow to import)

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
      itertools.islice(
          text.iter_contexts(
              docs, lm, context_len, bos_id=getattr(lm, 'context_bos_id', None)
          ),
          n_contexts,
      )
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

  specs = [spec_of(s) for s in saes]
  params = [device_params(s) for s in saes]
  sums = [metrics.Sums(d_in=lm.d_model, d_sae=sp.d_sae) for sp in specs]
  k = min(top_k, batch_size * per_context)
  tops = [metrics.TopExamples(sp.d_sae, k) if k else None for sp in specs]
  bar = logs.Progress(
      f'eval {len(saes)} SAE(s) at {site}',
      len(ids_all) * per_context,
      first_compiles=True,
      enabled=progress,
  )
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
    dense_threshold: float = metrics.DENSE_THRESHOLD,
    progress: bool = True,
) -> list[dict[str, Any]]:
  """Evaluates synthetic-source SAEs on held-out batches of their generator.

  The batches are `SyntheticSource.batch_at(SYNTHETIC_HELD_OUT + i)`, indices
  that training (0, 1, ... num_steps) never uses. The SAEs must share
  config.synthetic and d_in. Returns dicts as `evaluate`, without CE.
  """
  from gsae_jax.data import synthetic  # noqa: PLC0415

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
  specs = [spec_of(s) for s in saes]
  params = [device_params(s) for s in saes]
  sums = [metrics.Sums(d_in=int(c.sae.d_in), d_sae=sp.d_sae) for sp in specs]
  n_batches = max(1, -(-int(num_tokens) // batch_size))
  mask = jnp.ones(batch_size, jnp.float32)
  keep = np.ones(batch_size, bool)
  bar = logs.Progress(
      f'eval {len(saes)} synthetic SAE(s)',
      n_batches * batch_size,
      first_compiles=True,
      enabled=progress,
  )
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
  dtypes = {
      s.config.harvest.get('model_dtype', 'float32')
      for s in saes
      if s.config.data.source != 'synthetic'
  }
  dtype = 'bfloat16' if dtypes == {'bfloat16'} else 'float32'
  return lm_lib.load(next(iter(models_named)) or None, dtype=dtype)


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


def write_results(
    results: Sequence[dict], out_dir: str, settings: dict | None = None
) -> dict[str, str]:
  """Writes eval.json, eval.csv (one row per SAE) and eval_density.npz.

  eval_density.npz holds each SAE's firing frequency as 'sae_<index>' (not
  written when no result has one: an evaluation without 'core').
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
  files.atomic_write_json(paths['json'], doc)
  files.atomic_write_csv(paths['csv'], rows)
  densities = {
      f'sae_{r["index"]}': r['firing_frequency']
      for r in results
      if 'firing_frequency' in r
  }
  if densities:
    buf = io.BytesIO()
    np.savez(buf, **densities)
    files.atomic_write_bytes(paths['density'], buf.getvalue())
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
  files.atomic_write_json(path, doc)
  files.atomic_write_csv(os.path.join(workdir, sweep_lib.INDEX_CSV), doc['rows'])
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
    evals: str | Sequence[str] = ('core',),
    probing_options: dict[str, Any] | None = None,
    absorption_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
  """Evaluates every SAE of a run or sweep directory and writes the results.

  Writes into out_dir (default workdir): eval.json, eval.csv,
  eval_density.npz, plots (pareto.png, shrinkage.png, density.png; with
  probing / absorption also probing.png / absorption.png) and, for LM SAEs,
  per-latent HTML reports (latents/sae_<index>.html, latents/index.html).
  For a sweep directory with merge_index, the sweep index rows get eval_*
  keys. Without 'core' in evals, the new columns join the rows of an
  existing eval.json.

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
    evals: which evaluations (EVALS; a comma list or a sequence).
    probing_options: keyword arguments for `probing.evaluate_probing`
      (sizes: n_train, n_test, example_len, tasks, seed).
    absorption_options: keyword arguments for
      `absorption.evaluate_absorption` (n_words, n_icl, min_letters, seed).

  Returns:
    The results, as `evaluate_all` (with the other evals' keys added).
  """
  evals = parse_evals(evals)
  out_dir = out_dir or workdir
  saes = _load_saes(workdir, step)
  extra = [e for e in evals if e != 'core']
  if extra and not needs_lm(saes):
    raise ValueError(
        f'evals {extra} need SAEs of an LM site; {workdir} holds only '
        'synthetic-source SAEs (use --evals=core)'
    )
  if lm is None and needs_lm(saes):
    lm = load_lm_for(saes)
  t0 = time.perf_counter()
  seconds = {}
  if 'core' in evals:
    results = evaluate_all(
        saes,
        lm,
        num_tokens=num_tokens,
        batch_size=batch_size,
        split=split,
        progress=progress,
    )
  else:
    results = [describe(s) for s in saes]
  seconds['core'] = round(time.perf_counter() - t0, 2)
  options = {'probing': probing_options or {}, 'absorption': absorption_options or {}}
  for name in extra:
    t1 = time.perf_counter()
    _run_interpretability_eval(
        name, saes, results, lm, batch_size, progress, options[name]
    )
    seconds[name] = round(time.perf_counter() - t1, 2)
  joined = 'core' not in evals and os.path.exists(os.path.join(out_dir, EVAL_JSON))
  if joined:
    results = _join_earlier_results(out_dir, results)
  settings = {
      'workdir': os.path.abspath(workdir),
      'num_tokens_requested': int(num_tokens),
      'split': split if needs_lm(saes) else 'held-out synthetic batches',
      'dead_window': 'the whole evaluation set (num_tokens of each result)',
      'dense_threshold': metrics.DENSE_THRESHOLD,
      'positions': 'position 0 unspliced and excluded; norm outliers excluded '
      'from SAE metrics (harvest.outlier_norm_factor); CE over predictions at '
      'spliced positions',
      'mse': 'E||x - x_hat||^2 / d_in in raw activation units',
      'seconds': round(time.perf_counter() - t0, 2),
      'evals': list(evals),
      'seconds_per_eval': seconds,
      'probing_options': options['probing'],
      'absorption_options': options['absorption'],
      'core_columns_from': 'an earlier eval.json' if joined else 'this run',
  }
  write_results(results, out_dir, settings)
  if merge_index and os.path.exists(os.path.join(workdir, sweep_lib.INDEX_JSON)):
    merge_into_sweep_index(workdir, results)
  if plots:
    from gsae_jax.evaluate import plots as plots_lib  # noqa: PLC0415 (matplotlib)

    plots_lib.write_all(results, out_dir)
  if report_latents and lm is not None and 'core' in evals:
    from gsae_jax.evaluate import report  # noqa: PLC0415

    report.write_reports(
        [(r, s) for r, s in zip(results, saes, strict=True) if 'top_tokens' in r],
        lm,
        os.path.join(out_dir, REPORT_DIR),
        n_latents=report_latents,
    )
  return results


def _run_interpretability_eval(
    name: str,
    saes: Sequence[Any],
    results: list[dict],
    lm: Any,
    batch_size: int | None,
    progress: bool,
    options: dict[str, Any],
) -> None:
  """Adds eval `name`'s keys to the results of the LM SAEs, site by site."""
  from gsae_jax.evaluate import absorption, probing  # noqa: PLC0415

  groups: dict[tuple, list[int]] = {}
  for i, s in enumerate(saes):
    if s.config.data.source != 'synthetic':
      groups.setdefault(_source_key(s), []).append(i)
  skipped = len(saes) - sum(len(m) for m in groups.values())
  if skipped:
    logs.info(f'{name}: skipping {skipped} synthetic-source SAE(s) (no LM)')
  for members in groups.values():
    group = [saes[i] for i in members]
    h = group[0].config.harvest
    common = {
        'site': h.site,
        'batch_size': int(batch_size or h.lm_batch_size),
        'progress': progress,
    }
    if name == 'probing':
      out = probing.evaluate_probing(
          group,
          lm,
          outlier_norm_factor=float(h.outlier_norm_factor),
          **common,
          **options,
      )
    else:
      out = absorption.evaluate_absorption(group, lm, **common, **options)
    for i, r in zip(members, out, strict=True):
      results[i].update(r)


def _join_earlier_results(out_dir: str, results: list[dict]) -> list[dict]:
  """Each result on top of its row (by index) of out_dir's eval.json, if any."""
  path = os.path.join(out_dir, EVAL_JSON)
  if not os.path.exists(path):
    return results
  with open(path) as f:
    earlier = {r['index']: r for r in json.load(f)['results']}
  return [{**earlier.get(r['index'], {}), **r} for r in results]


def format_table(results: Sequence[dict]) -> str:
  """A plain-text table of the headline numbers, one line per SAE."""
  cols = [
      ('index', '{:>5}'),
      ('architecture', '{:>20}'),
      ('d_sae', '{:>6}'),
      ('sparsity', '{:>9}'),
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
      'sparsity',
      'L0',
      'FVU',
      'gamma',
      'LR',
      'dLM',
      'dead',
      'dense',
  ]
  for name, fmt, head in (
      ('probing_acc_raw', '{:>6.3f}', 'P_raw'),
      ('probing_acc_k1', '{:>6.3f}', 'P@1'),
      ('probing_acc_k5', '{:>6.3f}', 'P@5'),
      ('absorption_rate', '{:>6.3f}', 'absorb'),
      ('absorption_fraction', '{:>6.3f}', 'a_frac'),
  ):
    if any(name in r for r in results):
      cols.append((name, fmt))
      heads.append(head)
  if len({r.get('site') for r in results}) > 1:  # a sweep over sites
    width = max(len(str(r.get('site'))) for r in results)
    cols.insert(1, ('site', f'{{:>{width}}}'))
    heads.insert(1, 'site')
  widths = [
      len(fmt.format(0.0)) if name != 'site' else len(fmt.format(''))
      for name, fmt in cols
  ]
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
