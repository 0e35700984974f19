r"""Six SAE architectures at equal compute on SmolLM2-135M: one frontier.

Gated [P], baseline ReLU [P §2], JumpReLU (arXiv 2407.14435), TopK (arXiv
2406.04093), BatchTopK (arXiv 2412.06410) and Matryoshka BatchTopK (arXiv
2503.17547), each at three values of its own sparsity knob (l1_coeff, l0_coeff
or k), trained on the main job's activations (layer-15 residual stream of the
bundled SmolLM2-135M on the bundled corpus; the cache is shared with
experiments/smollm2_sweep.py) and evaluated on held-out text. Results and the
comparison with the papers' claims: docs/results.md, "Six architectures".

  python -m launch.main --config=experiments/architectures.py --workdir=runs/architectures

Equal compute (FLOPs per step in this implementation, sweep.width_factors):
a gated SAE and the TopK family each run one encoder and two decoder-sized
matmuls per step (the gated auxiliary loss; AuxK), the baseline and JumpReLU
one of each, so those two get 1.5x the width, as the paper gives the baseline.
Miniature (the end-to-end test): experiments/architectures.py:test
"""

from experiments import smollm2_sweep
from gsae_jax.sae import models


def get_config(arg: str = ''):
  c = smollm2_sweep.get_config('test' if arg == 'test' else '')
  c.sweep.architecture = models.ARCHITECTURES  # all six
  c.sweep.l1_coeff = (0.003, 0.006, 0.012)
  c.sweep.l0_coeff = (0.0005, 0.002, 0.008)
  # JumpReLU learns log(theta) [J §4]: under Adam it moves by ~lr per step, so
  # in 800 steps theta changes by at most e^1.6 and the paper's initial 0.001
  # (x sqrt(d_in) = 0.024 here) leaves most latents on (L0 ~400 of 1728, seen
  # on this data). Start near the scale of the pre-activations instead.
  c.sae.jumprelu_init_threshold = 0.03
  c.sweep.k = (8, 24, 64)
  # The L1 coefficient (gated, baseline) warms up over the first quarter, as
  # in the main job; JumpReLU's L0 coefficient does not (train.l0_warmup_steps
  # stays 0): on a known dictionary the warm-up cost it most of its recovery
  # (0.66 against 0.91, docs/recipes.md).
  c.sweep.width_factors = (('baseline', 1.5), ('jumprelu', 1.5))
  if arg == 'test':
    c.sweep.l1_coeff = (0.01,)
    c.sweep.l0_coeff = (0.01,)
    c.sweep.k = (4,)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "" or "test"')
  return c
