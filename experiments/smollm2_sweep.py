r"""The main job: gated vs baseline SAEs on SmolLM2-135M, harvest to plots.

README command 1 runs this: harvest layer-15 residual-stream activations of
the bundled SmolLM2-135M from the bundled corpus, train a sweep of gated and
baseline SAEs over l1 coefficients at equal compute (baseline 1.5x wider, as in
the paper), evaluate them on held-out text (L0, FVU, shrinkage, loss
recovered by splicing into the LM) and write the plots and a results table.

  python -m launch.main --config=experiments/smollm2_sweep.py --workdir=runs/main
Bigger (about an hour on 2 cores): experiments/smollm2_sweep.py:full
Miniature (the end-to-end test): experiments/smollm2_sweep.py:test
"""

from experiments import smollm2


def get_config(arg: str = ''):
  c = smollm2.get_config()
  c.data.cache_dir = 'cache/smollm2_l15_resid_post'
  c.harvest.num_tokens = 150_000
  c.sae.d_sae = 1152  # 2x d_in; the baseline gets 1.5x that
  c.train.batch_size = 512
  c.train.num_steps = 800
  c.train.lr = 2e-3
  c.train.lr_warmup_steps = 50
  # The sparsity coefficient warms up over the first quarter of training: on
  # known dictionaries it recovers more of the truth (docs/recipes.md, the
  # warm-up question), and on this job's data old vs new: docs/recipes.md.
  c.train.l1_warmup_steps = 200
  c.train.dead_window_tokens = 200_000
  c.log.every_steps = 50
  c.checkpoint.every_steps = 250
  c.sweep.architecture = ('gated', 'baseline')
  c.sweep.l1_coeff = (0.0015, 0.003, 0.006, 0.012)
  c.sweep.baseline_width_factor = 1.5
  c.eval.num_tokens = 8192
  if arg == 'full':
    c.data.cache_dir = 'cache/smollm2_l15_resid_post_full'
    c.harvest.num_tokens = 2_000_000
    c.sae.d_sae = 4608  # 8x
    c.train.batch_size = 4096
    c.train.num_steps = 5000
    c.train.lr = 1e-3
    c.train.lr_warmup_steps = 200
    c.train.l1_warmup_steps = 1250  # a quarter of training
    c.sweep.l1_coeff = (0.005, 0.01, 0.02, 0.04, 0.08)
    c.eval.num_tokens = 50_000
  elif arg == 'test':
    c.harvest.context_len = 16
    c.harvest.num_tokens = 600
    c.harvest.lm_batch_size = 4
    c.harvest.shard_rows = 128
    c.harvest.record_rows = 32
    c.data.shuffle_buffer = 256
    c.sae.d_sae = 32
    c.train.batch_size = 64
    c.train.num_steps = 10
    c.train.l1_warmup_steps = 0  # the end-to-end test's 10 steps: constant
    c.log.every_steps = 5
    c.log.tensorboard = False
    c.checkpoint.every_steps = 10
    c.sweep.l1_coeff = (0.01, 0.04)
    c.eval.num_tokens = 128
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "", "full" or "test"')
  return c
