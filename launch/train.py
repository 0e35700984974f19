r"""Trains one run (a stack of SAEs) from a config; re-running resumes it.

python -m launch.train --config=experiments/synthetic.py --workdir=runs/syn
"""

from absl import flags
from ml_collections import config_flags

from gsae_jax import train
from gsae_jax.train import placement
from launch import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (path[:arg]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator', None, 'Multi-host: host:port of process 0 (jax.distributed).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed',
    False,
    'Join a JAX cluster detected from the environment (Cloud TPU, Slurm).',
)
flags.mark_flags_as_required(['config', 'workdir'])


def main():
  if _COORDINATOR.value or _DISTRIBUTED.value:
    placement.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
