r"""Trains a grid of SAEs, one compiled program per (architecture, d_sae) group.

  python -m launch.sweep --config=experiments/synthetic_sweep.py \
      --workdir=runs/sweep [--dry_run] [--group=gated_d512]
  python -m launch.sweep ... --cluster=slurm > sweep.sbatch   # one group per job

Groups whose states fit in memory together train on one pass over the data
(config.sweep.shared_data_pass; --dry_run says which and why). Re-running the
same command resumes: done groups are skipped, interrupted groups resume from
their checkpoints.
"""

import sys

from absl import flags
from ml_collections import config_flags

from gsae_jax.train import placement, sweep
from launch import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (path[:arg]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory (created; resumed).')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Print the plan (groups, SAEs, memory) and exit.'
)
_GROUP = flags.DEFINE_multi_string('group', [], 'Train only these groups.')
_CLUSTER = flags.DEFINE_enum(
    'cluster', None, ['slurm', 'tpu'], 'Print per-job commands and exit.'
)
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed',
    False,
    'Join a JAX cluster detected from the environment (Cloud TPU, Slurm); '
    'every process runs the same command.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def main():
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _CLUSTER.value:
    config_arg = flags.FLAGS['config'].serialize().split('=', 1)[1]
    sys.stdout.write(
        sweep.cluster_commands(config_arg, workdir, config, _CLUSTER.value)
    )
    return
  if _DRY_RUN.value:
    print(sweep.describe(config, workdir))
    return
  if _DISTRIBUTED.value:
    placement.initialize_distributed(None, None, None)
  rows = sweep.run(config, workdir, only=tuple(_GROUP.value))
  done = sum(r['status'] == 'done' for r in rows)
  print(f'{done}/{len(rows)} SAEs done; index: {workdir}/{sweep.INDEX_CSV}')


if __name__ == '__main__':
  cli.run(main)
