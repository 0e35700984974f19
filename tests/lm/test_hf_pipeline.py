"""harvest -> sweep -> evaluate -> export on tiny Hugging Face checkpoints."""

import json
import os

import numpy as np
import pytest

from experiments import smollm2_sweep
from gsae_jax import evaluate
from gsae_jax.data import harvest, store
from gsae_jax.evaluate import export
from gsae_jax.train import sweep

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
SITE = "blocks.1.hook_resid_post"


def _config(model_dir, cache_dir):
  """The main job's miniature sweep (two SAEs) on a checkpoint at layer 1."""
  c = smollm2_sweep.get_config("test")
  c.harvest.model = model_dir
  c.harvest.site = SITE
  c.data.cache_dir = str(cache_dir)
  c.sae.d_in = 64
  c.sweep.architecture = ("gated",)  # two SAEs: the sweep's two l1_coeff
  c.checkpoint.async_save = False
  return c


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_harvest_sweep_evaluate_export(family, tmp_path):
  model_dir = os.path.join(FIXTURES, family)
  c = _config(model_dir, tmp_path / "cache")
  manifest = harvest.harvest(c)[SITE]
  assert (manifest["model"], manifest["site"], manifest["d_in"]) == (family, SITE, 64)
  assert manifest["count"] == 600
  stored = store.Store(str(tmp_path / "cache"))
  assert stored.num_rows == 600

  workdir = str(tmp_path / "sweep")
  rows = sweep.run(c, workdir)
  assert len(rows) == 2
  results = evaluate.evaluate_workdir(
      workdir,
      num_tokens=64,
      split="validation",
      plots=False,
      report_latents=0,
      progress=False,
  )
  assert len(results) == 2
  for r in results:
    # Random weights: no CE ordering to expect, only spliced numbers.
    assert r["num_ce_tokens"] > 0 and np.isfinite(r["loss_recovered"])
    assert r["ce_sae"] != r["ce_clean"] and r["ce_zero"] != r["ce_clean"]
    # Gemma's contexts start with BOS, as its tokenizer config says.
    first = r["contexts"][:, 0]
    assert (first == 0).all() if family == "gemma2" else (first != 0).any()

  paths = export.export_workdir(workdir, str(tmp_path / "export"), "saelens")
  assert len(paths) == 2
  with open(os.path.join(paths[0], "cfg.json")) as f:
    cfg = json.load(f)
  assert (cfg["model_name"], cfg["hook_name"], cfg["hook_layer"]) == (family, SITE, 1)
  assert cfg["d_in"] == 64 and cfg["prepend_bos"] == (family == "gemma2")
  assert cfg["gsae_jax_model_file"] == family


def test_harvest_keeps_a_checkpoint_in_bfloat16_when_asked(tmp_path):
  model_dir = os.path.join(FIXTURES, "qwen3")
  acts = {}
  for dtype in ("float32", "bfloat16"):
    c = _config(model_dir, tmp_path / dtype)
    c.harvest.model_dtype = dtype
    c.harvest.num_tokens = 64
    harvest.harvest(c)
    stored = store.Store(str(tmp_path / dtype))
    acts[dtype] = stored.read_range(0, 60)
  a, b = acts["float32"], acts["bfloat16"]
  assert not np.array_equal(a, b)  # the weights really were bfloat16
  rel = np.linalg.norm(a - b) / np.linalg.norm(a)
  assert rel < 0.05, rel
