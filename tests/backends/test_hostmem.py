"""backends/hostmem.py: on the CPU, XLA's temporaries stop page-faulting in anew."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Calls a jitted function with a 64 MiB temporary (the [4096, 4096] product)
# and prints the minor page faults of its last 3 calls.
PROBE = """
import resource, sys
from gsae_jax.backends import hostmem
print(hostmem.keep_host_memory_on_cpu())
import jax, jax.numpy as jnp
x = jnp.ones((4096, 16), jnp.float32)
f = jax.jit(lambda x: jnp.sum(x @ x.T, axis=0))
for _ in range(2):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> tuple[str, int]:
  env = dict(
      os.environ, GSAE_JAX_KEEP_HOST_MEMORY='1' if keep else '0', JAX_PLATFORMS='cpu'
  )
  out = subprocess.run(
      [sys.executable, '-c', PROBE],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      check=True,
      timeout=300,
  ).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
def test_keep_host_memory_stops_page_faults_of_temporaries():
  applied, kept = _faults(keep=True)
  skipped, default = _faults(keep=False)
  assert (applied, skipped) == ('True', 'False')
  # 3 calls x 64 MiB = 49,152 4-KiB pages if every temporary is faulted in
  # anew (seen: 49,159 by default, 0 kept).
  assert kept < 2_000 and kept * 20 <= default, (kept, default)


def test_only_the_cpu_backend_gets_it(monkeypatch):
  from gsae_jax.backends import hostmem  # noqa: PLC0415

  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert not hostmem.jax_will_use_cpu() and not hostmem.keep_host_memory_on_cpu()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert hostmem.jax_will_use_cpu()
