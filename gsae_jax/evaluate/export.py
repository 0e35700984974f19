"""Export trained SAEs to other tools' formats, and import them back.

Formats (all in raw activation units: the normalisation scalar is folded in,
docs/design.md §1, so cfg.json says normalize_activations 'none'):

- SAELens: a directory with cfg.json and sae_weights.safetensors, as SAELens's
  `SAE.load_from_disk(path)` reads it. Gated SAEs use SAELens's 'gated'
  architecture and parameter names (W_enc, b_gate, r_mag, b_mag, W_dec, b_dec:
  the same encoder, [P Eq. 7]), baseline SAEs its 'standard' one (W_enc,
  b_enc, W_dec, b_dec). cfg.json is written in the flat form (model_name,
  hook_name, ... at the top level, no sae_lens_version) that SAELens before
  6.0 reads as it is and 6.x converts on load. With a firing-frequency array,
  sparsity.safetensors holds log10(frequency + 1e-10) as SAELens stores it.
- JumpReLU: a gated SAE is exactly a JumpReLU SAE [P App. E]. With
  pi_mag = (x - b_dec) (W_enc * exp(r_mag)) + b_mag and
  theta = b_mag - exp(r_mag) * b_gate, pi_gate > 0 <=> pi_mag > theta, so
  f = ReLU(pi_mag) * 1[pi_mag > theta] (the ReLU matters where theta < 0).
  Written as SAELens's 'jumprelu' architecture: W_enc * exp(r_mag), b_enc =
  b_mag, threshold = theta, W_dec, b_dec.
- The other architectures use SAELens's own: jumprelu as 'jumprelu'
  (threshold = exp(log_threshold)); topk as 'topk' with its k; BatchTopK and
  Matryoshka BatchTopK as 'jumprelu' with every threshold equal to the one
  global inference threshold [B §3] (SAELens saves its own BatchTopK SAEs so).
- npz: the parameters as named arrays plus '__metadata__' (a JSON string
  with the run's config).

`from_saelens` reads SAELens's standard, gated, jumprelu and topk
architectures into this library's parameterisation (a JumpReLU becomes a gated
SAE with r_mag = 0 and b_gate = b_enc - threshold; apply_b_dec_to_input=False
is folded into the encoder biases), and `load_saelens` / `load_npz` give `gsae_jax.SAE` objects.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from gsae_jax import api, logs
from gsae_jax import config as config_lib
from gsae_jax import lm as lm_lib

SAELENS_CFG, SAELENS_WEIGHTS, SAELENS_SPARSITY = (
    'cfg.json',
    'sae_weights.safetensors',
    'sparsity.safetensors',
)
FORMATS = ('saelens', 'jumprelu', 'npz')
_PARAM_NAMES = {
    'gated': ('W_enc', 'b_gate', 'r_mag', 'b_mag', 'W_dec', 'b_dec'),
    'standard': ('W_enc', 'b_enc', 'W_dec', 'b_dec'),
    'jumprelu': ('W_enc', 'b_enc', 'threshold', 'W_dec', 'b_dec'),
    'topk': ('W_enc', 'b_enc', 'W_dec', 'b_dec'),
}
# The SAELens architecture each of ours is written as.
_SAELENS_ARCH = {
    'gated': 'gated',
    'baseline': 'standard',
    'jumprelu': 'jumprelu',
    'topk': 'topk',
    'batchtopk': 'jumprelu',
    'matryoshka_batchtopk': 'jumprelu',
}
# The bundled GGUF file is a Q4_1 quantisation of this Hugging Face model.
BUNDLED_MODEL_NAME = 'HuggingFaceTB/SmolLM2-135M-Instruct'


def _model_names(model_path: str) -> tuple[str, str]:
  """(model_name for SAELens, GGUF file name) of config.harvest.model."""
  if not model_path:
    return BUNDLED_MODEL_NAME, lm_lib.DEFAULT_GGUF
  file = os.path.basename(os.path.abspath(model_path))
  if lm_lib.is_checkpoint(model_path):  # a Hugging Face checkpoint directory
    return lm_lib.checkpoint_name(model_path), file
  return os.path.splitext(file)[0], file


# ---------------------------------------------------------------------------
# JumpReLU form of a gated SAE.


def jumprelu_params(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """The JumpReLU SAE equal to a gated SAE [P App. E] (float32 NumPy).

  Returns W_enc [d_in, d_sae] = W_enc * exp(r_mag), b_enc = b_mag, threshold =
  b_mag - exp(r_mag) * b_gate, and the same W_dec, b_dec.
  """
  missing = [k for k in _PARAM_NAMES['gated'] if k not in params]
  if missing:
    raise ValueError(f'jumprelu_params needs gated SAE params; missing {missing}')
  p = {k: np.asarray(v, np.float32) for k, v in params.items()}
  scale = np.exp(p['r_mag'])  # [d_sae]
  return {
      'W_enc': p['W_enc'] * scale[None, :],
      'b_enc': p['b_mag'],
      'threshold': p['b_mag'] - scale * p['b_gate'],
      'W_dec': p['W_dec'],
      'b_dec': p['b_dec'],
  }


def jumprelu_encode(params: dict[str, Any], x: Any) -> np.ndarray:
  """JumpReLU latents as SAELens computes them: ReLU(pre) * 1[pre > threshold].

  pre = (x - b_dec) W_enc + b_enc; computed in x's float dtype (NumPy).
  """
  x = np.asarray(x)
  dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
  p = {k: np.asarray(v, dtype) for k, v in params.items()}
  pre = (x.astype(dtype) - p['b_dec']) @ p['W_enc'] + p['b_enc']
  return np.where(pre > p['threshold'], np.maximum(pre, 0), 0).astype(dtype)


def saelens_params(sae: api.SAE, jumprelu: bool = False) -> tuple[str, dict]:
  """(SAELens architecture, its float32 tensors) of an SAE (module docstring).

  jumprelu: write a gated SAE as SAELens's 'jumprelu' (the others keep their
  own form, which for jumprelu and the BatchTopK architectures is jumprelu).
  """
  arch = sae.architecture
  p = {k: np.asarray(v, np.float32) for k, v in sae.params.items()}
  if arch == 'gated' and jumprelu:
    return 'jumprelu', jumprelu_params(p)
  if jumprelu and _SAELENS_ARCH[arch] != 'jumprelu':
    raise ValueError(
        f'SAE index {sae.index} is {arch}, which has no JumpReLU form; export it '
        "with format 'saelens'"
    )
  if arch == 'jumprelu':
    p['threshold'] = np.exp(p.pop('log_threshold'))
  elif arch in ('batchtopk', 'matryoshka_batchtopk'):
    # -1 (never estimated, no training step) behaves as 0: a plain ReLU.
    theta = max(float(p.pop('threshold')), 0.0)
    p['threshold'] = np.full((sae.d_sae,), theta, np.float32)
  saelens_arch = _SAELENS_ARCH[arch]
  return saelens_arch, {k: p[k] for k in _PARAM_NAMES[saelens_arch]}


def _gated_from_jumprelu(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A JumpReLU as a gated SAE: r_mag = 0, b_mag = b_enc, b_gate = b_enc - theta."""
  return {
      'W_enc': p['W_enc'],
      'b_gate': p['b_enc'] - p['threshold'],
      'r_mag': np.zeros_like(p['b_enc']),
      'b_mag': p['b_enc'],
      'W_dec': p['W_dec'],
      'b_dec': p['b_dec'],
  }


# ---------------------------------------------------------------------------
# SAELens.


def saelens_config(sae: api.SAE, architecture: str | None = None) -> dict[str, Any]:
  """cfg.json contents for an SAE ('gated' / 'standard' / 'jumprelu')."""
  c = sae.config
  architecture = architecture or _SAELENS_ARCH[sae.architecture]
  topk = {}
  if architecture == 'topk':
    k = int(c.sae.k)
    topk = {'k': k, 'rescale_acts_by_decoder_norm': False}
  synthetic = c.data.source == 'synthetic'
  site = 'synthetic' if synthetic else c.harvest.site
  layer = None if synthetic else lm_lib.parse_site(site).layer
  model_name, model_file = (
      ('synthetic', None) if synthetic else _model_names(c.harvest.model)
  )
  return {
      'architecture': architecture,
      'd_in': int(sae.d_in),
      'd_sae': int(sae.d_sae),
      'dtype': 'float32',
      'device': 'cpu',
      'model_name': model_name,
      'hook_name': site,
      'hook_layer': layer,
      'hook_head_index': None,
      'activation_fn_str': 'topk' if topk else 'relu',
      'activation_fn': 'topk' if topk else 'relu',
      'activation_fn_kwargs': {'k': topk['k']} if topk else {},
      **topk,
      'apply_b_dec_to_input': True,
      'finetuning_scaling_factor': False,
      'normalize_activations': 'none',  # the scalar is folded into the weights
      'context_size': None if synthetic else int(c.harvest.context_len),
      'dataset_path': None if synthetic else c.harvest.dataset,
      'dataset_trust_remote_code': False,
      # SmolLM2 adds no BOS (docs/design.md §3); Gemma's tokenizer does.
      'prepend_bos': bool(
          not synthetic
          and lm_lib.is_checkpoint(c.harvest.model)
          and lm_lib.hf.adds_bos(c.harvest.model)
      ),
      'seqpos_slice': [1, None],  # position 0 (attention sink) was dropped
      'model_from_pretrained_kwargs': {},
      'sae_lens_training_version': None,
      'neuronpedia_id': None,
      # Fields SAELens ignores (it keeps only its config fields):
      'gsae_jax_model_file': model_file,
      'gsae_jax_norm_scale': float(getattr(sae, 'norm_scale', 1.0)),
      'gsae_jax_step': getattr(sae, 'step', None),
      'gsae_jax_index': int(getattr(sae, 'index', 0)),
      'gsae_jax_config': c.to_dict(),
  }


def _jsonable(v: Any) -> Any:
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, tuple):
    return list(v)
  raise TypeError(f'not JSON serialisable: {v!r}')


def to_saelens(
    sae: api.SAE,
    out_dir: str,
    *,
    jumprelu: bool = False,
    firing_frequency: np.ndarray | None = None,
) -> str:
  """Writes the SAE as a SAELens directory; returns out_dir.

  Args:
    sae: a `gsae_jax.SAE`.
    out_dir: the directory to write (created).
    jumprelu: write a gated SAE as SAELens's 'jumprelu' architecture (see
      `saelens_params`).
    firing_frequency: per-latent firing frequency [d_sae] (from evaluation),
      written as sparsity.safetensors (log10(freq + 1e-10)).
  """
  from safetensors.numpy import save_file  # noqa: PLC0415 (optional dependency)

  arch, params = saelens_params(sae, jumprelu)
  os.makedirs(out_dir, exist_ok=True)
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
  save_file(tensors, os.path.join(out_dir, SAELENS_WEIGHTS))
  if firing_frequency is not None:
    freq = np.asarray(firing_frequency, np.float32)
    if freq.shape != (sae.d_sae,):
      raise ValueError(
          f'firing_frequency has shape {freq.shape}, expected ({sae.d_sae},)'
      )
    save_file(
        {'sparsity': np.log10(freq + np.float32(1e-10))},
        os.path.join(out_dir, SAELENS_SPARSITY),
    )
  cfg = saelens_config(sae, arch)
  with open(os.path.join(out_dir, SAELENS_CFG), 'w') as f:
    json.dump(cfg, f, indent=1, default=_jsonable)
  return out_dir


def from_saelens(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a SAELens directory into (params, metadata).

  params are float32 NumPy arrays in this library's gated, baseline or topk
  form (see the module docstring); metadata is cfg.json with 'architecture'
  set to ours and 'saelens_architecture' to the file's.
  """
  from safetensors.numpy import load_file  # noqa: PLC0415

  cfg_path = os.path.join(path, SAELENS_CFG)
  weights_path = os.path.join(path, SAELENS_WEIGHTS)
  for p in (cfg_path, weights_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f'{path} is not a SAELens SAE directory: no {p}')
  with open(cfg_path) as f:
    cfg = json.load(f)
  arch = cfg.get('architecture', 'standard')
  if arch not in _PARAM_NAMES:
    raise ValueError(
        f'{cfg_path}: architecture {arch!r} is not one of {sorted(_PARAM_NAMES)}'
    )
  norm = cfg.get('normalize_activations', 'none')
  if norm not in ('none', None, False):
    raise ValueError(
        f'{cfg_path}: normalize_activations {norm!r} needs a scaling factor this '
        'reader does not have; fold it into the weights first (SAELens: '
        'sae.fold_activation_norm_scaling_factor)'
    )
  tensors = load_file(weights_path)
  if 'scaling_factor' in tensors or 'finetuning_scaling_factor' in tensors:
    raise ValueError(f'{weights_path}: finetuning scaling factors are not supported')
  missing = [k for k in _PARAM_NAMES[arch] if k not in tensors]
  if missing:
    raise ValueError(
        f'{weights_path}: a {arch} SAE needs tensors {list(_PARAM_NAMES[arch])}; '
        f'missing {missing}'
    )
  p = {k: np.asarray(tensors[k], np.float32) for k in _PARAM_NAMES[arch]}
  d_in, d_sae = p['W_enc'].shape
  if p['W_dec'].shape != (d_sae, d_in):
    raise ValueError(
        f'{weights_path}: W_dec has shape {p["W_dec"].shape}, expected {(d_sae, d_in)}'
    )
  if not cfg.get('apply_b_dec_to_input', True):
    # x W + b = (x - b_dec) W + (b + b_dec W): our encoders subtract b_dec.
    shift = p['b_dec'] @ p['W_enc']  # [d_sae]
    if arch == 'gated':
      p['b_gate'] = p['b_gate'] + shift
      p['b_mag'] = p['b_mag'] + np.exp(p['r_mag']) * shift
    else:
      p['b_enc'] = p['b_enc'] + shift
  if arch == 'jumprelu':
    p = _gated_from_jumprelu(p)
  meta = dict(cfg)
  if arch == 'topk':
    if cfg.get('rescale_acts_by_decoder_norm'):
      raise ValueError(
          f'{cfg_path}: rescale_acts_by_decoder_norm is not supported; fold the '
          'decoder norms into the weights first'
      )
    k = cfg.get('k') or (cfg.get('activation_fn_kwargs') or {}).get('k')
    if not isinstance(k, int) or not 1 <= k <= d_sae:
      raise ValueError(
          f'{cfg_path}: a topk SAE needs an int k in [1, d_sae], got {k!r}'
      )
    meta['k'] = k
  meta['saelens_architecture'] = arch
  meta['architecture'] = {'standard': 'baseline', 'topk': 'topk'}.get(arch, 'gated')
  meta['d_in'], meta['d_sae'] = int(d_in), int(d_sae)
  return p, meta


def _merged(base: dict, update: dict) -> dict:
  """base with update's values, recursively for nested dicts."""
  out = dict(base)
  for k, v in update.items():
    out[k] = _merged(out[k], v) if isinstance(out.get(k), dict) else v
  return out


def _config_for(meta: dict[str, Any]) -> ml_collections.ConfigDict:
  """The run config of an imported SAE (stored one if present, else defaults)."""
  stored = meta.get('gsae_jax_config')
  c = config_lib.default_config()
  if stored:  # over the defaults, so fields added since the export are set
    c = config_lib.from_json_dict(_merged(c.to_dict(), stored))
  with c.unlocked():
    c.sae.architecture = meta['architecture']
    c.sae.d_in, c.sae.d_sae = meta['d_in'], meta['d_sae']
    if 'k' in meta:
      c.sae.k = int(meta['k'])
    hook = meta.get('hook_name') or meta.get('hook_point')
    if not stored and hook and hook != 'synthetic':
      c.data.source = 'cache'
      c.harvest.site = hook
      if meta.get('context_size'):
        c.harvest.context_len = int(meta['context_size'])
    for name in config_lib.STACK_FIELDS:
      c.stack[name] = ()
  return c


def _sae_from(params: dict, meta: dict) -> api.SAE:
  return api.SAE(
      _config_for(meta),
      params,
      step=meta.get('gsae_jax_step'),
      index=int(meta.get('gsae_jax_index') or 0),
      norm_scale=float(meta.get('gsae_jax_norm_scale') or 1.0),
  )


def load_saelens(path: str) -> api.SAE:
  """A `gsae_jax.SAE` from a SAELens directory (see `from_saelens`)."""
  return _sae_from(*from_saelens(path))


# ---------------------------------------------------------------------------
# npz.


def to_npz(sae: api.SAE, path: str) -> str:
  """Writes params and '__metadata__' (JSON: architecture, config, ...) to path."""
  meta = {
      'architecture': sae.architecture,
      'd_in': int(sae.d_in),
      'd_sae': int(sae.d_sae),
      'gsae_jax_norm_scale': float(getattr(sae, 'norm_scale', 1.0)),
      'gsae_jax_step': getattr(sae, 'step', None),
      'gsae_jax_index': int(getattr(sae, 'index', 0)),
      'gsae_jax_config': sae.config.to_dict(),
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {k: np.asarray(v, np.float32) for k, v in sae.params.items()}
  arrays['__metadata__'] = np.asarray(json.dumps(meta, default=_jsonable))
  with open(path, 'wb') as f:
    np.savez(f, **arrays)
  return path


def from_npz(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(params, metadata) of a file written by `to_npz`."""
  with np.load(path) as data:
    if '__metadata__' not in data:
      raise ValueError(
          f'{path} was not written by gsae_jax.export.to_npz (no metadata)'
      )
    meta = json.loads(str(data['__metadata__']))
    params = {k: np.asarray(data[k], np.float32) for k in data if k != '__metadata__'}
  return params, meta


def load_npz(path: str) -> api.SAE:
  """A `gsae_jax.SAE` from a file written by `to_npz`."""
  return _sae_from(*from_npz(path))


# ---------------------------------------------------------------------------
# Whole runs and sweeps.


def export(
    sae: api.SAE,
    out: str,
    format: str = 'saelens',  # noqa: A002 (the CLI flag's name)
    firing_frequency: np.ndarray | None = None,
) -> str:
  """Exports one SAE: 'saelens' or 'jumprelu' (a directory) or 'npz' (a file)."""
  if format == 'saelens':
    return to_saelens(sae, out, firing_frequency=firing_frequency)
  if format == 'jumprelu':
    return to_saelens(sae, out, jumprelu=True, firing_frequency=firing_frequency)
  if format == 'npz':
    return to_npz(sae, out)
  raise ValueError(f'export format {format!r} is not one of {FORMATS}')


def export_workdir(
    workdir: str,
    out: str,
    format: str = 'saelens',  # noqa: A002
    index: int | None = None,
    step: int | None = None,
) -> list[str]:
  """Exports the SAEs of a run or sweep directory into out/sae_<index>[.npz].

  If the workdir holds eval_density.npz (launch.evaluate), SAELens exports
  get sparsity.safetensors from it. Returns the written paths.
  """
  saes = api.load(workdir, step=step, index=index)
  saes = saes if isinstance(saes, list) else [saes]
  if format == 'jumprelu':
    has_form = (
        lambda s: s.architecture == 'gated'
        or _SAELENS_ARCH[s.architecture] == 'jumprelu'
    )
    skipped = [s.index for s in saes if not has_form(s)]
    saes = [s for s in saes if has_form(s)]
    if not saes:
      raise ValueError(f'no SAE in {workdir} has a JumpReLU form')
    if skipped:
      logs.info(f'no JumpReLU form: SAE index(es) {skipped} skipped')
  density_path = os.path.join(workdir, 'eval_density.npz')
  density = dict(np.load(density_path)) if os.path.exists(density_path) else {}
  paths = []
  for sae in saes:
    name = f'sae_{sae.index}' + ('.npz' if format == 'npz' else '')
    freq = density.get(f'sae_{sae.index}')
    if freq is not None and freq.shape != (sae.d_sae,):
      freq = None  # from another evaluation
    paths.append(export(sae, os.path.join(out, name), format, firing_frequency=freq))
  return paths
