r"""A sweep on synthetic activations: gated vs baseline over l1 coefficients.

Each architecture's SAEs train stacked in one compiled program; the baseline
is 1.5x wider (equal compute, as in the paper).

Run:
  python -m launch.sweep --config=experiments/synthetic_sweep.py --workdir=runs/syn_sweep
See the plan (groups, SAEs, memory) without training:
  python -m launch.sweep --config=experiments/synthetic_sweep.py \
      --workdir=runs/syn_sweep --dry_run
Change the grid from the command line:
  python -m launch.sweep --config=experiments/synthetic_sweep.py \
      --config.sweep.l1_coeff='(0.02,0.04)' --workdir=runs/syn_sweep2
Seconds-long variant: experiments/synthetic_sweep.py:runlocal
"""

from experiments import synthetic


def get_config(arg: str = ''):
  c = synthetic.get_config('runlocal' if arg == 'runlocal' else '')
  c.sweep.architecture = ('gated', 'baseline')
  c.sweep.l1_coeff = (0.02, 0.04, 0.08)
  c.sweep.baseline_width_factor = 1.5
  if arg not in ('', 'runlocal'):
    raise ValueError(f'unknown config argument {arg!r}; use "" or "runlocal"')
  return c
