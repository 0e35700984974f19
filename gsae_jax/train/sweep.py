"""Sweeps: a grid of SAEs split into groups that each train as one program.

A grid point sets any of architecture, d_sae, its architecture's sparsity knob
(l1_coeff for gated and baseline, l0_coeff for jumprelu, k for the TopK
family), lr, warm-up lengths (the sparsity warm-up too is per architecture:
l1_warmup_steps or l0_warmup_steps) and seed (config.sweep). Points with the same
architecture and d_sae form a group: one stacked run (config.stack holds its
per-SAE values) trained by one jitted step in its own workdir,
<sweep>/groups/<name>. Groups whose states fit in memory together share one
pass over the data (config.sweep.shared_data_pass, data_passes): each batch is
read once and every group's step trains on it. The sweep index,
<sweep>/sweep.json and sweep.csv, has one row per SAE (its values, group,
position in the stack, checkpoint directory, status and final metrics), and is
rewritten atomically after every pass, so an interrupted sweep resumes: done
groups are skipped, interrupted ones resume from their checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os

import ml_collections
import numpy as np

from gsae_jax import config as config_lib
from gsae_jax import files, logs
from gsae_jax.data import sources
from gsae_jax.sae import models
from gsae_jax.train import checkpoints, planner

# The grid axes, in the order points are enumerated (the last varies fastest).
GRID_FIELDS = ('site', 'architecture', 'd_sae') + config_lib.STACK_FIELDS
INDEX_JSON, INDEX_CSV = 'sweep.json', 'sweep.csv'


@dataclasses.dataclass
class Group:
  """SAEs sharing one compiled program: same site, architecture and d_sae."""

  name: str
  config: ml_collections.ConfigDict  # a standalone run config with .stack set
  members: list[dict]  # the grid points, in stack order, with 'index'

  @property
  def size(self) -> int:
    return len(self.members)


def width_factor(config: ml_collections.ConfigDict, architecture: str) -> float:
  """The multiple of the swept d_sae an architecture trains at (equal compute)."""
  factors = dict(config.sweep.width_factors)
  if architecture in factors:
    return float(factors[architecture])
  return (
      float(config.sweep.baseline_width_factor) if architecture == 'baseline' else 1.0
  )


def expand(config: ml_collections.ConfigDict) -> list[dict]:
  """The grid points: one dict of GRID_FIELDS values per SAE, in index order.

  For each architecture, the Cartesian product of the non-empty axes, where
  of the sparsity knobs and their warm-ups only that architecture's own
  (models.SPARSITY_KNOB, models.SPARSITY_WARMUP) are swept; the others keep
  their base values.
  """
  # Fields that belong to some architectures only: the sparsity knobs and
  # their warm-ups; another architecture keeps their base values.
  owners: dict[str, set[str]] = {}
  for table in (models.SPARSITY_KNOB, models.SPARSITY_WARMUP):
    for arch, field in table.items():
      owners.setdefault(field, set()).add(arch)
  points = []
  sites = tuple(config.sweep.site) or (config.harvest.site,)
  archs = tuple(config.sweep.architecture) or (config.sae.architecture,)
  for site, arch in itertools.product(sites, archs):
    axes = []
    for n in GRID_FIELDS[2:]:
      swept = tuple(config.sweep[n])
      if n in owners and arch not in owners[n]:
        swept = ()
      axes.append(swept or (config_lib.base_value(config, n),))
    for values in itertools.product(*axes):
      point = {'site': site, 'architecture': arch}
      point.update(zip(GRID_FIELDS[2:], values, strict=True))
      point['d_sae'] = int(round(point['d_sae'] * width_factor(config, arch)))
      point['index'] = len(points)
      points.append(point)
  return points


def _site_tag(site: str) -> str:
  """'blocks.5.hook_resid_post' -> 'L5_resid_post' (a group-name prefix)."""
  layer, hook = site.removeprefix('blocks.').split('.hook_')
  return f'L{layer}_{hook}'


def site_of(group: Group) -> str:
  return group.config.harvest.site


def plan(config: ml_collections.ConfigDict) -> list[Group]:
  """The sweep's groups, each a run config whose stack holds its SAEs."""
  config_lib.validate(config)
  by_shape: dict[tuple[str, str, int], list[dict]] = {}
  for point in expand(config):
    key = (point['site'], point['architecture'], point['d_sae'])
    by_shape.setdefault(key, []).append(point)
  several_sites = len(tuple(config.sweep.site)) > 1
  groups = []
  for (site, arch, d_sae), members in by_shape.items():
    c = copy.deepcopy(config)
    with c.unlocked():
      c.harvest.site, c.sae.architecture, c.sae.d_sae = site, arch, d_sae
      for name in GRID_FIELDS:
        c.sweep[name] = ()
      for name in config_lib.STACK_FIELDS:
        c.stack[name] = tuple(m[name] for m in members)
    config_lib.validate(c)  # e.g. k <= this group's d_sae
    name = f'{arch}_d{d_sae}'
    groups.append(
        Group(f'{_site_tag(site)}_{name}' if several_sites else name, c, members)
    )
  return groups


def group_workdir(workdir: str, group: Group | str) -> str:
  name = group if isinstance(group, str) else group.name
  return os.path.join(workdir, 'groups', name)


def memory_estimate(
    config: ml_collections.ConfigDict, n_sae: int, n_devices: int | None = None
) -> planner.Plan:
  """Bytes per device of a group's stacked run on the config's mesh."""
  from gsae_jax.train import placement  # noqa: PLC0415

  if n_devices is None:
    import jax  # noqa: PLC0415

    n_devices = jax.device_count()
  mesh = placement.mesh_shape(config, n_devices)
  return planner.plan(
      config.sae.d_in,
      config.sae.d_sae,
      config.train.batch_size,
      n_sae,
      mesh,
      config.sae.architecture,
      2 if config.sae.compute_dtype == 'bfloat16' else 4,
  )


def memory_budget(config: ml_collections.ConfigDict) -> float:
  """Bytes per device a shared data pass may plan for (sweep.memory_budget_gib;
  0 = 80% of what the device reports, or of host RAM where it reports none,
  as on CPU)."""
  if config.sweep.memory_budget_gib > 0:
    return float(config.sweep.memory_budget_gib) * 2**30
  import jax  # noqa: PLC0415

  stats = jax.local_devices()[0].memory_stats() or {}
  total = stats.get('bytes_limit') or (
      os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  )
  return 0.8 * total


def data_passes(
    config: ml_collections.ConfigDict, groups: list[Group], budget: float | None = None
) -> tuple[list[list[Group]], str]:
  """How `groups` share reads of the data, and why.

  Returns passes, each a list of groups trained together on one read of every
  batch (train.train_together), in order. Only groups of one site (one store)
  can share a pass; within a site, sweep.shared_data_pass 'on': one pass;
  'off': one group per pass; 'auto': one pass if the planner says the groups'
  states fit the budget together (planner.shared_pass_bytes), else
  consecutive groups packed into passes while they fit (one group at a time
  where no two do).
  """
  by_site: dict[str, list[Group]] = {}
  for g in groups:
    by_site.setdefault(site_of(g), []).append(g)
  if len(by_site) <= 1:
    return _passes_of_one_source(config, groups, budget)
  passes, reasons = [], []
  for site, site_groups in by_site.items():
    p, why = _passes_of_one_source(config, site_groups, budget)
    passes += p
    reasons.append(f'{site}: {why}')
  return passes, '; '.join(reasons)


def _passes_of_one_source(
    config: ml_collections.ConfigDict, groups: list[Group], budget: float | None
) -> tuple[list[list[Group]], str]:
  mode = config.sweep.shared_data_pass
  if mode == 'off':
    return [[g] for g in groups], 'sweep.shared_data_pass=off: one group at a time'
  if len(groups) <= 1:
    return [list(groups)] if groups else [], 'one group to train'
  if mode == 'on':
    return [list(groups)], 'sweep.shared_data_pass=on: all groups on one pass'
  budget = memory_budget(config) if budget is None else budget
  fmt = planner.format_bytes
  plans = {g.name: memory_estimate(g.config, g.size) for g in groups}
  need = lambda gs: planner.shared_pass_bytes([plans[g.name] for g in gs])
  if need(groups) <= budget:
    return [list(groups)], (
        f'auto: the {len(groups)} groups fit together (~{fmt(need(groups))} of '
        f'a {fmt(budget)} budget per device): one pass'
    )
  passes = [[groups[0]]]
  for g in groups[1:]:
    if need(passes[-1] + [g]) <= budget:
      passes[-1].append(g)
    else:
      passes.append([g])
  how = (
      'one group at a time'
      if len(passes) == len(groups)
      else f'{len(passes)} passes of the groups that fit together'
  )
  return passes, (
      f'auto: together the {len(groups)} groups need ~{fmt(need(groups))} per '
      f'device, over the {fmt(budget)} budget (sweep.memory_budget_gib): {how}'
  )


def describe(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The plan as text: groups, their SAEs and memory, and what is done."""
  groups = plan(config)
  lines = [
      f'sweep of {sum(g.size for g in groups)} SAEs in {len(groups)} group(s) '
      f'-> {workdir}'
  ]
  for g in groups:
    mem = memory_estimate(g.config, g.size)
    status = 'done' if is_done(g, workdir) else 'to train'
    fmt = planner.format_bytes
    lines.append(
        f'  {g.name}: {g.size} SAEs (indices {g.members[0]["index"]}..'
        f'{g.members[-1]["index"]}), d_in {g.config.sae.d_in}, '
        f'{g.config.train.num_steps} steps, ~{fmt(mem.total)} per device '
        f'(params {fmt(mem.params)}, Adam {fmt(mem.adam)}, activations '
        f'{fmt(mem.activations)}), {mem.flops_per_step / 1e9:.1f} GFLOP/step '
        f'[{status}]'
    )
    for m in g.members:
      varied = ', '.join(
          f'{k}={m[k]}' for k in config_lib.STACK_FIELDS if config.sweep[k]
      )
      lines.append(f'    #{m["index"]}: {varied or "(base values)"}')
  todo = [g for g in groups if not is_done(g, workdir)]
  passes, why = data_passes(config, todo)
  lines.append(f'data passes: {len(passes)} ({why})')
  for i, members in enumerate(passes):
    lines.append(f'  pass {i + 1}: {", ".join(g.name for g in members)}')
  return '\n'.join(lines)


def is_done(group: Group, workdir: str) -> bool:
  gdir = group_workdir(workdir, group)
  done = checkpoints.steps(gdir) if os.path.isdir(gdir) else []
  return bool(done) and done[-1] >= int(group.config.train.num_steps)


def _final_metrics(gdir: str, position: int) -> dict:
  path = os.path.join(gdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = [ln for ln in f if ln.strip()]
  if not lines:
    return {}
  record = json.loads(lines[-1])
  out = {'final_step': record['step']}
  for k, v in record.items():
    if isinstance(v, list) and len(v) > position:
      out[k] = v[position]
  return out


def index_rows(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """The sweep index as it stands on disk: one row per SAE."""
  rows = []
  for g in plan(config):
    gdir = group_workdir(workdir, g)
    done = is_done(g, workdir)
    started = os.path.isdir(gdir) and bool(checkpoints.steps(gdir))
    for position, m in enumerate(g.members):
      row = {
          'index': m['index'],
          'group': g.name,
          'position': position,
          **{k: m[k] for k in GRID_FIELDS},
          'workdir': os.path.relpath(gdir, workdir),
          'status': 'done' if done else ('partial' if started else 'pending'),
      }
      if started:
        row.update(
            {f'metric_{k}': v for k, v in _final_metrics(gdir, position).items()}
        )
      rows.append(row)
  return rows


def write_index(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Rewrites sweep.json (with the sweep config) and sweep.csv atomically.

  Only process 0 writes; every process gets the rows.
  """
  import jax  # noqa: PLC0415

  rows = index_rows(config, workdir)
  if jax.process_index() != 0:
    return rows
  path = os.path.join(workdir, INDEX_JSON)
  if os.path.exists(path):  # keep what launch.evaluate merged in
    with open(path) as f:
      previous = {r['index']: r for r in json.load(f)['rows']}
    for row in rows:
      old = previous.get(row['index'], {})
      row.update({k: v for k, v in old.items() if k.startswith('eval_')})
  doc = {'config': config.to_dict(), 'rows': rows}
  files.atomic_write_json(os.path.join(workdir, INDEX_JSON), doc, default=_jsonable)
  files.atomic_write_csv(os.path.join(workdir, INDEX_CSV), rows)
  return rows


def _jsonable(v):
  if isinstance(v, np.generic):
    return v.item()
  raise TypeError(f'not JSON serialisable: {v!r}')


def read_index(workdir: str) -> dict:
  """{'config': ConfigDict, 'rows': [...]} of a sweep directory."""
  path = os.path.join(workdir, INDEX_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} is not a sweep directory (no {INDEX_JSON})')
  with open(path) as f:
    doc = json.load(f)
  doc['config'] = config_lib.with_defaults(doc['config'])
  return doc


def check_sweep_dir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a sweep directory that holds another sweep's config."""
  path = os.path.join(workdir, INDEX_JSON)
  if not os.path.exists(path):
    return
  stored = read_index(workdir)['config']
  diffs = config_lib.incompatible_fields(stored, config)
  if diffs:
    raise ValueError(
        f'sweep directory {workdir} holds another sweep; differing fields:\n  '
        + '\n  '.join(diffs)
    )


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    only: tuple[str, ...] = (),
    train_fn=None,
) -> list[dict]:
  """Trains every group not yet done (or just the groups named in `only`).

  Groups that share a data pass (data_passes) train together, each batch read
  once; a pass of one group is `train_fn(config, group_workdir)` (default
  train.train_and_evaluate). Returns the final sweep index rows.
  """
  from gsae_jax import train  # noqa: PLC0415 (train imports this module's users)

  train_fn = train_fn or train.train_and_evaluate
  groups = plan(config)
  names = [g.name for g in groups]
  for name in only:
    if name not in names:
      raise ValueError(f'--group {name!r} is not in this sweep; groups: {names}')
  check_sweep_dir(config, workdir)
  for site in dict.fromkeys(site_of(g) for g in groups):  # each site's store
    sources.check_source(next(g.config for g in groups if site_of(g) == site))
  os.makedirs(workdir, exist_ok=True)
  write_index(config, workdir)
  todo = []
  for g in groups:
    if only and g.name not in only:
      continue
    if is_done(g, workdir):
      logs.info(f'group {g.name}: done, skipped')
      continue
    todo.append(g)
  passes, why = data_passes(config, todo)
  if todo:
    logs.info(f'data passes: {len(passes)} ({why})')
  for members in passes:
    for g in members:
      logs.info(f'group {g.name}: training {g.size} SAEs in one program')
    try:
      if len(members) == 1:
        train_fn(members[0].config, group_workdir(workdir, members[0]))
      else:
        train.train_together([(g.config, group_workdir(workdir, g)) for g in members])
    finally:
      write_index(config, workdir)
  return write_index(config, workdir)


def cluster_commands(
    config_arg: str, workdir: str, config: ml_collections.ConfigDict, kind: str
) -> str:
  """Per-job shell commands: one group per job, all in one sweep workdir.

  kind 'slurm': an sbatch array script; 'tpu': one gcloud command per group
  (each a multi-host job over the pod slice's workers).
  """
  groups = plan(config)
  cmd = f'python -m launch.sweep --config={config_arg} --workdir={workdir}'
  if kind == 'slurm':
    names = ' '.join(g.name for g in groups)
    return '\n'.join(
        [
            '#!/bin/bash',
            f'#SBATCH --array=0-{len(groups) - 1}',
            '#SBATCH --job-name=gsae_sweep',
            f'GROUPS=({names})',
            f'{cmd} --group="${{GROUPS[$SLURM_ARRAY_TASK_ID]}}"',
            '',
        ]
    )
  if kind == 'tpu':
    return (
        '\n'.join(
            f'gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all '
            f"--command='cd gsae_jax && {cmd} --distributed --group={g.name}'"
            for g in groups
        )
        + '\n'
    )
  raise ValueError(f'cluster kind {kind!r} is not one of slurm, tpu')
