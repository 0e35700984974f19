r"""Measures the recipe study's sweeps (experiments/recipes.py) on their truth.

For every sweep directory under --runs, loads each SAE (gsae_jax.load) and
measures it on a held-out synthetic batch of 8192 examples drawn apart from
the training stream: dictionary recovery (mean over the true features of the
best cosine with a decoder row), L0, FVU, shrinkage gamma and the fraction of
latents that never fire on the batch. Writes <out>/results.json (one row per
SAE), <out>/tables.md (per question and architecture: mean and spread over
seeds) and <out>/recovery_vs_l0_<sweep>.png.

  python -m benchmarks.recipes --runs=runs/recipes --out=docs/recipes
"""

import argparse
import collections
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gsae_jax  # noqa: E402
from experiments import recipes  # noqa: E402
from gsae_jax.data import synthetic  # noqa: E402
from gsae_jax.evaluate import plots  # noqa: E402
from gsae_jax.sae import models  # noqa: E402
from gsae_jax.train import sweep  # noqa: E402

HELDOUT_ROWS = 8192
# The per-SAE values a question varies besides the sparsity knob and seed
# ('sparsity_warmup_steps': the warm-up of the architecture's own coefficient).
VARIED = ('lr', 'lr_warmup_steps', 'sparsity_warmup_steps')


def _sparsity_warmup(row: dict) -> int:
  """The warm-up of the row's own coefficient (0 for the TopK family). Sweeps
  run before train.l0_warmup_steps existed warmed up JumpReLU by l1_warmup_steps."""
  field = models.SPARSITY_WARMUP.get(row['architecture'])
  return int(row.get(field, row['l1_warmup_steps'])) if field else 0


def measure_sweep(workdir: str) -> list[dict]:
  """One row per SAE of the sweep in `workdir`, measured on held-out data."""
  doc = sweep.read_index(workdir)
  config = doc['config']
  source = synthetic.SyntheticSource(config.synthetic, config.sae.d_in, HELDOUT_ROWS)
  x = np.asarray(source.heldout_batch())  # raw units, never a training batch
  var = np.sum(np.square(x - x.mean(axis=0)))
  # Chance: the recovery of a random decoder of the same size (no training).
  random_decoder = np.random.default_rng(0).normal(
      size=(config.sae.d_sae, config.sae.d_in)
  )
  chance = synthetic.mean_max_cosine(source.dictionary, random_decoder)
  rows, groups = [], {}
  for row in doc['rows']:
    if row['status'] != 'done':
      continue
    if row['workdir'] not in groups:  # one group's stack: one checkpoint read
      saes = gsae_jax.load(os.path.join(workdir, row['workdir']))
      groups[row['workdir']] = saes if isinstance(saes, list) else [saes]
    sae = groups[row['workdir']][row['position']]
    f = np.asarray(sae.encode(jnp.asarray(x)))
    x_hat = np.asarray(sae.decode(jnp.asarray(f)))
    knob = models.SPARSITY_KNOB[row['architecture']]
    rows.append(
        {
            'sweep': os.path.basename(os.path.normpath(workdir)),
            'index': row['index'],
            'architecture': row['architecture'],
            'knob': knob,
            'knob_value': row[knob],
            'seed': row['seed'],
            'lr': row['lr'],
            'lr_warmup_steps': row['lr_warmup_steps'],
            'sparsity_warmup_steps': _sparsity_warmup(row),
            'batch_size': int(config.train.batch_size),
            'recovery': synthetic.mean_max_cosine(
                source.dictionary, sae.params['W_dec']
            ),
            'l0': float(np.mean(np.sum(f > 0, axis=-1))),
            'fvu': float(np.sum(np.square(x - x_hat)) / var),
            'gamma': float(np.sum(np.square(x_hat)) / np.sum(x * x_hat)),
            'dead': float(np.mean(np.all(f <= 0, axis=0))),
            'chance': chance,
        }
    )
  return rows


def _setting(r: dict) -> tuple:
  return (r['architecture'], r['knob_value'], *(r[k] for k in VARIED))


def summarise(rows: list[dict]) -> list[dict]:
  """Rows grouped over seeds: means, and the spread (max - min) of recovery."""
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r['sweep'], *_setting(r))].append(r)
  out = []
  for members in groups.values():
    rec = [m['recovery'] for m in members]
    s = {k: members[0][k] for k in ('sweep', 'architecture', 'knob', 'knob_value')}
    s.update({k: members[0][k] for k in VARIED + ('batch_size',)})
    s['seeds'] = len(members)
    s['chance'] = members[0]['chance']
    for k in ('recovery', 'l0', 'fvu', 'gamma', 'dead'):
      s[k] = float(np.mean([m[k] for m in members]))
    s['recovery_spread'] = float(max(rec) - min(rec))
    out.append(s)
  return out


def table(summary: list[dict]) -> str:
  lines = []
  for name in sorted({s['sweep'] for s in summary}):
    first = next(s for s in summary if s['sweep'] == name)
    lines += [
        f'### {name}',
        '',
        f'Chance (an untrained random decoder of the same size): '
        f'{first["chance"]:.3f}.',
        '',
        '| arch | knob | lr | lr warm-up | sparsity warm-up | batch | seeds '
        '| recovery (spread) | L0 | FVU | gamma | dead |',
        '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    for s in (s for s in summary if s['sweep'] == name):
      knob = {'l1_coeff': 'l1', 'l0_coeff': 'l0'}.get(s['knob'], s['knob'])
      lines.append(
          f'| {s["architecture"]} | {knob}={s["knob_value"]:g} | {s["lr"]:g} '
          f'| {s["lr_warmup_steps"]:g} | {s["sparsity_warmup_steps"]:g} '
          f'| {s["batch_size"]} | {s["seeds"]} | {s["recovery"]:.3f} '
          f'({s["recovery_spread"]:.3f}) | {s["l0"]:.1f} | {s["fvu"]:.3f} '
          f'| {s["gamma"]:.3f} | {s["dead"]:.2f} |'
      )
    lines.append('')
  return '\n'.join(lines)


def best(summary: list[dict], arch: str) -> dict | None:
  """The setting of `arch` with the highest mean recovery."""
  rows = [s for s in summary if s['architecture'] == arch]
  return max(rows, key=lambda s: s['recovery']) if rows else None


# The recipe's own warm-ups (experiments/recipes.py `_new`), per field.
_SHIPPED = recipes.get_config('new-f16c').train


def shipped(s: dict) -> bool:
  """Whether a setting of a `new*` sweep is the recipe as the experiment
  configs ship it: its architecture's warm-up is the one `_new` sets (the
  L1 coefficient over a quarter of training, JumpReLU's L0 coefficient none)."""
  field = models.SPARSITY_WARMUP.get(s['architecture'])
  return field is None or s['sparsity_warmup_steps'] == _SHIPPED[field]


def headline(rows: list[dict], summary: list[dict]) -> str:
  """Old vs new (as shipped) at each architecture's best sparsity, per
  difficulty. The new recipe's rows come from the sweeps `new-D` and
  `new<anything>-D` (e.g. a JumpReLU-only re-run, `newjr-D`)."""
  sweeps = {s['sweep'] for s in summary}
  lines = []
  for difficulty in sorted({n.split('-', 1)[1] for n in sweeps if '-' in n}):
    old = f'old-{difficulty}'
    news = {n for n in sweeps if n.startswith('new') and n.endswith(f'-{difficulty}')}
    if old not in sweeps or f'new-{difficulty}' not in sweeps:
      continue
    new_rows = [s for s in summary if s['sweep'] in news and shipped(s)]
    lines += [
        f'### Best sparsity, old vs new recipe: {difficulty}',
        '',
        '| arch | old: knob | recovery (min..max over seeds) | L0 | FVU | gamma '
        '| new: knob | recovery (min..max over seeds) | L0 | FVU | gamma |',
        '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    for arch in models.ARCHITECTURES:
      cells = []
      for candidates in ([s for s in summary if s['sweep'] == old], new_rows):
        b = best(candidates, arch)
        if b is None:
          cells.append('| - ' * 5)
          continue
        rec = [
            r['recovery']
            for r in rows
            if r['sweep'] == b['sweep'] and _setting(r) == _setting(b)
        ]
        cells.append(
            f'| {b["knob_value"]:g} | {b["recovery"]:.3f} ({min(rec):.3f}..'
            f'{max(rec):.3f}) | {b["l0"]:.1f} | {b["fvu"]:.3f} | {b["gamma"]:.3f} '
        )
      lines.append(f'| {arch} ' + ''.join(cells) + '|')
    lines.append('')
  return '\n'.join(lines)


def difficulty_table(summary: list[dict]) -> str:
  """Best-sparsity recovery, old -> new (as shipped), for every difficulty
  with both sweeps: one row per architecture, one column per difficulty."""
  sweeps = {s['sweep'] for s in summary}
  difficulties = [
      d
      for d in ('f4', 'f4c', 'f8', 'f8c', 'f16', 'f16c')
      if f'old-{d}' in sweeps and f'new-{d}' in sweeps
  ]
  if not difficulties:
    return ''
  chance = {
      d: next(s['chance'] for s in summary if s['sweep'] == f'old-{d}')
      for d in difficulties
  }
  lines = [
      '### Best-sparsity recovery, old -> new (as shipped), every difficulty',
      '',
      '| arch | '
      + ' | '.join(f'{d} (chance {chance[d]:.2f})' for d in difficulties)
      + ' |',
      '| --- |' + ' --- |' * len(difficulties),
  ]
  for arch in models.ARCHITECTURES:
    cells = []
    for d in difficulties:
      old = best([s for s in summary if s['sweep'] == f'old-{d}'], arch)
      new = best(
          [
              s
              for s in summary
              if s['sweep'].startswith('new')
              and s['sweep'].endswith(f'-{d}')
              and shipped(s)
          ],
          arch,
      )
      cells.append(
          f'{old["recovery"]:.3f} -> {new["recovery"]:.3f}' if old and new else '-'
      )
    lines.append(f'| {arch} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines + [''])


def plot(summary: list[dict], sweeps: list[str], path: str) -> None:
  """Recovery vs L0, one panel per sweep, one series per architecture."""
  fig = Figure(figsize=(4.2 * len(sweeps), 3.6))
  FigureCanvasAgg(fig)
  # Shared axes: the panels compare recipes at a glance.
  axes = fig.subplots(1, len(sweeps), sharex=True, sharey=True, squeeze=False)[0]
  for ax, name in zip(axes, sweeps, strict=True):
    for arch in models.ARCHITECTURES:
      pts = sorted(
          (s['l0'], s['recovery'])
          for s in summary
          if s['sweep'] == name and s['architecture'] == arch
      )
      if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, 'o', color=plots._COLORS[arch], label=arch, alpha=0.8)
    ax.axvline(5.0, color='grey', lw=0.5, ls=':')  # the truth's mean L0
    ax.set_xscale('log')
    ax.set_xlabel('L0 (held out)')
    ax.set_ylabel('dictionary recovery (mean best cosine)')
    ax.set_title(name)
    ax.grid(alpha=0.3)
  fig.axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', required=True, help='directory of sweep workdirs')
  parser.add_argument('--out', required=True, help='directory for json/md/png')
  parser.add_argument('--plots', default='', help='comma-separated sweeps per plot')
  args = parser.parse_args()
  rows = []
  for name in sorted(os.listdir(args.runs)):
    workdir = os.path.join(args.runs, name)
    if os.path.exists(os.path.join(workdir, sweep.INDEX_JSON)):
      rows += measure_sweep(workdir)
      print(f'measured {name}', flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  summary = summarise(rows)
  with open(os.path.join(args.out, 'tables.md'), 'w') as f:
    f.write(
        headline(rows, summary)
        + '\n'
        + difficulty_table(summary)
        + '\n'
        + table(summary)
    )
  for group in filter(None, args.plots.split(';')):
    names = group.split(',')
    plot(summary, names, os.path.join(args.out, f'recovery_vs_l0_{names[0]}.png'))


if __name__ == '__main__':
  main()
