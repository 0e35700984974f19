"""The run configuration: its schema with defaults, and validation.

Experiment files in experiments/ start from `default_config()` and override
fields; every field can be overridden on the command line
(--config.sae.l1_coeff=3e-4). `validate` rejects bad values before anything is
compiled or written, naming the field.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from gsae_jax import models

# Fields that may differ between a run's stored config and the config that
# resumes it (how long, how often to log and save), by dotted-name prefix.
RESUMABLE_FIELDS = (
    'train.num_steps',
    'log.',
    'checkpoint.',
    'data.prefetch',
    'data.eval_cache_dir',
    'mesh.',
    'train.on_nonfinite',
    'eval.',
)
# Hyperparameters that may differ between the SAEs of one compiled program.
STACK_FIELDS = ('l1_coeff', 'lr', 'lr_warmup_steps', 'l1_warmup_steps', 'seed')
# Where each stackable field lives in the config.
STACK_FIELD_HOME = {
    'l1_coeff': 'sae.l1_coeff',
    'lr': 'train.lr',
    'lr_warmup_steps': 'train.lr_warmup_steps',
    'l1_warmup_steps': 'train.l1_warmup_steps',
    'seed': 'seed',
}


def default_config() -> ml_collections.ConfigDict:
  """Every field the library understands, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = 'synthetic'  # 'synthetic' | 'cache'
  c.data.cache_dir = ''  # an activation cache written by launch.harvest
  c.data.shuffle_buffer = 1_000_000  # activations [P App. D]
  c.data.seed = 0  # shuffle order of the cache (shared by every SAE of a stack)
  c.data.prefetch = 4  # batches the reader's thread prepares ahead
  c.data.eval_cache_dir = ''  # a held-out cache for eval.every_steps

  # Harvesting activations into a cache (launch.harvest -> data.cache_dir).
  c.harvest = ml_collections.ConfigDict()
  c.harvest.model = ''  # a Llama-family GGUF file; '' = the bundled SmolLM2-135M
  c.harvest.site = 'blocks.15.hook_resid_post'
  c.harvest.dataset = 'gsae_text_corpus'  # any TFDS text dataset
  c.harvest.data_dir = ''  # TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.harvest.split = 'train'
  c.harvest.text_key = 'text'
  c.harvest.context_len = 128  # tokens per context; position 0 is dropped
  c.harvest.num_tokens = (
      1_000_000  # activations to store (stops early if text runs out)
  )
  c.harvest.lm_batch_size = 8  # contexts per LM call
  # Drop activations with norm > this x the batch median (extra attention
  # sinks besides position 0); 0 keeps all.
  c.harvest.outlier_norm_factor = 10.0
  c.harvest.dtype = 'float16'  # on disk: 'float16' | 'bfloat16'
  c.harvest.shard_rows = 1 << 18
  c.harvest.record_rows = 4096

  # A synthetic source with a known dictionary: x = sum_i a_i d_i + noise, with
  # ~avg_active non-negative a_i ~ U(magnitude_low, magnitude_high).
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.n_features = 256
  c.synthetic.avg_active = 5.0
  c.synthetic.magnitude_low = 0.5
  c.synthetic.magnitude_high = 1.5
  c.synthetic.noise_std = 0.01
  # Features come in groups of `correlation_group` whose firing is correlated
  # with this coefficient (Gaussian copula); 0 = independent.
  c.synthetic.correlation = 0.0
  c.synthetic.correlation_group = 4
  c.synthetic.seed = 1234

  c.sae = ml_collections.ConfigDict()
  c.sae.architecture = 'gated'  # 'gated' | 'baseline'
  c.sae.d_in = 64  # for a cache source, must equal the cache's d_in
  c.sae.d_sae = 512
  c.sae.l1_coeff = 1e-3
  c.sae.sparsity = 'l1'  # see models.SPARSITY_PENALTIES
  c.sae.loss_scale = 'mean'  # 'mean' (paper: /d_in) | 'sum'
  # Mixed precision: matmul inputs and latents in bfloat16, params, Adam and
  # accumulation in float32.
  c.sae.compute_dtype = 'float32'  # 'float32' | 'bfloat16'

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4096  # [P App. D]
  c.train.num_steps = 10_000
  c.train.lr = 3e-4  # [P App. D], gated
  c.train.adam_b1 = 0.0  # [P App. D]
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-8
  c.train.lr_warmup_steps = 1000
  c.train.lr_decay = 'constant'  # 'constant' | 'linear' | 'cosine'
  c.train.lr_decay_fraction = 0.2  # decay to 0 over this last part of training
  c.train.l1_warmup_steps = 0
  # Scale activations by one scalar so E||x||^2 = d_in; stored with the run.
  c.train.normalize_activations = True
  c.train.norm_estimate_batches = 8
  # b_dec starts at 0 (the paper) or at the data mean (better for LM
  # activations, whose mean carries much of their norm).
  c.train.b_dec_init = 'zeros'  # 'zeros' | 'mean'
  c.train.dead_window_tokens = 10_000_000  # a latent silent this long is dead
  # NaN/Inf in a batch or a loss: 'stop' the run (keeping the last good
  # checkpoint), or 'freeze' the affected SAE of a stack and go on.
  c.train.on_nonfinite = 'stop'

  # Dead-latent resampling as in [P] (off by default).
  c.resample = ml_collections.ConfigDict()
  c.resample.enabled = False
  c.resample.every_steps = 25_000
  c.resample.stop_after_step = 100_000
  c.resample.lr_warmup_steps = 1000  # lr x0.1, back to x1 on a cosine
  c.resample.encoder_scale = 0.2

  # A grid of SAEs (launch.sweep): the Cartesian product of the non-empty
  # tuples, each point overriding the field of the same name in sae/train/seed.
  # Points with the same architecture and d_sae share one compiled program.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.architecture = ()
  c.sweep.d_sae = ()
  c.sweep.l1_coeff = ()
  c.sweep.lr = ()
  c.sweep.lr_warmup_steps = ()
  c.sweep.l1_warmup_steps = ()
  c.sweep.seed = ()
  # Equal compute as in [P]: baseline SAEs get this times the swept d_sae.
  c.sweep.baseline_width_factor = 1.0

  # The SAEs of one stacked program, one entry each (set by launch.sweep for a
  # group; empty = one SAE from sae.l1_coeff, train.lr, ... and seed).
  c.stack = ml_collections.ConfigDict()
  for name in STACK_FIELDS:
    c.stack[name] = ()

  # Devices: a (data, model, sweep) mesh, -1 = all remaining devices; logical
  # axes map to mesh axes by these rules (gsae_jax.parallel).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.strategy = 'jit'  # 'jit' (NamedSharding) | 'pmap' (data parallel)
  c.mesh.data = -1
  c.mesh.model = 1
  c.mesh.sweep = 1
  c.mesh.rules = (
      ('batch', 'data'),
      ('sae', 'sweep'),
      ('d_sae', 'model'),
      ('d_in', None),
  )

  # Evaluation after training (launch.evaluate, launch.main).
  c.eval = ml_collections.ConfigDict()
  c.eval.num_tokens = 20_000  # held-out tokens
  c.eval.split = 'validation'
  # During training: L0, FVU and gamma on a fixed held-out batch every this
  # many steps (a multiple of log.every_steps; 0 = off). Synthetic sources
  # draw it apart from the training stream; cache sources need
  # data.eval_cache_dir (harvest --config.harvest.split=validation).
  c.eval.every_steps = 0

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 100
  c.log.tensorboard = True

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True
  return c


def _flatten(d: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(d, ml_collections.ConfigDict):
    d = d.to_dict()
  out = {}
  for k, v in d.items():
    name = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, name + '.'))
    else:
      out[name] = v
  return out


def _require(ok: bool, field: str, msg: str) -> None:
  if not ok:
    raise ValueError(f'config.{field}: {msg}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field of `config`."""
  known = _flatten(default_config())
  given = _flatten(config)
  for name in given:
    if name not in known:
      parent = name.rsplit('.', 1)[0] if '.' in name else ''
      options = sorted(k for k in known if k.rsplit('.', 1)[0] == parent)
      raise ValueError(
          f'config.{name}: unknown field. Known fields here: {", ".join(options)}'
      )
  for name in known:
    _require(name in given, name, 'missing (start configs from default_config())')

  sae, train = config.sae, config.train
  _require(
      sae.architecture in models.ARCHITECTURES,
      'sae.architecture',
      f'{sae.architecture!r} is not one of {models.ARCHITECTURES}',
  )
  _require(
      sae.sparsity in models.SPARSITY_PENALTIES,
      'sae.sparsity',
      f'{sae.sparsity!r} is not one of {models.SPARSITY_PENALTIES}',
  )
  _require(
      sae.loss_scale in models.LOSS_SCALES,
      'sae.loss_scale',
      f'{sae.loss_scale!r} is not one of {models.LOSS_SCALES}',
  )
  _require(
      sae.compute_dtype in ('float32', 'bfloat16'),
      'sae.compute_dtype',
      f'{sae.compute_dtype!r} is not one of float32, bfloat16',
  )
  for field, value in (('sae.d_in', sae.d_in), ('sae.d_sae', sae.d_sae)):
    _require(isinstance(value, int) and value > 0, field, f'must be > 0, got {value}')
  _require(sae.l1_coeff >= 0, 'sae.l1_coeff', f'must be >= 0, got {sae.l1_coeff}')
  _require(train.lr > 0, 'train.lr', f'must be > 0, got {train.lr}')
  for field in ('batch_size', 'num_steps', 'norm_estimate_batches'):
    v = train[field]
    _require(v > 0, f'train.{field}', f'must be > 0, got {v}')
  for field in ('lr_warmup_steps', 'l1_warmup_steps', 'dead_window_tokens'):
    v = train[field]
    _require(v >= 0, f'train.{field}', f'must be >= 0, got {v}')
  _require(
      train.b_dec_init in ('zeros', 'mean'),
      'train.b_dec_init',
      f'{train.b_dec_init!r} is not one of zeros, mean',
  )
  _require(
      train.on_nonfinite in ('stop', 'freeze'),
      'train.on_nonfinite',
      f'{train.on_nonfinite!r} is not one of stop, freeze',
  )
  _require(0 <= train.adam_b1 < 1, 'train.adam_b1', 'must be in [0, 1)')
  _require(0 <= train.adam_b2 < 1, 'train.adam_b2', 'must be in [0, 1)')
  _require(
      train.lr_decay in ('constant', 'linear', 'cosine'),
      'train.lr_decay',
      f'{train.lr_decay!r} is not one of constant, linear, cosine',
  )
  _require(
      0 <= train.lr_decay_fraction <= 1, 'train.lr_decay_fraction', 'must be in [0, 1]'
  )
  _require(
      config.data.source in ('synthetic', 'cache'),
      'data.source',
      f'{config.data.source!r} is not one of synthetic, cache',
  )
  if config.data.source == 'cache':
    _require(
        bool(config.data.cache_dir), 'data.cache_dir', 'required for a cache source'
    )
  syn = config.synthetic
  _require(syn.n_features > 0, 'synthetic.n_features', 'must be > 0')
  _require(
      0 < syn.avg_active <= syn.n_features,
      'synthetic.avg_active',
      'must be in (0, n_features]',
  )
  _require(
      0 <= syn.magnitude_low <= syn.magnitude_high,
      'synthetic.magnitude_low',
      'need 0 <= magnitude_low <= magnitude_high',
  )
  _require(0 <= syn.correlation < 1, 'synthetic.correlation', 'must be in [0, 1)')
  _require(syn.correlation_group > 0, 'synthetic.correlation_group', 'must be > 0')
  _require(syn.noise_std >= 0, 'synthetic.noise_std', 'must be >= 0')
  if config.resample.enabled:
    _require(config.resample.every_steps > 0, 'resample.every_steps', 'must be > 0')
    _require(
        config.train.dead_window_tokens > 0,
        'train.dead_window_tokens',
        'must be > 0 when resampling',
    )
  _validate_sweep(config)
  _require(
      config.mesh.strategy in ('jit', 'pmap'),
      'mesh.strategy',
      f'{config.mesh.strategy!r} is not one of jit, pmap',
  )
  _require(config.eval.num_tokens > 0, 'eval.num_tokens', 'must be > 0')
  every = config.eval.every_steps
  _require(
      every >= 0 and every % config.log.every_steps == 0,
      'eval.every_steps',
      f'must be 0 or a multiple of log.every_steps ({config.log.every_steps}), '
      f'got {every}',
  )
  if every and config.data.source == 'cache':
    _require(
        bool(config.data.eval_cache_dir),
        'data.eval_cache_dir',
        'required for eval.every_steps with a cache source',
    )
  _require(config.log.every_steps > 0, 'log.every_steps', 'must be > 0')
  _require(config.checkpoint.every_steps > 0, 'checkpoint.every_steps', 'must be > 0')
  _require(config.checkpoint.max_to_keep > 0, 'checkpoint.max_to_keep', 'must be > 0')


def _validate_harvest(h: ml_collections.ConfigDict) -> None:
  import re  # noqa: PLC0415

  site_ok = re.fullmatch(
      r'blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)', h.site
  )
  _require(
      bool(site_ok),
      'harvest.site',
      f'{h.site!r} is not a hook name like blocks.15.hook_resid_post '
      '(hooks: resid_pre, resid_mid, resid_post, attn_out, mlp_out)',
  )
  _require(
      h.context_len >= 2, 'harvest.context_len', 'must be >= 2 (position 0 is dropped)'
  )
  _require(h.num_tokens > 0, 'harvest.num_tokens', 'must be > 0')
  _require(h.lm_batch_size > 0, 'harvest.lm_batch_size', 'must be > 0')
  _require(h.outlier_norm_factor >= 0, 'harvest.outlier_norm_factor', 'must be >= 0')
  _require(
      h.dtype in ('float16', 'bfloat16'),
      'harvest.dtype',
      f'{h.dtype!r} is not one of float16, bfloat16',
  )
  _require(
      h.record_rows > 0 and h.shard_rows > 0 and h.shard_rows % h.record_rows == 0,
      'harvest.shard_rows',
      'must be a positive multiple of harvest.record_rows',
  )


def _validate_sweep(config: ml_collections.ConfigDict) -> None:
  sweep, stack = config.sweep, config.stack
  for name in (
      'architecture',
      'd_sae',
      'l1_coeff',
      'lr',
      'lr_warmup_steps',
      'l1_warmup_steps',
      'seed',
  ):
    _require(
        isinstance(sweep[name], tuple),
        f'sweep.{name}',
        f'must be a tuple, got {sweep[name]!r}',
    )
  for a in sweep.architecture:
    _require(
        a in models.ARCHITECTURES,
        'sweep.architecture',
        f'{a!r} is not one of {models.ARCHITECTURES}',
    )
  for v in sweep.d_sae:
    _require(isinstance(v, int) and v > 0, 'sweep.d_sae', f'must be > 0, got {v}')
  for name, ok, what in (
      ('l1_coeff', lambda v: v >= 0, '>= 0'),
      ('lr', lambda v: v > 0, '> 0'),
      ('lr_warmup_steps', lambda v: v >= 0, '>= 0'),
      ('l1_warmup_steps', lambda v: v >= 0, '>= 0'),
      ('seed', lambda v: isinstance(v, int) and v >= 0, 'an int >= 0'),
  ):
    for v in tuple(sweep[name]) + tuple(stack[name]):
      _require(ok(v), f'sweep.{name}', f'values must be {what}, got {v!r}')
  _require(
      sweep.baseline_width_factor > 0,
      'sweep.baseline_width_factor',
      f'must be > 0, got {sweep.baseline_width_factor}',
  )
  lengths = {name: len(stack[name]) for name in STACK_FIELDS if len(stack[name])}
  _require(
      len(set(lengths.values())) <= 1,
      'stack',
      f'every non-empty field needs one entry per SAE, got lengths {lengths}',
  )


def stack_size(config: ml_collections.ConfigDict) -> int:
  """How many SAEs the run's compiled program trains."""
  return max([len(config.stack[name]) for name in STACK_FIELDS] + [1])


def stack_values(config: ml_collections.ConfigDict, name: str) -> tuple:
  """Per-SAE values of stackable field `name` (the base value if not stacked)."""
  values = tuple(config.stack[name])
  if values:
    return values
  section, _, field = STACK_FIELD_HOME[name].rpartition('.')
  base = config[section][field] if section else config[field]
  return (base,) * stack_size(config)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json_dict(d: dict) -> ml_collections.ConfigDict:
  """A ConfigDict from its to_dict() form (lists back to tuples, as configs use)."""

  def fix(v):
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(fix(x) for x in v)
    return v

  return ml_collections.ConfigDict(fix(d))


def with_defaults(stored: dict) -> ml_collections.ConfigDict:
  """A stored config (dict) over today's defaults: fields added since it was
  written get their default values, so old checkpoints keep loading."""
  base = default_config().to_dict()

  def merge(into: dict, new: dict) -> dict:
    for k, v in new.items():
      if isinstance(v, dict) and isinstance(into.get(k), dict):
        merge(into[k], v)
      else:
        into[k] = v
    return into

  return from_json_dict(merge(base, stored))


def from_json(text: str) -> ml_collections.ConfigDict:
  return from_json_dict(json.loads(text))


def incompatible_fields(
    stored: ml_collections.ConfigDict, given: ml_collections.ConfigDict
) -> list[str]:
  """Fields whose values differ in a way that makes `given` another run."""
  a, b = _flatten(stored), _flatten(given)
  diffs = []
  for name in sorted(set(a) | set(b)):
    if any(name.startswith(p) for p in RESUMABLE_FIELDS):
      continue
    va, vb = a.get(name, '<absent>'), b.get(name, '<absent>')
    if isinstance(va, list):
      va = tuple(va)
    if isinstance(vb, list):
      vb = tuple(vb)
    if va != vb:
      diffs.append(f'{name}: {va!r} (stored) vs {vb!r} (given)')
  return diffs
