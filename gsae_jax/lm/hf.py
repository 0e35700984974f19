"""Reading a local Hugging Face checkpoint into (ModelConfig, weights, Tokenizer).

A checkpoint directory holds config.json, the weights as model.safetensors (or
shards listed in model.safetensors.index.json), tokenizer.json and usually
tokenizer_config.json, as `save_pretrained` and the Hub write them. The family
comes from config.json's `model_type` (docs/models.md):

  llama    Llama 2/3 (Llama 3's 'llama3' RoPE scaling), SmolLM2
  qwen2    Qwen 2 / 2.5: biases on q, k and v
  qwen3    Qwen 3: RMSNorm on each head of q and k
  mistral  Mistral: contexts longer than its sliding window are refused
  gemma2   Gemma 2: embedding x sqrt(d_model), RMSNorm x (1 + w), GeGLU,
           post-norms, soft-capping, query_pre_attn_scalar, sliding-window
           layers alternating with global ones
  gpt2     GPT-2: learned positions, LayerNorm, GELU, Conv1D weights [in, out]

Weights are read with `safetensors` (NumPy; bfloat16 tensors through its flax
reader, as NumPy has no bfloat16), never torch. Everything is checked against
config.json from the file headers before a tensor is read, so a checkpoint
that does not match fails at once with the tensor or field named.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import tokenizers

from gsae_jax.lm.model import ModelConfig
from gsae_jax.lm.tokenizer import Tokenizer

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2")
CONFIG, INDEX, WEIGHTS = (
    "config.json",
    "model.safetensors.index.json",
    "model.safetensors",
)
TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
# Buffers some checkpoints carry that the forward pass recomputes.
_IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")
_SAFETENSORS_DTYPES = ("F32", "F16", "BF16")


def is_checkpoint(path: str) -> bool:
  """True if `path` is a directory with a config.json."""
  return os.path.isfile(os.path.join(path, CONFIG))


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def checkpoint_name(path: str) -> str:
  """The model's name: the Hub id where it can be told, else the directory name.

  A Hub cache snapshot (.../models--org--name/snapshots/<revision>) gives
  'org/name'; otherwise config.json's `_name_or_path` when it is a Hub id
  rather than a local path; otherwise the directory's name.
  """
  parts = os.path.abspath(path).split(os.sep)
  if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
    return parts[-3][len("models--") :].replace("--", "/")
  name = _read_json(os.path.join(path, CONFIG)).get("_name_or_path")
  if isinstance(name, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
    if not name.startswith("."):
      return name
  return parts[-1]


def adds_bos(path: str) -> bool:
  """Whether the checkpoint's tokenizer puts BOS before a text (tokenizer files only)."""
  return _bos_rule(path, _read_json(os.path.join(path, CONFIG)), _read_tokenizer(path))[
      1
  ]


# ---------------------------------------------------------------------------
# config.json -> ModelConfig


class _Fields:
  """config.json's fields, with errors that name the file and the field."""

  def __init__(self, hf: dict[str, Any], where: str):
    self.hf, self.where = hf, where

  def get(self, key: str, default: Any = ...) -> Any:
    value = self.hf.get(key)
    if value is None:
      if default is ...:
        raise ValueError(f"{self.where}: the field '{key}' is missing")
      return default
    return value

  def refuse(self, key: str, bad: Callable[[Any], bool], why: str) -> None:
    if key in self.hf and self.hf[key] is not None and bad(self.hf[key]):
      raise NotImplementedError(
          f"{self.where}: {key} = {self.hf[key]!r} is not supported ({why})"
      )

  def activation(self, keys: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    for key in keys:
      if self.hf.get(key) is not None:
        if self.hf[key] not in allowed:
          raise NotImplementedError(
              f"{self.where}: {key} = {self.hf[key]!r} is not supported "
              f"(supported: {', '.join(allowed)})"
          )
        return


def _rope(f: _Fields) -> dict[str, Any]:
  """RoPE theta and scaling from rope_parameters (transformers 5) or rope_theta/rope_scaling."""
  rope = {**(f.hf.get("rope_scaling") or {}), **(f.hf.get("rope_parameters") or {})}
  theta = f.hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
  kind = rope.get("rope_type", rope.get("type")) or "default"
  scaling = None
  if kind == "llama3":
    try:
      scaling = tuple(
          float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")
      ) + (int(rope["original_max_position_embeddings"]),)
    except KeyError as e:
      raise ValueError(f"{f.where}: rope scaling 'llama3' lacks the field {e}") from e
  elif kind != "default":
    raise NotImplementedError(
        f"{f.where}: rope_type {kind!r} is not supported (supported: default, llama3)"
    )
  return {"rope_base": float(theta), "rope_scaling": scaling}


def _windows(f: _Fields, n_layers: int, window: int) -> tuple[int, ...]:
  """Per-layer sliding windows (0 = global) from layer_types, else alternating."""
  types = f.hf.get("layer_types")
  if types is None:  # Gemma 2 before layer_types: even layers slide.
    types = [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
    ]
  if len(types) != n_layers:
    raise ValueError(
        f"{f.where}: layer_types has {len(types)} entries for {n_layers} layers"
    )
  windows = []
  for t in types:
    if t not in ("sliding_attention", "full_attention"):
      raise NotImplementedError(f"{f.where}: layer type {t!r} is not supported")
    windows.append(window if t == "sliding_attention" else 0)
  return tuple(windows)


def config_from_hf(hf: dict[str, Any], where: str = CONFIG) -> ModelConfig:
  """The `ModelConfig` of a config.json's contents (`where` names it in errors)."""
  f = _Fields(hf, where)
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ValueError(
        f"{where}: model_type {family!r} is not supported (supported: "
        f"{', '.join(FAMILIES)})"
    )
  if family == "gpt2":
    return _gpt2_config(f)
  d_model, n_heads = int(f.get("hidden_size")), int(f.get("num_attention_heads"))
  n_layers = int(f.get("num_hidden_layers"))
  d_head = int(f.get("head_dim", d_model // n_heads))
  rope_dim = int(d_head * float(f.get("partial_rotary_factor", 1.0)))
  common = dict(
      n_layers=n_layers,
      d_model=d_model,
      n_heads=n_heads,
      n_kv_heads=int(f.get("num_key_value_heads", n_heads)),
      d_head=d_head,
      d_mlp=int(f.get("intermediate_size")),
      vocab_size=int(f.get("vocab_size")),
      rms_eps=float(f.get("rms_norm_eps", 1e-6)),
      rope_dim=rope_dim,
      context_length=int(f.get("max_position_embeddings", 0)),
      tied_embeddings=bool(f.get("tie_word_embeddings", family == "gemma2")),
      family=family,
      rope_layout="half",
      **_rope(f),
  )
  bias = bool(f.get("attention_bias", False))
  f.refuse("mlp_bias", bool, "MLP biases")
  if family in ("qwen2", "qwen3"):
    f.refuse("use_sliding_window", bool, "sliding-window attention in Qwen")
  if family == "gemma2":
    f.activation(("hidden_activation", "hidden_act"), ("gelu_pytorch_tanh",))
    window = int(f.get("sliding_window"))
    scalar = float(f.get("query_pre_attn_scalar", d_head))
    return ModelConfig(
        **common,
        norm="rms_plus_one",
        mlp="geglu",
        qkv_bias=bias,
        o_bias=bias,
        post_norms=True,
        embed_scale=float(d_model) ** 0.5,
        query_scale=scalar**-0.5,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        sliding_windows=_windows(f, n_layers, window),
    )
  f.activation(("hidden_act",), ("silu",))
  extra: dict[str, Any] = {}
  if family == "mistral" and hf.get("sliding_window"):
    extra = dict(
        max_seq=int(hf["sliding_window"]),
        max_seq_reason="Mistral's sliding window, config.json sliding_window",
    )
  return ModelConfig(
      **common,
      qkv_bias=bias or family == "qwen2",
      o_bias=bias,
      qk_norm=family == "qwen3",
      **extra,
  )


def _gpt2_config(f: _Fields) -> ModelConfig:
  f.activation(("activation_function",), ("gelu_new", "gelu_pytorch_tanh"))
  f.refuse("scale_attn_by_inverse_layer_idx", bool, "per-layer attention scaling")
  f.refuse("scale_attn_weights", lambda v: not v, "unscaled attention")
  f.refuse("add_cross_attention", bool, "cross-attention")
  d_model, n_heads = int(f.get("n_embd")), int(f.get("n_head"))
  n_positions = int(f.get("n_positions"))
  return ModelConfig(
      n_layers=int(f.get("n_layer")),
      d_model=d_model,
      n_heads=n_heads,
      n_kv_heads=n_heads,
      d_head=d_model // n_heads,
      d_mlp=int(f.get("n_inner", 4 * d_model)),
      vocab_size=int(f.get("vocab_size")),
      rms_eps=float(f.get("layer_norm_epsilon", 1e-5)),
      rope_base=10000.0,
      rope_dim=0,
      context_length=n_positions,
      tied_embeddings=bool(f.get("tie_word_embeddings", True)),
      family="gpt2",
      positions="learned",
      norm="layer",
      mlp="gelu",
      qkv_bias=True,
      o_bias=True,
      max_seq=n_positions,
      max_seq_reason="GPT-2's learned position embeddings, config.json n_positions",
  )


# ---------------------------------------------------------------------------
# Which tensors, in which shapes.

# A tensor we read: our name, the checkpoint's name, its shape there, and how
# to turn it into ours.
_Tensor = tuple[str, str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _transpose(w: np.ndarray) -> np.ndarray:
  return w.T  # torch Linear [out, in] -> ours [in, out]


def _columns(start: int, stop: int) -> Callable[[np.ndarray], np.ndarray]:
  return lambda w: w[..., start:stop]


def _top_tensors(c: ModelConfig, prefix: str) -> list[_Tensor]:
  vocab, d = c.vocab_size, c.d_model
  if c.family == "gpt2":
    return [
        ("embed", prefix + "wte.weight", (vocab, d), _same),
        ("pos_embed", prefix + "wpe.weight", (c.max_seq, d), _same),
        ("final_norm", prefix + "ln_f.weight", (d,), _same),
        ("final_norm_bias", prefix + "ln_f.bias", (d,), _same),
    ]
  tensors = [
      ("embed", prefix + "embed_tokens.weight", (vocab, d), _same),
      ("final_norm", prefix + "norm.weight", (d,), _same),
  ]
  if not c.tied_embeddings:
    tensors.append(("unembed", "lm_head.weight", (vocab, d), _same))
  return tensors


def _layer_tensors(c: ModelConfig, p: str) -> list[_Tensor]:
  """The tensors of one layer whose names start with p."""
  d, d_mlp = c.d_model, c.d_mlp
  q, kv = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
  if c.family == "gpt2":  # Conv1D weights are stored [in, out] already.
    return [
        ("attn_norm", p + "ln_1.weight", (d,), _same),
        ("attn_norm_bias", p + "ln_1.bias", (d,), _same),
        ("w_q", p + "attn.c_attn.weight", (d, 3 * d), _columns(0, d)),
        ("w_k", p + "attn.c_attn.weight", (d, 3 * d), _columns(d, 2 * d)),
        ("w_v", p + "attn.c_attn.weight", (d, 3 * d), _columns(2 * d, 3 * d)),
        ("b_q", p + "attn.c_attn.bias", (3 * d,), _columns(0, d)),
        ("b_k", p + "attn.c_attn.bias", (3 * d,), _columns(d, 2 * d)),
        ("b_v", p + "attn.c_attn.bias", (3 * d,), _columns(2 * d, 3 * d)),
        ("w_o", p + "attn.c_proj.weight", (d, d), _same),
        ("b_o", p + "attn.c_proj.bias", (d,), _same),
        ("mlp_norm", p + "ln_2.weight", (d,), _same),
        ("mlp_norm_bias", p + "ln_2.bias", (d,), _same),
        ("w_up", p + "mlp.c_fc.weight", (d, d_mlp), _same),
        ("b_up", p + "mlp.c_fc.bias", (d_mlp,), _same),
        ("w_down", p + "mlp.c_proj.weight", (d_mlp, d), _same),
        ("b_down", p + "mlp.c_proj.bias", (d,), _same),
    ]
  a = p + "self_attn."
  tensors = [
      ("attn_norm", p + "input_layernorm.weight", (d,), _same),
      ("w_q", a + "q_proj.weight", (q, d), _transpose),
      ("w_k", a + "k_proj.weight", (kv, d), _transpose),
      ("w_v", a + "v_proj.weight", (kv, d), _transpose),
      ("w_o", a + "o_proj.weight", (d, q), _transpose),
      ("w_gate", p + "mlp.gate_proj.weight", (d_mlp, d), _transpose),
      ("w_up", p + "mlp.up_proj.weight", (d_mlp, d), _transpose),
      ("w_down", p + "mlp.down_proj.weight", (d, d_mlp), _transpose),
  ]
  if c.post_norms:  # Gemma 2 names its four norms differently.
    tensors += [
        ("attn_post_norm", p + "post_attention_layernorm.weight", (d,), _same),
        ("mlp_norm", p + "pre_feedforward_layernorm.weight", (d,), _same),
        ("mlp_post_norm", p + "post_feedforward_layernorm.weight", (d,), _same),
    ]
  else:
    tensors.append(("mlp_norm", p + "post_attention_layernorm.weight", (d,), _same))
  if c.qkv_bias:
    tensors += [
        ("b_q", a + "q_proj.bias", (q,), _same),
        ("b_k", a + "k_proj.bias", (kv,), _same),
        ("b_v", a + "v_proj.bias", (kv,), _same),
    ]
  if c.o_bias:
    tensors.append(("b_o", a + "o_proj.bias", (d,), _same))
  if c.qk_norm:
    tensors += [
        ("q_norm", a + "q_norm.weight", (c.d_head,), _same),
        ("k_norm", a + "k_norm.weight", (c.d_head,), _same),
    ]
  return tensors


# ---------------------------------------------------------------------------
# Reading.


class _Weights:
  """The checkpoint's tensors across its shards: headers first, data on demand."""

  def __init__(self, path: str):
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map")
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, WEIGHTS)):
      files = [WEIGHTS]
    else:
      other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
      hint = f" (found {other[0]}: convert it to safetensors)" if other else ""
      raise FileNotFoundError(f"{path} has no {WEIGHTS} or {INDEX}{hint}")
    self.files: dict[str, str] = {}  # tensor name -> file
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    for file in files:
      full = os.path.join(path, file)
      if not os.path.isfile(full):
        raise FileNotFoundError(f"{index} lists {file}, which is not in {path}")
      with safetensors.safe_open(full, framework="numpy") as f:
        for name in f.keys():
          view = f.get_slice(name)
          self.files[name] = full
          self.shapes[name] = tuple(int(n) for n in view.get_shape())
          self.dtypes[name] = view.get_dtype()

  def read(self, name: str) -> np.ndarray:
    """One tensor as NumPy (float32, float16 or ml_dtypes.bfloat16)."""
    if self.dtypes[name] == "BF16":  # NumPy lacks bfloat16; the flax reader has it.
      with safetensors.safe_open(self.files[name], framework="flax") as f:
        return np.asarray(f.get_tensor(name))
    with safetensors.safe_open(self.files[name], framework="numpy") as f:
      return f.get_tensor(name)


def _prefix(weights: _Weights, c: ModelConfig) -> str:
  """'model.' / 'transformer.' as CausalLM checkpoints name tensors, '' for bare ones."""
  first = "wte.weight" if c.family == "gpt2" else "embed_tokens.weight"
  for prefix in ("transformer.", "model.", ""):
    if prefix + first in weights.shapes:
      return prefix
  return "transformer." if c.family == "gpt2" else "model."


def _check(weights: _Weights, plan: list[_Tensor], where: str) -> None:
  """Every planned tensor present in its shape and dtype; nothing else left over."""
  for _, name, shape, _ in plan:
    if name not in weights.shapes:
      raise ValueError(
          f"{where}: the checkpoint lacks the tensor {name!r} (expected shape "
          f"{shape} from config.json)"
      )
    if weights.shapes[name] != shape:
      raise ValueError(
          f"{where}: tensor {name!r} has shape {weights.shapes[name]}, expected "
          f"{shape} from config.json"
      )
    if weights.dtypes[name] not in _SAFETENSORS_DTYPES:
      raise ValueError(
          f"{where}: tensor {name!r} has dtype {weights.dtypes[name]}; supported: "
          f"{', '.join(_SAFETENSORS_DTYPES)}"
      )
  used = {name for _, name, _, _ in plan} | {"lm_head.weight"}
  unused = sorted(n for n in weights.shapes if n not in used and not _IGNORED.match(n))
  if unused:
    raise ValueError(
        f"{where}: the checkpoint has {len(unused)} tensors config.json does not "
        f"account for, e.g. {unused[0]!r}; config.json and the weights disagree"
    )


def read_hf(
    path: str, dtype: Any = np.float32
) -> tuple[ModelConfig, dict[str, Any], Tokenizer, str]:
  """Reads a Hugging Face checkpoint directory.

  Args:
    path: the directory (config.json, safetensors weights, tokenizer.json).
    dtype: storage dtype of the weight matrices and embeddings (float32 or
      bfloat16); norms and biases are float32.

  Returns:
    (config, params, tokenizer, name). params has the layout of `read_gguf`
    (embed, final_norm, unembed unless tied, blocks stacked [n_layers, ...]
    with matrices [in, out]) plus the family's extra tensors (biases b_*,
    Qwen3's q_norm/k_norm, Gemma 2's attn_post_norm/mlp_post_norm, GPT-2's
    pos_embed and LayerNorm biases *_norm_bias). name is `checkpoint_name`.
  """
  where = os.path.join(path, CONFIG)
  if not os.path.isfile(where):
    raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint (no {CONFIG})")
  hf = _read_json(where)
  config = config_from_hf(hf, where)
  tok = _read_tokenizer(path)  # before the weights: cheap, and fails early
  weights = _Weights(path)
  prefix = _prefix(weights, config)
  layer_prefix = prefix + ("h." if config.family == "gpt2" else "layers.")
  top = _top_tensors(config, prefix)
  layers = [
      _layer_tensors(config, f"{layer_prefix}{i}.") for i in range(config.n_layers)
  ]
  _check(weights, top + [t for layer in layers for t in layer], where)

  big = (
      np.dtype(ml_dtypes.bfloat16)
      if np.dtype(dtype) == ml_dtypes.bfloat16
      else np.float32
  )

  def storage(ours: str) -> Any:
    return np.float32 if "norm" in ours or ours.startswith("b_") else big

  def read(name: str, to_ours: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return to_ours(weights.read(name))

  params: dict[str, Any] = {
      ours: read(name, fn).astype(storage(ours)) for ours, name, _, fn in top
  }
  blocks = {}
  for j, (ours, _, _, fn) in enumerate(layers[0]):
    first = read(layers[0][j][1], fn)
    stacked = np.empty((config.n_layers, *first.shape), storage(ours))
    stacked[0] = first
    for i in range(1, config.n_layers):
      stacked[i] = read(layers[i][j][1], fn)
    blocks[ours] = stacked
  params["blocks"] = blocks
  bos_id, add_bos, eos_id = _bos_rule(path, hf, tok)
  tokenizer = Tokenizer.from_tokenizers(
      tok, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos
  )
  return config, params, tokenizer, checkpoint_name(path)


# ---------------------------------------------------------------------------
# The tokenizer.


def _read_tokenizer(path: str) -> tokenizers.Tokenizer:
  file = os.path.join(path, TOKENIZER)
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f"{path} has no {TOKENIZER} (a checkpoint with only a SentencePiece "
        "tokenizer.model is not supported: save it with a fast tokenizer)"
    )
  try:
    return tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # tokenizers raises its own exception type
    raise ValueError(f"{file} is not a readable tokenizer: {e}") from e


def _token_id(tok: tokenizers.Tokenizer, token: Any, fallback: Any) -> int | None:
  """The id of a tokenizer_config special token (str or {'content': ...})."""
  if isinstance(token, dict):
    token = token.get("content")
  if isinstance(token, str):
    found = tok.token_to_id(token)
    if found is not None:
      return int(found)
  if isinstance(fallback, list):
    fallback = fallback[0] if fallback else None
  return None if fallback is None else int(fallback)


def _bos_rule(
    path: str, hf: dict[str, Any], tok: tokenizers.Tokenizer
) -> tuple[int | None, bool, int | None]:
  """(bos_id, add_bos, eos_id) as the checkpoint's tokenizer config says.

  add_bos is tokenizer_config.json's add_bos_token when it is set (Llama 2,
  Gemma); otherwise whether tokenizer.json's post-processor puts BOS first
  (Llama 3). SmolLM2, Qwen, Mistral's fast tokenizers and GPT-2 add none.
  """
  file = os.path.join(path, TOKENIZER_CONFIG)
  tc = _read_json(file) if os.path.isfile(file) else {}
  bos_id = _token_id(tok, tc.get("bos_token"), hf.get("bos_token_id"))
  eos_id = _token_id(tok, tc.get("eos_token"), hf.get("eos_token_id"))
  add_bos = tc.get("add_bos_token")
  if not isinstance(add_bos, bool):
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    add_bos = len(full) > len(plain) and full[0] == bos_id and bos_id is not None
  if add_bos and bos_id is None:
    raise ValueError(f"{file}: add_bos_token is set but no BOS token is named")
  return bos_id, bool(add_bos), eos_id
