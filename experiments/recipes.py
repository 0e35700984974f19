r"""The recipe study: which training defaults recover a known dictionary.

Synthetic activations (gsae_jax/data/synthetic.py) in d_in 32 with a known
dictionary of 4, 8 or 16 x d_in features (128, 256, 512; ~5 active per
example, magnitudes U(0.5, 1.5)), independent or correlated (copula 0.5 in
groups of 4), and SAEs of d_sae = features (every latent must find one).
Each question is ONE sweep: every architecture it concerns, each a stack of
SAEs in one compiled program over its own sparsity knob and the knob in
question. Results, and what each knob does: docs/recipes.md.

The config argument is QUESTION-DIFFICULTY, e.g. `warmup-f8c`: difficulty
f4, f8 or f16 (features / d_in), with a trailing c for correlated features.
Questions ("old" is experiments/synthetic.py's schedule as shipped before this
study: lr 4e-3 after a 7% lr warm-up, no sparsity warm-up, constant lr, no
resampling, W_enc = W_dec^T; "new" is the recipe the study found best: lr
1e-2, no lr warm-up, the sparsity coefficient warmed up over a quarter):

  old, new   the two recipes at 3 sparsities (x 3 seeds at f16c: the headline)
  warmup     sparsity warm-up over 0, 10, 25, 50% of training (old otherwise)
  lr         lr 1e-3, 4e-3, 1e-2, each with an lr warm-up of 0 or 7%
  decay      old, with the lr decaying linearly to 0 over the last 20%
  resample   old, with dead-latent resampling [P App. D] (L1 family, JumpReLU)
  init       old, with W_enc independent of W_dec (train.w_enc_init)
  batch256, batch2048   old at those batch sizes, the same examples (middle
             sparsity)

The commands of docs/recipes.md (one pinned core; ~70 min in all there):
  for q in old-f16c new-f16c lr-f8c warmup-f8c decay-f8c init-f8c \
      resample-f8c batch256-f8c batch2048-f8c old-f8c new-f8c; do
    taskset -c 1 python -m launch.sweep --config=experiments/recipes.py:$q \
        --workdir=runs/recipes/$q
  done
  python -m benchmarks.recipes --runs=runs/recipes --out=docs/recipes \
      --plots='old-f16c,new-f16c,newjr-f16c;old-f8c,new-f8c,newjr-f8c'
The other difficulties (e.g. old-f4 new-f4 old-f16 new-f16) run the same way.
"""

import ml_collections

from experiments import synthetic
from gsae_jax.sae import models

D_IN = 32
NUM_STEPS = 1500
BATCH = 512
DIFFICULTIES = ('f4', 'f8', 'f16', 'f4c', 'f8c', 'f16c')
QUESTIONS = (
    'old',
    'new',
    'warmup',
    'lr',
    'decay',
    'resample',
    'init',
    'batch256',
    'batch2048',
)
# Each architecture's sparsity knob: three values around the truth's L0 (~5).
KNOBS = {
    'l1_coeff': (0.1, 0.2, 0.3),
    'l0_coeff': (0.01, 0.03, 0.1),
    'k': (3, 5, 8),
}
# Architectures whose loss has a sparsity coefficient to warm up, and those
# that may resample (the TopK family revives latents with AuxK instead).
PENALISED = ('gated', 'baseline', 'jumprelu')


def _old(c: ml_collections.ConfigDict) -> None:
  """experiments/synthetic.py's schedule before this study, at NUM_STEPS."""
  c.train.lr = 4e-3
  c.train.lr_warmup_steps = NUM_STEPS * 200 // 3000
  c.train.l1_warmup_steps = 0
  c.train.l0_warmup_steps = 0
  c.train.lr_decay = 'constant'
  c.train.w_enc_init = 'transpose'
  c.resample.enabled = False


def _new(c: ml_collections.ConfigDict) -> None:
  """The recipe the study chose (docs/recipes.md), as the experiment configs
  now ship it: a higher lr without lr warm-up (the `lr` question) and the L1
  coefficient warmed up over the first quarter of training (the `warmup`
  question); JumpReLU's L0 coefficient is not warmed up (it loses from it)."""
  _old(c)
  c.train.lr = 1e-2
  c.train.lr_warmup_steps = 0
  c.train.l1_warmup_steps = NUM_STEPS // 4
  c.train.l0_warmup_steps = 0


def get_config(arg: str = 'old-f16c') -> ml_collections.ConfigDict:
  question, _, difficulty = arg.partition('-')
  if question not in QUESTIONS or difficulty not in DIFFICULTIES:
    raise ValueError(
        f'unknown config argument {arg!r}; use QUESTION-DIFFICULTY with QUESTION '
        f'in {", ".join(QUESTIONS)} and DIFFICULTY in {", ".join(DIFFICULTIES)}'
    )
  c = synthetic.get_config()
  ratio = int(difficulty[1:].rstrip('c'))
  c.sae.d_in = D_IN
  c.synthetic.n_features = ratio * D_IN
  c.synthetic.avg_active = 5.0
  c.synthetic.correlation = 0.5 if difficulty.endswith('c') else 0.0
  c.synthetic.correlation_group = 4
  c.sae.d_sae = c.synthetic.n_features
  c.train.batch_size = BATCH
  c.train.num_steps = NUM_STEPS
  c.train.dead_window_tokens = 200 * BATCH
  c.log.every_steps = 500
  c.log.tensorboard = False
  c.checkpoint.every_steps = NUM_STEPS
  c.checkpoint.max_to_keep = 1
  c.sweep.architecture = models.ARCHITECTURES
  for name, values in KNOBS.items():
    c.sweep[name] = values
  (_new if question == 'new' else _old)(c)
  if question in ('old', 'new') and difficulty == 'f16c':
    c.sweep.seed = (0, 1, 2)  # the headline: the hardest setting, 3 seeds
  elif question == 'warmup':
    c.sweep.architecture = PENALISED
    warmups = tuple(NUM_STEPS * p // 100 for p in (0, 10, 25, 50))
    c.sweep.l1_warmup_steps = warmups
    c.sweep.l0_warmup_steps = warmups
  elif question == 'lr':
    c.sweep.lr = (1e-3, 4e-3, 1e-2)
    c.sweep.lr_warmup_steps = (0, NUM_STEPS * 200 // 3000)
    for name, values in KNOBS.items():
      c.sweep[name] = values[1:2]
  elif question == 'decay':
    c.train.lr_decay = 'linear'
  elif question == 'resample':
    c.sweep.architecture = PENALISED
    c.resample.enabled = True
    c.resample.every_steps = NUM_STEPS // 8
    c.resample.stop_after_step = NUM_STEPS // 2
    c.resample.lr_warmup_steps = NUM_STEPS // 20
  elif question == 'init':
    c.train.w_enc_init = 'random'
  elif question.startswith('batch'):
    for name, values in KNOBS.items():
      c.sweep[name] = values[1:2]
    c.train.batch_size = int(question[len('batch') :])
    c.train.num_steps = NUM_STEPS * BATCH // c.train.batch_size
    c.train.lr_warmup_steps = c.train.num_steps * 200 // 3000
    c.checkpoint.every_steps = c.train.num_steps
    c.log.every_steps = c.train.num_steps // 4
  return c
