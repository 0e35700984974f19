r"""Trains one run (a stack of SAEs) from a config; re-running resumes it.

python -m launch.train --config=experiments/synthetic.py --workdir=runs/syn
"""

from absl import app, flags, logging
from ml_collections import config_flags

from gsae_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (path[:arg]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO.
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
