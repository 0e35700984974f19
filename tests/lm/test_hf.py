"""Hugging Face checkpoints: every family against what transformers computed.

The checkpoints and outputs under tests/lm/fixtures/hf were written by
tests/lm/fixtures/make_hf_fixtures.py (transformers on CPU torch); these tests
need neither.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gsae_jax import lm as lm_lib
from gsae_jax.config import HOOKS
from gsae_jax.lm import hf, model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2")
N_LAYERS = 3


def _rel(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _expected(out, layer: int, hook: str) -> np.ndarray:
  """transformers' activation at a site (derived ones as the fixture script says)."""
  if hook == "resid_pre" and layer > 0:
    return out[f"blocks.{layer - 1}.hook_resid_post"]
  if hook == "resid_mid":
    return _expected(out, layer, "resid_pre") + out[f"blocks.{layer}.hook_attn_out"]
  return out[f"blocks.{layer}.hook_{hook}"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
  """(family, LanguageModel, transformers outputs) per family."""
  name = request.param
  path = os.path.join(FIXTURES, name)
  return name, lm_lib.load(path), dict(np.load(os.path.join(path, "outputs.npz")))


def test_config_picks_the_family(family):
  name, lm, _ = family
  c = lm.config
  assert c.family == name and lm.name == name
  assert (lm.n_layers, lm.d_model, lm.vocab_size) == (N_LAYERS, 64, 320)
  assert c.positions == "learned" if name == "gpt2" else c.rope_layout == "half"
  expected = {
      "llama": dict(rope_scaling=(8.0, 1.0, 4.0, 64), tied_embeddings=False),
      "qwen2": dict(qkv_bias=True, o_bias=False),
      "qwen3": dict(qk_norm=True, d_head=32),
      "mistral": dict(max_seq=16),
      "gemma2": dict(
          norm="rms_plus_one",
          mlp="geglu",
          post_norms=True,
          embed_scale=8.0,
          query_scale=24**-0.5,
          attn_softcap=2.0,
          final_softcap=5.0,
          sliding_windows=(4, 0, 4),
      ),
      "gpt2": dict(positions="learned", norm="layer", mlp="gelu", max_seq=64),
  }[name]
  assert {k: getattr(c, k) for k in expected} == expected


def test_logits_and_every_site_match_transformers(family):
  _, lm, out = family
  ids = out["ids"]
  assert _rel(lm.logits(ids), out["logits"]) < 1e-4
  with jax.disable_jit():  # 15 sites: eager is quicker than 15 compiles here
    for layer in range(N_LAYERS):
      for hook in HOOKS:
        site = f"blocks.{layer}.hook_{hook}"
        error = _rel(lm.activations(ids, site), _expected(out, layer, hook))
        assert error < 1e-4, (site, error)
  # The compiled path at an in-block and a between-blocks site.
  for site in ("blocks.1.hook_mlp_out", "blocks.2.hook_resid_pre"):
    layer, hook = int(site.split(".")[1]), site.split("_", 1)[1]
    assert _rel(lm.activations(ids, site), _expected(out, layer, hook)) < 1e-4


def test_tokenizer_matches_transformers_with_the_family_bos(family):
  name, lm, out = family
  assert lm.prepend_bos == (name in ("llama", "gemma2"))
  text = str(out["text"])
  np.testing.assert_array_equal(lm.encode(text, bos=lm.prepend_bos), out["hf_ids"])
  assert lm.context_bos_id == (lm.bos_id if lm.prepend_bos else None)
  assert lm.decode(lm.encode(text)) == text


def _halve(act):
  return act * 0.5


def _identity(act):
  return act


@pytest.mark.parametrize("hook", ["resid_post", "attn_out"])
def test_splice_at_the_middle_layer_matches_transformers(family, hook):
  """A splice (halving the activation at positions >= 1) as transformers ran it."""
  _, lm, out = family
  site = f"blocks.1.hook_{hook}"
  spliced = lm.logits(out["ids"], site, _halve)
  assert _rel(spliced, out[f"logits_halved_{site}"]) < 1e-4
  assert _rel(spliced, out["logits"]) > 1e-3  # the splice changes the outputs


def _full_path_cross_entropy(lm, ids, site, splice_fn):
  """CE with every block run on its own, in a Python loop (no scans, no split)."""
  c, params = lm.config, lm.params
  parsed = lm.site(site)
  ids = jnp.asarray(ids)
  rope = model._rope_tables(c, ids.shape[1])
  resid = model._embed(c, params, ids)
  hook_fn = model._splice_hook(splice_fn, None, 1)
  for layer in range(c.n_layers):
    p = model._layer_params(params["blocks"], layer)
    hook = parsed.hook if layer == parsed.layer else None
    resid = model._block(c, p, resid, rope, hook=hook, hook_fn=hook_fn, layer=layer)
  logits = model._unembed(c, params, resid[:, :-1])
  return model.token_cross_entropy(logits, ids[:, 1:])


@pytest.mark.parametrize("hook", ["resid_post", "mlp_out"])
def test_splice_runs_only_the_suffix_and_equals_the_full_path(family, hook):
  _, lm, out = family
  ids = out["ids"]
  site = f"blocks.1.hook_{hook}"
  clean = np.asarray(lm.cross_entropy(ids))
  spliced = np.asarray(lm.cross_entropy(ids, site, _halve))
  assert np.abs(spliced - clean).max() > 1e-3
  with jax.disable_jit():
    full = np.asarray(_full_path_cross_entropy(lm, ids, site, _halve))
  np.testing.assert_allclose(spliced, full, rtol=1e-5, atol=1e-5)
  # Only the layers after the site run after the splice (one scan of 1).
  jaxpr = jax.make_jaxpr(
      lambda p, i: model.run_cross_entropy(p, lm.config, i, site, _halve)
  )(lm.params, jnp.asarray(ids, jnp.int32))
  lengths = [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert lengths == ([2, 1] if hook == "resid_post" else [1, 1])


def test_identity_splice_between_two_scans_is_exact(family):
  """The model with its layers run twice (6): splitting at 3 of 6 changes no bit."""
  _, lm, out = family
  c, ids = lm.config, jnp.asarray(out["ids"])
  order = jnp.asarray([0, 1, 2, 0, 1, 2])
  params = dict(lm.params, blocks=jax.tree.map(lambda w: w[order], lm.params["blocks"]))
  windows = tuple(c.sliding_windows[i] for i in order) if c.sliding_windows else ()
  deeper = dataclasses.replace(c, n_layers=6, sliding_windows=windows)
  run = jax.jit(model.run_cross_entropy, static_argnums=(1, 3, 4))
  clean = np.asarray(run(params, deeper, ids))
  for site in ("blocks.2.hook_resid_post", "blocks.3.hook_resid_pre"):
    np.testing.assert_array_equal(
        np.asarray(run(params, deeper, ids, site, _identity)), clean
    )


# ---------------------------------------------------------------------------
# RoPE layouts, Llama 3 scaling, Gemma 2's windows and soft-capping.


def test_rope_half_split_is_adjacent_pairs_after_a_permutation():
  rng = np.random.default_rng(0)
  d_head, seq = 16, 7
  x = jnp.asarray(rng.normal(size=(2, seq, 3, d_head)), jnp.float32)
  c = lm_lib.ModelConfig(1, 8, 1, 1, d_head, 8, 8, 1e-6, 100.0, d_head, 0, True)
  cos, sin = model._rope_tables(c, seq)
  # Adjacent position 2i, 2i+1 <- half-split positions i, i + d_head / 2.
  perm = np.stack([np.arange(d_head // 2), np.arange(d_head // 2) + d_head // 2], 1)
  perm = perm.reshape(-1)
  half = model._apply_rope(x, cos, sin, "half")
  adjacent = model._apply_rope(x[..., perm], cos, sin, "adjacent")
  np.testing.assert_allclose(adjacent, half[..., perm], rtol=1e-6, atol=1e-6)
  assert not np.allclose(half, model._apply_rope(x, cos, sin, "adjacent"), atol=1e-3)
  # Both rotate position 0 by nothing and keep norms of each pair.
  np.testing.assert_allclose(half[:, 0], x[:, 0], atol=1e-6)
  np.testing.assert_allclose(
      jnp.linalg.norm(half, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5
  )


def test_llama_checkpoint_with_gguf_layout_gives_the_same_logits():
  """Permuting W_q/W_k rows per head as llama.cpp's converter does = the adjacent layout."""
  lm = lm_lib.load(os.path.join(FIXTURES, "llama"))
  out = np.load(os.path.join(FIXTURES, "llama", "outputs.npz"))
  c = lm.config
  half = c.d_head // 2
  per_head = np.stack([np.arange(half), np.arange(half) + half], 1).reshape(-1)

  def permute(w, n_heads):  # [layers, d_model, n_heads * d_head] columns
    cols = (np.arange(n_heads)[:, None] * c.d_head + per_head[None, :]).reshape(-1)
    return w[..., cols]

  blocks = dict(lm.params["blocks"])
  blocks["w_q"] = permute(np.asarray(blocks["w_q"]), c.n_heads)
  blocks["w_k"] = permute(np.asarray(blocks["w_k"]), c.n_kv_heads)
  params = dict(lm.params, blocks=blocks)
  gguf_like = dataclasses.replace(c, rope_layout="adjacent")
  with jax.disable_jit():
    logits = model.run_logits(params, gguf_like, jnp.asarray(out["ids"]))
    wrong = model.run_logits(params, c, jnp.asarray(out["ids"]))  # layout mismatch
  assert _rel(logits, out["logits"]) < 1e-4
  assert _rel(wrong, out["logits"]) > 1e-2


def test_llama3_rope_scaling_changes_only_the_long_wavelengths():
  c = lm_lib.load(os.path.join(FIXTURES, "llama")).config
  scaled = np.asarray(model._inv_freq(c))
  plain = np.asarray(model._inv_freq(dataclasses.replace(c, rope_scaling=None)))
  wavelen = 2 * np.pi / plain
  np.testing.assert_array_equal(scaled[wavelen < 16], plain[wavelen < 16])
  np.testing.assert_allclose(scaled[wavelen > 64], plain[wavelen > 64] / 8, rtol=1e-6)
  medium = (wavelen > 16) & (wavelen < 64)
  assert medium.any() and np.all(scaled[medium] < plain[medium])
  assert np.all(scaled[medium] > plain[medium] / 8)


def test_older_config_json_spellings_read_the_same():
  """rope_theta + rope_scaling (transformers 4) = rope_parameters (transformers 5)."""
  with open(os.path.join(FIXTURES, "llama", "config.json")) as f:
    new = json.load(f)
  old = {k: v for k, v in new.items() if k not in ("rope_parameters", "head_dim")}
  old["rope_theta"] = new["rope_parameters"]["rope_theta"]
  old["rope_scaling"] = {
      k: v for k, v in new["rope_parameters"].items() if k != "rope_theta"
  }
  assert hf.config_from_hf(old) == hf.config_from_hf(new)
  with open(os.path.join(FIXTURES, "gemma2", "config.json")) as f:
    gemma = json.load(f)
  without_types = {k: v for k, v in gemma.items() if k != "layer_types"}
  assert hf.config_from_hf(without_types).sliding_windows == (4, 0, 4)


def test_gemma2_windows_and_soft_caps_matter():
  lm = lm_lib.load(os.path.join(FIXTURES, "gemma2"))
  ids = jnp.asarray(np.load(os.path.join(FIXTURES, "gemma2", "outputs.npz"))["ids"])
  assert ids.shape[1] > 4  # longer than the sliding window
  with jax.disable_jit():  # five tiny runs: eager beats five compiles
    base = model.run_logits(lm.params, lm.config, ids)
    for change in (
        dict(sliding_windows=()),
        dict(attn_softcap=None),
        dict(final_softcap=None),
        dict(query_scale=None),
    ):
      config = dataclasses.replace(lm.config, **change)
      assert _rel(model.run_logits(lm.params, config, ids), base) > 1e-3, change


def test_mistral_refuses_contexts_beyond_its_sliding_window():
  lm = lm_lib.load(os.path.join(FIXTURES, "mistral"))
  lm.logits(np.zeros((1, 16), np.int32))  # the window itself is fine
  with pytest.raises(ValueError, match=r"longer than this model allows \(16: Mistral"):
    lm.activations(np.zeros((1, 17), np.int32), "blocks.0.hook_resid_post")
  with pytest.raises(ValueError, match="sliding_window"):
    lm.check_seq_len(17)
  gpt2 = lm_lib.load(os.path.join(FIXTURES, "gpt2"))
  with pytest.raises(ValueError, match="n_positions"):
    gpt2.cross_entropy(np.zeros((1, 65), np.int32))


# ---------------------------------------------------------------------------
# Loading: bfloat16, shards, names, and checkpoints that do not match.


def test_sharded_checkpoint_is_read_through_its_index():
  folder = os.path.join(FIXTURES, "qwen3")
  with open(os.path.join(folder, hf.INDEX)) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  assert not os.path.exists(os.path.join(folder, hf.WEIGHTS))


@pytest.mark.parametrize("name", ["qwen2", "gemma2"])
def test_bfloat16_weights_load_and_stay_close(name):
  path = os.path.join(FIXTURES, name)
  out = np.load(os.path.join(path, "outputs.npz"))
  lm = lm_lib.load(path, dtype=jnp.bfloat16)
  blocks = lm.params["blocks"]
  assert (
      blocks["w_q"].dtype == jnp.bfloat16 and lm.params["embed"].dtype == jnp.bfloat16
  )
  assert blocks["attn_norm"].dtype == jnp.float32
  if name == "qwen2":
    assert blocks["b_q"].dtype == jnp.float32
  error = _rel(lm.logits(out["ids"]), out["logits"])
  assert 1e-5 < error < 5e-2


def test_bfloat16_checkpoint_files_are_read(tmp_path):
  """Checkpoints stored in bfloat16 (most on the Hub) load without torch."""
  import ml_dtypes  # noqa: PLC0415

  src = os.path.join(FIXTURES, "qwen2")
  dst = _copy(src, tmp_path / "m")
  tensors = load_file(os.path.join(src, hf.WEIGHTS))
  save_file(
      {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
      os.path.join(dst, hf.WEIGHTS),
  )
  lm = lm_lib.load(dst)
  out = np.load(os.path.join(src, "outputs.npz"))
  assert lm.params["blocks"]["w_q"].dtype == jnp.float32
  assert _rel(lm.logits(out["ids"]), out["logits"]) < 5e-2


def test_checkpoint_name(tmp_path):
  snapshot = tmp_path / "models--org--tiny-model" / "snapshots" / "abc123"
  _copy(os.path.join(FIXTURES, "gpt2"), snapshot)
  assert hf.checkpoint_name(str(snapshot)) == "org/tiny-model"
  local = _copy(os.path.join(FIXTURES, "gpt2"), tmp_path / "run7")
  assert hf.checkpoint_name(local) == "run7"
  _edit_config(local, _name_or_path="openai-community/gpt2")
  assert hf.checkpoint_name(local) == "openai-community/gpt2"
  _edit_config(local, _name_or_path="/home/me/checkpoints/run7")
  assert hf.checkpoint_name(local) == "run7"
  assert hf.adds_bos(os.path.join(FIXTURES, "gemma2"))
  assert not hf.adds_bos(local)


def _copy(src, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def _edit_config(folder, drop=(), **fields) -> None:
  path = os.path.join(folder, hf.CONFIG)
  with open(path) as f:
    config = json.load(f)
  for key in drop:
    del config[key]
  config.update(fields)
  with open(path, "w") as f:
    json.dump(config, f)


@pytest.fixture
def no_tensor_reads(monkeypatch):
  """Any tensor read fails the test: errors must come from the headers."""

  def read(self, name):
    raise AssertionError(f"read {name} before the checkpoint was checked")

  monkeypatch.setattr(hf._Weights, "read", read)


def test_unsupported_model_type_lists_the_supported(tmp_path, no_tensor_reads):
  folder = _copy(os.path.join(FIXTURES, "qwen2"), tmp_path / "m")
  _edit_config(folder, model_type="bert")
  with pytest.raises(ValueError) as e:
    hf.read_hf(folder)
  assert "model_type 'bert' is not supported" in str(e.value)
  assert "llama, qwen2, qwen3, mistral, gemma2, gpt2" in str(e.value)


@pytest.mark.parametrize(
    "fields, drop, message",
    [
        (
            {"intermediate_size": 80},
            (),
            "'model.layers.0.mlp.gate_proj.weight' has shape",
        ),
        ({}, ("hidden_size",), "field 'hidden_size' is missing"),
        ({"model_type": "llama"}, (), "does not account for"),  # q/k biases left over
        ({"rope_parameters": {"rope_type": "yarn"}}, (), "rope_type 'yarn'"),
        ({"hidden_act": "relu"}, (), "hidden_act = 'relu'"),
        ({"use_sliding_window": True}, (), "use_sliding_window"),
    ],
)
def test_config_that_does_not_match_fails_naming_the_field(
    tmp_path, no_tensor_reads, fields, drop, message
):
  folder = _copy(os.path.join(FIXTURES, "qwen2"), tmp_path / "m")
  _edit_config(folder, drop, **fields)
  with pytest.raises((ValueError, NotImplementedError), match=message):
    hf.read_hf(folder)


def test_missing_tensor_fails_naming_it(tmp_path, no_tensor_reads):
  folder = _copy(os.path.join(FIXTURES, "qwen2"), tmp_path / "m")
  path = os.path.join(folder, hf.WEIGHTS)
  tensors = load_file(path)
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  save_file(tensors, path)
  with pytest.raises(ValueError, match="lacks the tensor 'model.layers.1.self_attn"):
    hf.read_hf(folder)


def test_missing_shard_or_files_fail_clearly(tmp_path):
  folder = _copy(os.path.join(FIXTURES, "qwen3"), tmp_path / "m")
  os.remove(os.path.join(folder, "model-00002-of-00003.safetensors"))
  with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
    hf.read_hf(folder)
  folder = _copy(os.path.join(FIXTURES, "gpt2"), tmp_path / "g")
  os.remove(os.path.join(folder, hf.TOKENIZER))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    lm_lib.load(folder)
  with pytest.raises(FileNotFoundError, match="without config.json"):
    lm_lib.load(tmp_path)
