r"""Gated SAEs on SmolLM2-135M's layer-15 residual stream (the bundled default).

One config drives the whole pipeline: harvest -> train (or sweep).
  python -m launch.harvest --config=experiments/smollm2.py
  python -m launch.train --config=experiments/smollm2.py --workdir=runs/smollm2
Seconds-long check: experiments/smollm2.py:runlocal
"""

from gsae_jax import config as config_lib


def get_config(arg: str = ''):
  c = config_lib.default_config()
  c.harvest.site = 'blocks.15.hook_resid_post'
  c.harvest.context_len = 128
  c.harvest.num_tokens = 250_000
  c.harvest.lm_batch_size = 8
  c.harvest.shard_rows = 1 << 16
  c.data.source = 'cache'
  c.data.cache_dir = 'cache/smollm2_l15_resid_post'
  c.data.shuffle_buffer = 1 << 17
  c.sae.d_in = 576
  c.sae.d_sae = 2304  # 4x
  c.sae.l1_coeff = 0.02
  c.train.batch_size = 1024
  c.train.num_steps = 2000
  c.train.lr = 1e-3
  c.train.lr_warmup_steps = 100
  c.train.l1_warmup_steps = 500  # a quarter of training (docs/recipes.md)
  c.train.b_dec_init = 'mean'
  c.train.dead_window_tokens = 500_000
  c.log.every_steps = 100
  c.checkpoint.every_steps = 500
  if arg == 'runlocal':
    c.harvest.context_len = 32
    c.harvest.num_tokens = 8_192
    c.harvest.shard_rows = 4096
    c.harvest.record_rows = 1024
    c.data.cache_dir = 'cache/smollm2_runlocal'
    c.sae.d_sae = 1024
    c.train.batch_size = 256
    c.train.num_steps = 100
    c.train.l1_warmup_steps = 25
    c.log.every_steps = 25
    c.checkpoint.every_steps = 50
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "" or "runlocal"')
  return c
