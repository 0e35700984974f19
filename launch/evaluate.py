r"""Evaluates the SAEs of a run or sweep on held-out data; writes results and plots.

  python -m launch.evaluate --workdir=runs/sweep [--num_tokens=20000] [--out=...]
      [--evals=core,probing,absorption]

Writes eval.json, eval.csv and eval_density.npz (one row / array per SAE),
pareto.png (L0 vs loss recovered, per architecture), shrinkage.png,
density.png and, for LM SAEs, latents/sae_<index>.html (top-activating
snippets) into --out (default: --workdir). For a sweep directory the metrics
are also merged into its index (sweep.json / sweep.csv rows get eval_* keys).
LM SAEs are evaluated on the held-out text split (--split) of their harvest
dataset, synthetic-source SAEs on held-out generator batches.

--evals picks the evaluations (a comma list): core (the default: the metrics
above), probing (sparse probing on four binary tasks of the bundled corpus;
probing.png) and absorption (first-letter feature absorption;
absorption.png), both for LM SAEs only; their columns join eval.json/csv and
the sweep index. Without core, they join the rows of an earlier eval.json.
"""

from absl import flags

from gsae_jax import evaluate
from launch import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run or sweep directory.')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', 20_000, 'Tokens to evaluate on.')
_OUT = flags.DEFINE_string('out', None, 'Where to write (default: --workdir).')
_SPLIT = flags.DEFINE_string('split', 'validation', 'Held-out text split (LM SAEs).')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, 'Contexts per LM call (default: config.harvest.lm_batch_size).'
)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
_MERGE_INDEX = flags.DEFINE_bool(
    'merge_index', True, 'Merge the metrics into a sweep index (sweep.json/csv).'
)
_PLOTS = flags.DEFINE_bool('plots', True, 'Write the PNG plots.')
_REPORT_LATENTS = flags.DEFINE_integer(
    'report_latents', 24, 'Latents per SAE in the HTML report (0: no report).'
)
_EVALS = flags.DEFINE_string(
    'evals',
    'core',
    f'Comma list of evaluations to run, of: {", ".join(evaluate.EVALS)}.',
)
flags.mark_flags_as_required(['workdir'])


def main():
  results = evaluate.evaluate_workdir(
      _WORKDIR.value,
      out_dir=_OUT.value,
      num_tokens=_NUM_TOKENS.value,
      split=_SPLIT.value,
      batch_size=_BATCH_SIZE.value,
      step=_STEP.value,
      merge_index=_MERGE_INDEX.value,
      plots=_PLOTS.value,
      report_latents=_REPORT_LATENTS.value,
      evals=_EVALS.value,
  )
  print(evaluate.format_table(results))
  print(f'results: {_OUT.value or _WORKDIR.value}/{evaluate.EVAL_CSV}')


if __name__ == '__main__':
  cli.run(main)
