"""Plots of evaluation results (PNG, matplotlib's Agg canvas, no pyplot state).

  pareto.png     L0 (log x) vs loss recovered and vs 1 - FVU, one series per
                 architecture with its Pareto frontier: the paper's headline
                 figure [P §4, Fig. 1]. Synthetic runs (no LM) have the FVU
                 panel only.
  shrinkage.png  L0 vs shrinkage gamma (1 = none) [P §4, Fig. 4].
  density.png    per SAE, a histogram of log10 latent firing frequency; dead
                 latents (never fired) are counted in the panel title.
  probing.png    L0 vs sparse-probing test accuracy (mean over tasks), one
                 panel per k, the raw-activation probe as a dashed line.
  absorption.png L0 vs the absorption rate and the absorption fraction.

Inputs are the result dicts of `gsae_jax.evaluate` (scalars per SAE and
'firing_frequency' arrays).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_COLORS = {
    'gated': 'tab:blue',
    'baseline': 'tab:orange',
    'jumprelu': 'tab:green',
    'topk': 'tab:red',
    'batchtopk': 'tab:purple',
    'matryoshka_batchtopk': 'tab:brown',
}


def pareto_frontier(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
  """Indices of the points no other point beats, sorted by x.

  A point is on the frontier if no other has x <= its x and y >= its y with
  one of them strict (lower x and higher y are better). Non-finite points are
  ignored.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
  order = ok[np.lexsort((-y[ok], x[ok]))]  # by x, then best y first
  frontier, best = [], -math.inf
  for i in order:
    if y[i] > best:
      frontier.append(i)
      best = y[i]
  return np.asarray(frontier, np.int64)


def _value(result: dict, name: str) -> float:
  v = result.get(name)
  return math.nan if v is None else float(v)


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=120, bbox_inches='tight')
  return path


def _by_architecture(results: Sequence[dict]) -> dict[str, list[dict]]:
  out: dict[str, list[dict]] = {}
  for r in results:
    out.setdefault(r['architecture'], []).append(r)
  return out


def _log_x_if_positive(ax: Any, xs: list[float]) -> None:
  xs = [x for x in xs if math.isfinite(x)]
  if xs and min(xs) > 0:
    ax.set_xscale('log')


def plot_pareto(results: Sequence[dict], path: str) -> str:
  """L0 vs loss recovered and vs 1 - FVU (only the latter without LM numbers),
  a Pareto frontier per architecture in each panel."""
  panels = [('1 - FVU (variance explained)', lambda r: 1.0 - _value(r, 'fvu'))]
  if any(math.isfinite(_value(r, 'loss_recovered')) for r in results):
    panels.insert(0, ('loss recovered', lambda r: _value(r, 'loss_recovered')))
  fig = Figure(figsize=(6 * len(panels), 4.5))
  site = results[0].get('site', '') if results else ''
  for i, (ylabel, y_of) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    all_x = []
    for arch, rs in sorted(_by_architecture(results).items()):
      x = np.array([_value(r, 'l0') for r in rs])
      y = np.array([y_of(r) for r in rs])
      all_x += list(x)
      color = _COLORS.get(arch)
      ax.scatter(x, y, color=color, alpha=0.6, label=f'{arch} ({len(rs)})')
      front = pareto_frontier(x, y)
      if front.size:
        ax.plot(x[front], y[front], color=color, marker='o', linewidth=1.5)
    _log_x_if_positive(ax, all_x)
    ax.set_xlabel('L0 (active latents per token)')
    ax.set_ylabel(ylabel)
    ax.set_title(
        f'Sparsity vs {ylabel.split(" (")[0]} at {site} (upper left is better)',
        fontsize=9,
    )
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_shrinkage(results: Sequence[dict], path: str) -> str:
  """L0 vs shrinkage gamma = E||x_hat||^2 / E[x . x_hat] per architecture."""
  panels = [('shrinkage_gamma', 'Relative reconstruction bias: gamma (1 = none)')]
  return _versus_l0(results, panels, path, hline=1.0)


def plot_density(results: Sequence[dict], path: str, columns: int = 4) -> str:
  """One histogram of log10 firing frequency per SAE (dead latents counted)."""
  n = len(results)
  cols = max(1, min(columns, n))
  rows = max(1, math.ceil(n / cols))
  fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
  # One x range for every panel, so the SAEs compare at a glance.
  lows = [
      np.log10(np.min(f[f > 0]))
      for f in (np.asarray(r['firing_frequency']) for r in results)
      if np.any(f > 0)
  ]
  x_range = (math.floor(min(lows)) if lows else -6.0, 0.0)
  for i, r in enumerate(results):
    ax = fig.add_subplot(rows, cols, i + 1)
    freq = np.asarray(r['firing_frequency'], np.float64)
    alive = freq[freq > 0]
    if alive.size:
      ax.hist(
          np.log10(alive),
          bins=40,
          range=x_range,
          color=_COLORS.get(r['architecture'], 'grey'),
      )
    ax.set_xlim(*x_range)
    ax.axvline(-1.0, color='red', linestyle=':', linewidth=1)  # dense above 10%
    ax.set_title(
        f'#{r["index"]} {r["architecture"]} {r.get("sparsity", "")}\n'
        f'L0 {_value(r, "l0"):.1f}, dead {int((freq == 0).sum())}/{freq.size}',
        fontsize=8,
    )
    ax.set_xlabel('log10 firing frequency', fontsize=8)
    ax.tick_params(labelsize=7)
  fig.tight_layout()
  return _save(fig, path)


def _versus_l0(
    results: Sequence[dict],
    panels: Sequence[tuple[str, str]],
    path: str,
    reference: str | None = None,
    hline: float | None = None,
) -> str:
  """One panel per (key, title): L0 vs results[key], a line per architecture;
  `reference` (a key, the same for every SAE) or `hline` as a dashed grey
  line."""
  fig = Figure(figsize=(4.5 * len(panels), 4))
  for i, (key, title) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    all_x = []
    for arch, rs in sorted(_by_architecture(results).items()):
      rs = sorted(rs, key=lambda r: _value(r, 'l0'))
      x = [_value(r, 'l0') for r in rs]
      all_x += x
      ax.plot(
          x,
          [_value(r, key) for r in rs],
          color=_COLORS.get(arch),
          marker='o',
          label=arch,
      )
    if reference is not None:
      ref = [_value(r, reference) for r in results]
      ref = [v for v in ref if math.isfinite(v)]
      if ref:
        ax.axhline(ref[0], color='grey', linestyle='--', linewidth=1, label='raw acts')
    if hline is not None:
      ax.axhline(hline, color='grey', linestyle='--', linewidth=1)
    _log_x_if_positive(ax, all_x)
    ax.set_xlabel('L0 (active latents per token)')
    ax.set_title(title, fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_probing(results: Sequence[dict], path: str) -> str:
  """L0 vs sparse-probing test accuracy, one panel per k in the results."""
  ks = sorted(
      int(k[len('probing_acc_k') :])
      for k in results[0]
      if k.startswith('probing_acc_k')
  )
  panels = [(f'probing_acc_k{k}', f'sparse probing accuracy, k = {k}') for k in ks]
  return _versus_l0(results, panels, path, reference='probing_acc_raw')


def plot_absorption(results: Sequence[dict], path: str) -> str:
  """L0 vs absorption rate (full) and absorption fraction (lower is better)."""
  panels = [
      ('absorption_rate', 'absorption rate (first letter; lower is better)'),
      ('absorption_fraction', 'absorption fraction (lower is better)'),
  ]
  return _versus_l0(results, panels, path)


def write_all(results: Sequence[dict], out_dir: str) -> list[str]:
  """Writes pareto.png, shrinkage.png and density.png (results with core
  metrics), probing.png and absorption.png (results with those); returns the
  paths."""
  if not results:
    return []
  paths = []
  if all('l0' in r for r in results):
    paths += [
        plot_pareto(results, os.path.join(out_dir, 'pareto.png')),
        plot_shrinkage(results, os.path.join(out_dir, 'shrinkage.png')),
    ]
  if all('firing_frequency' in r for r in results):
    paths.append(plot_density(results, os.path.join(out_dir, 'density.png')))
  if all('l0' in r and 'probing_acc_raw' in r for r in results):
    paths.append(plot_probing(results, os.path.join(out_dir, 'probing.png')))
  if all('l0' in r and 'absorption_rate' in r for r in results):
    paths.append(plot_absorption(results, os.path.join(out_dir, 'absorption.png')))
  return paths
