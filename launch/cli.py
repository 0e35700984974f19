"""What every launcher shares: absl's app.run behind a bad-input boundary.

On the CPU backend the launchers first keep freed host memory mapped for
reuse (gsae_jax/backends/hostmem.py; GSAE_JAX_KEEP_HOST_MEMORY=0 opts out).

A bad input (a config value, a missing directory, a cache of another model)
ends the command with ONE line on stderr, `error: <what, where, what to do>`,
and exit status 2; --verbosity=1 (or higher) shows the traceback instead. A
run stopped by SIGTERM/SIGINT after checkpointing exits with status 75
(train.EXIT_RESUME): re-run the same command to resume.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging

from gsae_jax import train
from gsae_jax.backends import hostmem

# What a user can fix by changing the command: the library raises these (and
# subclasses, such as cache.CacheError) with a message naming the field or path.
BAD_INPUT = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    KeyError,
)
EXIT_BAD_INPUT = 2


def _one_line(error: BaseException) -> str:
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return ' '.join(str(text).split())


def run(main: Callable[[], None]) -> None:
  """Parses flags and runs `main()` with the boundary described above."""

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    verbose = flags.FLAGS['verbosity'].present and flags.FLAGS.verbosity >= 1
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO.
    try:
      main()
    except train.Preempted as e:
      print(e, file=sys.stderr)
      sys.exit(train.EXIT_RESUME)
    except BAD_INPUT as e:
      if verbose:
        raise
      print(f'error: {_one_line(e)}', file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)

  hostmem.keep_host_memory_on_cpu()  # before any JAX computation
  app.run(wrapped)
