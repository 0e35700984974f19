"""Training: state, compiled step, loop, placement on devices, checkpoints, sweeps.

`train_and_evaluate(config, workdir)` is the entry point (`train_together` for
several runs on one data pass); the names below are
the parts a caller (launchers, benchmarks, tests) builds with.
"""

from gsae_jax.train.loop import (
    EXIT_RESUME,
    Preempted,
    load_metrics,
    train_and_evaluate,
    train_together,
)
from gsae_jax.train.state import (
    TrainState,
    dead_window_steps,
    host_params,
    hparams_from_config,
    init_state,
    seeds_from_config,
    summary,
)
from gsae_jax.train.step import (
    batch_metrics,
    make_heldout_metrics,
    make_resample,
    make_train_step,
)

__all__ = [
    'EXIT_RESUME',
    'Preempted',
    'TrainState',
    'batch_metrics',
    'dead_window_steps',
    'host_params',
    'hparams_from_config',
    'init_state',
    'load_metrics',
    'make_heldout_metrics',
    'make_resample',
    'make_train_step',
    'seeds_from_config',
    'summary',
    'train_and_evaluate',
    'train_together',
]
