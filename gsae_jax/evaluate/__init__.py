"""Evaluation: metrics from dataset sums, the runner, reports, plots, export."""

from gsae_jax.evaluate.metrics import (
    DENSE_THRESHOLD,
    Sums,
    batch_stats,
    firing_frequency,
    loss_recovered,
    summary,
)
from gsae_jax.evaluate.runner import (
    EVAL_CSV,
    EVAL_JSON,
    EVALS,
    TOP_K,
    evaluate,
    evaluate_all,
    evaluate_synthetic,
    evaluate_workdir,
    format_table,
    parse_evals,
    replace_activation,
    splice_fn,
)

__all__ = [
    'DENSE_THRESHOLD',
    'EVAL_CSV',
    'EVAL_JSON',
    'EVALS',
    'TOP_K',
    'Sums',
    'batch_stats',
    'evaluate',
    'evaluate_all',
    'evaluate_synthetic',
    'evaluate_workdir',
    'firing_frequency',
    'format_table',
    'loss_recovered',
    'parse_evals',
    'replace_activation',
    'splice_fn',
    'summary',
]
