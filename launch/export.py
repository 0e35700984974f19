r"""Exports the SAEs of a run or sweep to SAELens, JumpReLU or npz files.

  python -m launch.export --workdir=runs/sweep --format=saelens --out=export/
  python -m launch.export --workdir=runs/sweep --format=jumprelu --index=3 --out=...
  python -m launch.export --workdir=runs/syn --format=npz --out=export/

Each SAE goes to <out>/sae_<index> (a SAELens directory: cfg.json,
sae_weights.safetensors and, after launch.evaluate, sparsity.safetensors) or
<out>/sae_<index>.npz. Weights are in raw activation units (normalisation
folded in). Each architecture is written as SAELens's own (jumprelu; topk with
its k; BatchTopK and Matryoshka as jumprelu with their inference threshold).
--format=jumprelu also writes gated SAEs as SAELens JumpReLU SAEs (the exact
equivalent, [P App. E]) and skips SAEs with no JumpReLU form (baseline,
topk).
"""

from absl import flags

from gsae_jax.evaluate import export
from launch import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run or sweep directory.')
_FORMAT = flags.DEFINE_enum('format', 'saelens', list(export.FORMATS), 'Output format.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_INDEX = flags.DEFINE_integer('index', None, 'Export only this SAE (default: all).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
flags.mark_flags_as_required(['workdir', 'out'])


def main():
  paths = export.export_workdir(
      _WORKDIR.value, _OUT.value, _FORMAT.value, index=_INDEX.value, step=_STEP.value
  )
  for path in paths:
    print(path)


if __name__ == '__main__':
  cli.run(main)
