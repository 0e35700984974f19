r"""Trains one run (a stack of SAEs) from a config; re-running resumes it.

python -m launch.train --config=experiments/synthetic.py --workdir=runs/syn
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gsae_jax import parallel, train

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO.
  if _COORDINATOR.value or _DISTRIBUTED.value:
    parallel.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(train.EXIT_RESUME)


if __name__ == '__main__':
  app.run(main)
