r"""The main job, end to end: harvest -> sweep -> evaluate -> plots and table.

  python -m launch.main --config=experiments/smollm2_sweep.py --workdir=runs/main

Every stage resumes: a complete cache is reused, done sweep groups are
skipped, so re-running the command after an interruption finishes the job.
Writes into --workdir: the sweep (groups/, sweep.json, sweep.csv), eval.json,
eval.csv, pareto.png, shrinkage.png, density.png, latents/*.html and
results.md.
"""

import os
import time

from absl import flags
from ml_collections import config_flags

from gsae_jax import evaluate, files, logs
from gsae_jax.data import harvest
from gsae_jax.train import sweep
from launch import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (path[:arg]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (created; resumed).')
flags.mark_flags_as_required(['config', 'workdir'])


def main():
  config, workdir = _CONFIG.value, _WORKDIR.value
  sweep.plan(config)  # every config error before any work
  times = {}
  t = time.perf_counter()
  if config.data.source == 'cache':
    logs.info(f'== harvest -> {config.data.cache_dir}')
    harvest.harvest(config)
    times['harvest'] = time.perf_counter() - t
  logs.info(f'== sweep -> {workdir}')
  t = time.perf_counter()
  sweep.run(config, workdir)
  times['sweep'] = time.perf_counter() - t
  logs.info('== evaluate on held-out data')
  t = time.perf_counter()
  results = evaluate.evaluate_workdir(
      workdir, num_tokens=int(config.eval.num_tokens), split=config.eval.split
  )
  times['evaluate'] = time.perf_counter() - t
  table = evaluate.format_table(results)
  timing = ', '.join(f'{k} {v / 60:.1f} min' for k, v in times.items())
  files.atomic_write_text(
      os.path.join(workdir, 'results.md'),
      f'# Results\n\n{table}\n\nStages: {timing}.\n',
  )
  print(table)
  print(f'\n{timing}\nresults: {workdir}/results.md, plots: {workdir}/*.png')


if __name__ == '__main__':
  cli.run(main)
