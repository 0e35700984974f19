r"""Harvests LM activations into a sharded cache; re-running resumes it.

  python -m launch.harvest --config=experiments/smollm2.py
  python -m launch.harvest --config=experiments/smollm2.py \
      --config.harvest.site=blocks.10.hook_mlp_out --config.data.cache_dir=cache/l10
"""

from absl import flags
from ml_collections import config_flags

from gsae_jax.data import harvest
from launch import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (path[:arg]).', lock_config=True
)
_CACHE_DIR = flags.DEFINE_string(
    'cache_dir', None, 'Where to write the cache (default: config.data.cache_dir).'
)
flags.mark_flags_as_required(['config'])


def main():
  manifest = harvest.harvest(_CONFIG.value, _CACHE_DIR.value)
  print(
      f'cache: {manifest["count"]:,} activations of {manifest["model"]} at '
      f'{manifest["site"]} (d_in {manifest["d_in"]}, {manifest["dtype"]}), '
      f'E||x||^2 = {manifest["stats"]["mean_sq_norm"]:.4g}'
  )


if __name__ == '__main__':
  cli.run(main)
