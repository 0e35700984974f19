"""Harvest throughput of the LM: tokens/s through layer L, against a matmul ceiling.

  python benchmarks/bench_lm.py [--site blocks.15.hook_resid_post]
      [--shapes 4x128,16x128,8x256] [--dtype float32] [--full]

(from the repository root, with gsae_jax installed: `pip install -e .`).

Harvesting reads the activations at one site (`LanguageModel.activations`),
which runs blocks 0..L only. For each batch shape this prints tokens/s, the
model FLOPs per token of that partial forward pass (weight matmuls and
attention, `lm.forward_flops_per_token`), the GFLOP/s that implies, and the
fraction of a measured ceiling: a square float32 matmul under XLA on the same
devices (bfloat16 inputs with float32 accumulation under --dtype bfloat16).
--full adds the whole model (cross-entropy, as the loss-recovered evaluation
runs it).

docs/design.md §4 reference on 2 CPU cores, fp32: ~900 tokens/s through the whole model,
~1,700 tokens/s stopping after layer 15; docs/design.md §4: fp32 matmul ~430 GFLOP/s.
Times exclude compilation (one warm-up call each) and are the best of
--repeats calls (the least disturbed by other processes).
"""

import argparse
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax import lm
from gsae_jax.backends import hostmem


def _best_time(fn: Callable[[], jax.Array], repeats: int) -> tuple[float, float]:
  """(best seconds per call, seconds of the first call incl. compilation)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times), first_s


def matmul_ceiling(n: int, dtype: str, repeats: int) -> float:
  """GFLOP/s of an [n, n] @ [n, n] matmul (float32 accumulation and output)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dtype)
  b = jnp.asarray(rng.standard_normal((n, n)), dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  seconds, _ = _best_time(lambda: matmul(a, b), repeats)
  return 2 * n**3 / seconds / 1e9


def _parse_shapes(text: str) -> list[tuple[int, int]]:
  shapes = []
  for item in text.split(","):
    batch, sep, seq = item.strip().partition("x")
    if not sep or not batch.isdigit() or not seq.isdigit():
      raise SystemExit(f"--shapes: bad shape {item!r}, expected BATCHxSEQ, e.g. 16x128")
    shapes.append((int(batch), int(seq)))
  return shapes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--site", default="blocks.15.hook_resid_post")
  parser.add_argument(
      "--shapes", default="4x128,16x128,8x256", help="BATCHxSEQ,... per call"
  )
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--matmul-size", type=int, default=2048)
  parser.add_argument("--path", default=None, help="GGUF file (default: bundled)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument(
      "--full", action="store_true", help="also time the whole model (CE)"
  )
  args = parser.parse_args()
  hostmem.keep_host_memory_on_cpu()  # as the launchers do; before any JAX work
  shapes = _parse_shapes(args.shapes)

  start = time.perf_counter()
  model = lm.load(args.path, dtype=args.dtype)
  site = model.site(args.site)  # Checks the name against the model's depth.
  print(f"loaded {model.path} in {time.perf_counter() - start:.1f}s")
  print(f"jax {jax.__version__}, devices {jax.devices()}, weights {args.dtype}")

  ceiling = matmul_ceiling(args.matmul_size, args.dtype, args.repeats)
  n = args.matmul_size
  print(f"matmul ceiling ({n}x{n} @ {n}x{n}, {args.dtype}): {ceiling:.0f} GFLOP/s")

  # Blocks run to read the site: resid_pre of L needs L, anything else L + 1.
  n_blocks = site.blocks_before if site.blocks_before is not None else site.layer + 1
  rng = np.random.default_rng(0)
  cases = []
  for batch, seq in shapes:
    ids = jnp.asarray(rng.integers(100, model.vocab_size, (batch, seq)), jnp.int32)
    flops = lm.forward_flops_per_token(model.config, n_blocks, seq)
    run = functools.partial(model.activations, ids, args.site)
    cases.append((f"activations {args.site}", batch, seq, flops, run))
  if args.full:
    batch, seq = shapes[-1]
    ids = jnp.asarray(rng.integers(100, model.vocab_size, (batch, seq)), jnp.int32)
    flops = lm.forward_flops_per_token(model.config, None, seq, unembed=True)
    run = functools.partial(model.cross_entropy, ids)
    cases.append(("cross_entropy, whole model", batch, seq, flops, run))

  print(
      f"{'what':44s} {'batch x seq':>11s} {'tokens/s':>9s} {'ms/call':>8s} "
      f"{'MFLOP/tok':>9s} {'GFLOP/s':>8s} {'of ceil':>7s} {'1st call':>8s}"
  )
  for name, batch, seq, flops_per_token, fn in cases:
    seconds, first_s = _best_time(fn, args.repeats)
    tokens_per_s = batch * seq / seconds
    gflops = tokens_per_s * flops_per_token / 1e9
    print(
        f"{name:44s} {f'{batch}x{seq}':>11s} {tokens_per_s:9.0f} "
        f"{seconds * 1e3:8.0f} {flops_per_token / 1e6:9.1f} {gflops:8.0f} "
        f"{gflops / ceiling:7.0%} {first_s:7.1f}s"
    )


if __name__ == "__main__":
  main()
