"""absl entrypoints: `python -m launch.<name> --flagfile/--config=...`.

Every entrypoint first keeps freed host memory mapped for reuse (10% faster
CPU steps; GSAE_JAX_KEEP_HOST_MEMORY=0 opts out). It happens here, on import,
because it must come before the first JAX computation, and configs are
loaded while flags are parsed, before any main() runs.
"""

from gsae_jax import hostmem

hostmem.keep_host_memory()
