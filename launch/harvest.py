r"""Harvests LM activations into zarr stores; re-running resumes it.

  python -m launch.harvest --config=experiments/smollm2.py
  python -m launch.harvest --config=experiments/smollm2.py \
      --config.harvest.site=blocks.10.hook_mlp_out --config.data.cache_dir=cache/l10
Several sites from one LM pass, one store each:
  python -m launch.harvest --config=experiments/smollm2.py \
      --config.harvest.sites='("blocks.5.hook_resid_post","blocks.15.hook_resid_post")' \
      --config.data.cache_dir='cache/smollm2/{site}'
Many processes, each its own shards (any machines that see the store, e.g.
gs://bucket/acts/{site}); the one that finishes last marks the store complete:
  python -m launch.harvest --config=... --num_processes=4 --process_id=0   # ... 3
or under jax.distributed (a TPU pod's workers): --distributed.
"""

from absl import flags
from ml_collections import config_flags

from gsae_jax.data import harvest
from launch import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (path[:arg]).', lock_config=True
)
_CACHE_DIR = flags.DEFINE_string(
    'cache_dir', None, 'Where to write the store(s) (default: config.data.cache_dir).'
)
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Harvest processes in all (default: jax.process_count()).'
)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, "This process's index in [0, num_processes)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join the JAX cluster first (jax.distributed).'
)
flags.mark_flags_as_required(['config'])


def main():
  if (_NUM_PROCESSES.value is None) != (_PROCESS_ID.value is None):
    raise ValueError('--num_processes and --process_id: give both or neither')
  if _DISTRIBUTED.value:
    from gsae_jax.train import placement  # noqa: PLC0415

    placement.initialize_distributed(None, None, None)
  manifests = harvest.harvest(
      _CONFIG.value,
      _CACHE_DIR.value,
      process_index=_PROCESS_ID.value,
      process_count=_NUM_PROCESSES.value,
  )
  for site, m in manifests.items():
    if m is None:
      print(f'{site}: this process is done; the store waits for other processes')
      continue
    print(
        f'{site}: {m["count"]:,} activations of {m["model"]} (d_in {m["d_in"]}, '
        f'{m["dtype"]}), E||x||^2 = {m["stats"]["mean_sq_norm"]:.4g}'
    )


if __name__ == '__main__':
  cli.run(main)
