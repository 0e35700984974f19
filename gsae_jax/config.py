"""The run configuration: its schema with defaults, and validation.

Experiment files in experiments/ start from `default_config()` and override
fields; every field can be overridden on the command line
(--config.sae.l1_coeff=3e-4). `validate` rejects bad values before anything is
compiled or written, naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any

import ml_collections

from gsae_jax.backends import STEP_IMPLS
from gsae_jax.sae import models

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
    'sweep.shared_data_pass',
    'sweep.memory_budget_gib',
)
# Hyperparameters that may differ between the SAEs of one compiled program.
STACK_FIELDS = (
    'l1_coeff',
    'l0_coeff',
    'k',
    'lr',
    'lr_warmup_steps',
    'l1_warmup_steps',
    'l0_warmup_steps',
    'seed',
)
# Where each stackable field lives in the config.
STACK_FIELD_HOME = {
    'l1_coeff': 'sae.l1_coeff',
    'l0_coeff': 'sae.l0_coeff',
    'k': 'sae.k',
    'lr': 'train.lr',
    'lr_warmup_steps': 'train.lr_warmup_steps',
    'l1_warmup_steps': 'train.l1_warmup_steps',
    'l0_warmup_steps': 'train.l0_warmup_steps',
    'seed': 'seed',
}
DATA_SOURCES = ('synthetic', 'cache')
# Hook names of a site blocks.<layer>.hook_<hook> (TransformerLens's).
HOOKS = ('resid_pre', 'attn_out', 'resid_mid', 'mlp_out', 'resid_post')


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its dotted name, default, one-line doc and options."""

  name: str
  default: Any
  doc: str
  options: tuple | None = None  # the values it may take (each element, for tuples)


def _fields() -> tuple[Field, ...]:
  """The schema: every field the library understands, in reading order."""
  F = Field
  return (
      F('seed', 0, 'Initialisation seed of the SAE (per SAE in a stack: stack.seed).'),
      # Where batches come from.
      F('data.source', 'synthetic', 'Where training batches come from.', DATA_SOURCES),
      F(
          'data.cache_dir',
          '',
          'The activation store written by launch.harvest (data.source=cache): a '
          "local path, gs://bucket/path or s3://bucket/path; '{site}' in it is "
          'replaced by the hook name (required for several harvest.sites).',
      ),
      F(
          'data.shuffle_buffer',
          1_000_000,
          'Activations in the shuffle window [P App. D].',
      ),
      F('data.seed', 0, 'Shuffle order of the cache (shared by every SAE of a stack).'),
      F('data.prefetch', 4, 'Batches the grain reader prepares ahead.'),
      F(
          'data.eval_cache_dir',
          '',
          'A held-out store for eval.every_steps (cache sources; may hold {site}).',
      ),
      # Harvesting activations into a cache (launch.harvest -> data.cache_dir).
      F(
          'harvest.model',
          '',
          'A Llama-family GGUF file or a Hugging Face checkpoint directory '
          "(docs/models.md); '' = the bundled SmolLM2-135M.",
      ),
      F(
          'harvest.model_dtype',
          'float32',
          'Weight dtype of the LM in harvest and evaluation (a Hugging Face checkpoint may be kept in bfloat16).',
          ('float32', 'bfloat16'),
      ),
      F(
          'harvest.site',
          'blocks.15.hook_resid_post',
          'Hook site, blocks.<layer>.hook_<hook>; hooks: ' + ', '.join(HOOKS) + '. '
          'The site an SAE trains on (its store: data.cache_dir at this site).',
      ),
      F(
          'harvest.sites',
          (),
          'Sites harvested from ONE pass of the LM, one store each (data.cache_dir '
          "with '{site}'); () = (harvest.site,).",
      ),
      F(
          'harvest.dataset',
          'gsae_text_corpus',
          'Any TFDS text dataset; the default is the bundled corpus.',
      ),
      F(
          'harvest.data_dir',
          '',
          "TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.",
      ),
      F('harvest.split', 'train', 'TFDS split to read.'),
      F('harvest.text_key', 'text', 'Feature of a TFDS example that holds its text.'),
      F(
          'harvest.context_len',
          128,
          'Tokens per context (>= 2); position 0 (an attention sink) is dropped.',
      ),
      F(
          'harvest.num_tokens',
          1_000_000,
          'Activations to store: ceil(num_tokens / (context_len - 1)) contexts, '
          'less dropped outliers (fewer if the text runs out).',
      ),
      F('harvest.lm_batch_size', 8, 'Contexts per LM call.'),
      F(
          'harvest.outlier_norm_factor',
          10.0,
          'Drop activations with norm > this x the batch median (extra sinks); 0 keeps all.',
      ),
      F(
          'harvest.dtype',
          'float16',
          'Activation dtype on disk.',
          ('float16', 'bfloat16'),
      ),
      F(
          'harvest.shard_rows',
          1 << 18,
          'Rows per shard, the unit of harvest work, parallelism and resume (a '
          'multiple of record_rows, >= context_len - 1).',
      ),
      F(
          'harvest.record_rows',
          4096,
          'Rows per zarr chunk, crc32c-checksummed (the unit of reads and shuffling).',
      ),
      # x = sum_i a_i d_i + noise, ~avg_active non-negative a_i ~ U(low, high).
      F(
          'synthetic.n_features',
          256,
          'Dictionary size of the synthetic source (known features).',
      ),
      F('synthetic.avg_active', 5.0, 'Mean number of features active per example.'),
      F(
          'synthetic.magnitude_low',
          0.5,
          'Lower bound of an active feature magnitude U(low, high).',
      ),
      F('synthetic.magnitude_high', 1.5, 'Upper bound of an active feature magnitude.'),
      F(
          'synthetic.noise_std',
          0.01,
          'Std of isotropic Gaussian noise added to each example.',
      ),
      F(
          'synthetic.correlation',
          0.0,
          'Firing correlation within groups of features (Gaussian copula); 0 = independent.',
      ),
      F('synthetic.correlation_group', 4, 'Features per correlated group.'),
      F('synthetic.seed', 1234, 'Seed of the dictionary and of the example stream.'),
      # The SAE.
      F(
          'sae.architecture',
          'gated',
          'SAE architecture (docs/design.md §1 cites each paper).',
          models.ARCHITECTURES,
      ),
      F('sae.d_in', 64, "Input width; for a cache source, the cache's d_in."),
      F('sae.d_sae', 512, 'Number of latents (dictionary size).'),
      F(
          'sae.l1_coeff',
          1e-3,
          'L1 coefficient lambda (gated, baseline), under sae.loss_scale and the E||x||^2 = d_in normalisation.',
      ),
      F(
          'sae.l0_coeff',
          1e-3,
          "L0 coefficient lambda of a jumprelu SAE [J §3]; equals the paper's lambda under loss_scale mean.",
      ),
      F(
          'sae.k',
          32,
          'Active latents per example of topk, batchtopk and matryoshka_batchtopk SAEs [T §2.3, B §3].',
      ),
      F(
          'sae.jumprelu_bandwidth',
          1e-3,
          "Bandwidth epsilon of the JumpReLU pseudo-derivatives [J §4], in the paper's units (E||x||^2 = 1; x sqrt(d_in) here).",
      ),
      F(
          'sae.jumprelu_init_threshold',
          1e-3,
          "Initial JumpReLU threshold [J App.], in the paper's units (x sqrt(d_in) here).",
      ),
      F(
          'sae.aux_k',
          0,
          'Dead latents the AuxK loss uses per example [T App. A.2]; 0 = d_in // 2.',
      ),
      F(
          'sae.aux_coeff',
          1 / 32,
          'Coefficient alpha of the AuxK loss [T App. A.2].',
      ),
      F(
          'sae.batchtopk_threshold_rate',
          0.01,
          'Update rate of the running BatchTopK inference threshold [B §3] per step.',
      ),
      F(
          'sae.matryoshka_prefixes',
          (0.0625, 0.125, 0.25, 0.5, 1.0),
          'Nested prefixes of a matryoshka_batchtopk dictionary, as fractions of d_sae [M §3].',
      ),
      F(
          'sae.sparsity',
          'l1',
          "Penalty form: 'l1' (paper: unit-norm decoder; the only one for architectures other than gated and baseline) or decoder-norm weighted variants.",
          models.SPARSITY_PENALTIES,
      ),
      F(
          'sae.loss_scale',
          'mean',
          "'mean' divides squared errors by d_in (the paper's); 'sum' does not.",
          models.LOSS_SCALES,
      ),
      F(
          'sae.compute_dtype',
          'float32',
          'Matmul inputs and latents in training; params, Adam and accumulation stay float32.',
          models.COMPUTE_DTYPES,
      ),
      F(
          'sae.step_impl',
          'auto',
          "Formulation of the training step (gsae_jax/backends): 'auto' picks by backend from docs/benchmarks.md.",
          STEP_IMPLS,
      ),
      F(
          'sae.select_impl',
          'auto',
          "How the TopK family finds its k-th largest value (gsae_jax/sae/select.py): 'auto' picks by backend.",
          models.SELECT_IMPLS,
      ),
      # Optimisation.
      F(
          'train.batch_size',
          4096,
          'Activations per step, shared by every SAE of a stack [P App. D].',
      ),
      F('train.num_steps', 10_000, 'Optimizer steps.'),
      F('train.lr', 3e-4, 'Adam learning rate ([P App. D], gated).'),
      F('train.adam_b1', 0.0, 'Adam beta1 [P App. D].'),
      F('train.adam_b2', 0.999, 'Adam beta2 [P App. D].'),
      F('train.adam_eps', 1e-8, 'Adam epsilon.'),
      F('train.lr_warmup_steps', 1000, 'Linear learning-rate warm-up from 0.'),
      F(
          'train.lr_decay',
          'constant',
          'Learning-rate decay over the last lr_decay_fraction of training.',
          ('constant', 'linear', 'cosine'),
      ),
      F(
          'train.lr_decay_fraction',
          0.2,
          'Last part of training over which the lr decays to 0.',
      ),
      F(
          'train.l1_warmup_steps',
          0,
          'Linear warm-up of the L1 coefficient (gated, baseline) from 0. On known '
          'dictionaries a quarter of train.num_steps recovers more (docs/recipes.md); '
          'the experiment configs set it, since the right length depends on num_steps.',
      ),
      F(
          'train.l0_warmup_steps',
          0,
          "Linear warm-up of JumpReLU's L0 coefficient from 0. Keep 0: with a warm-up "
          'the learned thresholds fall and do not recover (docs/recipes.md).',
      ),
      F(
          'train.normalize_activations',
          True,
          'Scale activations by one scalar so E||x||^2 = d_in (stored with the run).',
      ),
      F(
          'train.norm_estimate_batches',
          8,
          'Batches used to estimate the normalisation (synthetic source).',
      ),
      F(
          'train.b_dec_init',
          'zeros',
          'b_dec starts at 0 (the paper) or at the data mean (better for LM activations).',
          ('zeros', 'mean'),
      ),
      F(
          'train.w_enc_init',
          'transpose',
          'W_enc starts as W_dec^T ([T §2.4]; docs/recipes.md) or as independent random unit columns.',
          ('transpose', 'random'),
      ),
      F(
          'train.dead_window_tokens',
          10_000_000,
          'A latent silent for this many tokens is dead.',
      ),
      F(
          'train.on_nonfinite',
          'stop',
          "NaN/Inf loss: 'stop' (last good checkpoint kept) or 'freeze' that SAE and go on.",
          ('stop', 'freeze'),
      ),
      # Dead-latent resampling as in [P App. D] (off by default).
      F('resample.enabled', False, 'Resample dead latents [P App. D].'),
      F('resample.every_steps', 25_000, 'Steps between resamplings.'),
      F('resample.stop_after_step', 100_000, 'No resampling after this step.'),
      F(
          'resample.lr_warmup_steps',
          1000,
          'After a resampling the lr drops to 0.1x and returns on a cosine this long.',
      ),
      F(
          'resample.encoder_scale',
          0.2,
          'Norm of a resampled encoder row relative to the mean alive row.',
      ),
      # A grid of SAEs (launch.sweep): the Cartesian product of the non-empty
      # tuples. Points with the same architecture and d_sae share one program.
      F(
          'sweep.site',
          (),
          "Grid axis: hook sites; each site's groups read its store (data.cache_dir "
          "with '{site}'; harvest them in one pass with harvest.sites).",
      ),
      F('sweep.architecture', (), 'Grid axis: architectures.', models.ARCHITECTURES),
      F(
          'sweep.d_sae',
          (),
          'Grid axis: widths (baseline widths are multiplied by baseline_width_factor).',
      ),
      F('sweep.l1_coeff', (), 'Grid axis: L1 coefficients (gated, baseline).'),
      F('sweep.l0_coeff', (), 'Grid axis: L0 coefficients (jumprelu).'),
      F('sweep.k', (), 'Grid axis: k (topk, batchtopk, matryoshka_batchtopk).'),
      F('sweep.lr', (), 'Grid axis: learning rates.'),
      F('sweep.lr_warmup_steps', (), 'Grid axis: lr warm-up lengths.'),
      F(
          'sweep.l1_warmup_steps',
          (),
          'Grid axis: L1 warm-up lengths (gated, baseline).',
      ),
      F('sweep.l0_warmup_steps', (), 'Grid axis: L0 warm-up lengths (jumprelu).'),
      F('sweep.seed', (), 'Grid axis: seeds.'),
      F(
          'sweep.baseline_width_factor',
          1.0,
          'Equal compute as in [P]: baseline SAEs get this times the swept d_sae.',
      ),
      F(
          'sweep.width_factors',
          (),
          'Equal compute per architecture: (architecture, factor) pairs multiplying the swept d_sae (overrides baseline_width_factor).',
      ),
      F(
          'sweep.shared_data_pass',
          'auto',
          "Groups train together on one read of each batch: 'auto' = as many as the planner says fit sweep.memory_budget_gib together (one at a time if none do), 'on' = all at once, 'off' = one group at a time.",
          ('auto', 'on', 'off'),
      ),
      F(
          'sweep.memory_budget_gib',
          0.0,
          'Memory per device that a shared data pass may plan for (GiB); 0 = 80% of the device memory (of host RAM where the device does not say).',
      ),
      # The SAEs of one compiled program, set by launch.sweep for a group.
      *(
          F(
              f'stack.{name}',
              (),
              f'Per-SAE {STACK_FIELD_HOME[name]} of one stacked program (set by launch.sweep; empty = one SAE).',
          )
          for name in STACK_FIELDS
      ),
      # Devices (gsae_jax/train/placement.py).
      F(
          'mesh.strategy',
          'jit',
          "'jit' (NamedSharding over a mesh) or 'pmap' (classic data parallel).",
          ('jit', 'pmap'),
      ),
      F(
          'mesh.data',
          -1,
          "Mesh axis 'data' (shards the batch); -1 = all remaining devices.",
      ),
      F('mesh.model', 1, "Mesh axis 'model' (shards d_sae)."),
      F('mesh.sweep', 1, "Mesh axis 'sweep' (shards the stack of SAEs)."),
      F(
          'mesh.rules',
          (('batch', 'data'), ('sae', 'sweep'), ('d_sae', 'model'), ('d_in', None)),
          'Logical axis -> mesh axis rules (MaxText style).',
      ),
      # Evaluation.
      F(
          'eval.num_tokens',
          20_000,
          'Held-out tokens for launch.evaluate / launch.main.',
      ),
      F('eval.split', 'validation', 'Held-out split of harvest.dataset.'),
      F(
          'eval.every_steps',
          0,
          'During training: L0/FVU/gamma on a held-out batch every this many steps (a multiple of log.every_steps; 0 = off).',
      ),
      # Logging and checkpoints.
      F('log.every_steps', 100, 'Steps between metric records and progress lines.'),
      F('log.tensorboard', True, 'Also write TensorBoard event files.'),
      F(
          'checkpoint.every_steps',
          1000,
          'Steps between checkpoints (and one at the end).',
      ),
      F('checkpoint.max_to_keep', 3, 'Checkpoints kept.'),
      F('checkpoint.async_save', True, 'Write checkpoints in the background.'),
  )


def schema() -> dict[str, Field]:
  """Every config field by dotted name."""
  return {f.name: f for f in _fields()}


def default_config() -> ml_collections.ConfigDict:
  """Every field the library understands, with its default (see `schema`)."""
  c = ml_collections.ConfigDict()
  for f in _fields():
    *sections, leaf = f.name.split('.')
    node = c
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    node[leaf] = f.default
  return c


def reference_markdown() -> str:
  """docs/configs.md: every field, its default, options and description."""
  lines = [
      '# Config fields',
      '',
      'Generated from the schema in gsae_jax/config.py by',
      '`python -m launch.config_reference > docs/configs.md`; tests check it is current.',
      'Override any field on the command line: `--config.train.lr=1e-3`.',
      '',
      '| field | default | options | description |',
      '| --- | --- | --- | --- |',
  ]
  for f in _fields():
    options = ', '.join(f'`{o}`' for o in f.options) if f.options else ''
    doc = f.doc.replace('|', '\\|')
    lines.append(f'| `{f.name}` | `{f.default!r}` | {options} | {doc} |')
  return '\n'.join(lines) + '\n'


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

  for f in _fields():  # every field with options, from the schema
    if f.options is None:
      continue
    value = config[f.name]
    for v in value if isinstance(f.default, tuple) else (value,):
      _require(v in f.options, f.name, f'{v!r} is not one of {", ".join(f.options)}')
  sae, train = config.sae, config.train
  for field, value in (('sae.d_in', sae.d_in), ('sae.d_sae', sae.d_sae)):
    _require(isinstance(value, int) and value > 0, field, f'must be > 0, got {value}')
  _require(sae.l1_coeff >= 0, 'sae.l1_coeff', f'must be >= 0, got {sae.l1_coeff}')
  _validate_architecture(config)
  _require(train.lr > 0, 'train.lr', f'must be > 0, got {train.lr}')
  for field in ('batch_size', 'num_steps', 'norm_estimate_batches'):
    v = train[field]
    _require(v > 0, f'train.{field}', f'must be > 0, got {v}')
  for field in (
      'lr_warmup_steps',
      'l1_warmup_steps',
      'l0_warmup_steps',
      'dead_window_tokens',
  ):
    v = train[field]
    _require(v >= 0, f'train.{field}', f'must be >= 0, got {v}')
  _require(0 <= train.adam_b1 < 1, 'train.adam_b1', 'must be in [0, 1)')
  _require(0 <= train.adam_b2 < 1, 'train.adam_b2', 'must be in [0, 1)')
  _require(
      0 <= train.lr_decay_fraction <= 1, 'train.lr_decay_fraction', 'must be in [0, 1]'
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
  validate_harvest(config)
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


def validate_harvest(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad config.harvest field."""
  h = config.harvest
  for field, names in (('harvest.site', (h.site,)), ('harvest.sites', h.sites)):
    for site in names:
      site_ok = isinstance(site, str) and re.fullmatch(
          rf'blocks\.\d+\.hook_({"|".join(HOOKS)})', site
      )
      _require(
          bool(site_ok),
          field,
          f'{site!r} is not a hook name like blocks.15.hook_resid_post '
          f'(hooks: {", ".join(HOOKS)})',
      )
  _require(
      len(set(h.sites)) == len(tuple(h.sites)), 'harvest.sites', 'has a repeated site'
  )
  _require(
      len(tuple(h.sites)) <= 1 or '{site}' in config.data.cache_dir,
      'data.cache_dir',
      f"must contain '{{site}}' to hold the stores of {len(tuple(h.sites))} "
      f'harvest.sites, got {config.data.cache_dir!r}',
  )
  _require(
      h.context_len >= 2, 'harvest.context_len', 'must be >= 2 (position 0 is dropped)'
  )
  _require(h.num_tokens > 0, 'harvest.num_tokens', 'must be > 0')
  _require(h.lm_batch_size > 0, 'harvest.lm_batch_size', 'must be > 0')
  _require(h.outlier_norm_factor >= 0, 'harvest.outlier_norm_factor', 'must be >= 0')
  _require(
      h.record_rows > 0 and h.shard_rows > 0 and h.shard_rows % h.record_rows == 0,
      'harvest.shard_rows',
      'must be a positive multiple of harvest.record_rows',
  )
  _require(
      h.shard_rows >= h.context_len - 1,
      'harvest.shard_rows',
      f'must hold at least one context ({h.context_len - 1} rows), got {h.shard_rows}',
  )


def _validate_architecture(config: ml_collections.ConfigDict) -> None:
  """The fields of config.sae that only some architectures read."""
  sae, arch = config.sae, config.sae.architecture
  _require(sae.l0_coeff >= 0, 'sae.l0_coeff', f'must be >= 0, got {sae.l0_coeff}')
  top = sae.d_sae if arch in models.TOPK_FAMILY else float('inf')
  for v in tuple(config.stack.k) or (sae.k,):  # a stack's own k replace sae.k
    _require(
        isinstance(v, int) and 1 <= v <= top,
        'sae.k',
        f'must be an int in [1, d_sae={sae.d_sae}], got {v!r}',
    )
  for name in ('jumprelu_bandwidth', 'jumprelu_init_threshold'):
    _require(sae[name] > 0, f'sae.{name}', f'must be > 0, got {sae[name]}')
  _require(
      isinstance(sae.aux_k, int) and sae.aux_k >= 0,
      'sae.aux_k',
      f'must be an int >= 0, got {sae.aux_k!r}',
  )
  _require(sae.aux_coeff >= 0, 'sae.aux_coeff', f'must be >= 0, got {sae.aux_coeff}')
  rate = sae.batchtopk_threshold_rate
  _require(
      0 < rate <= 1, 'sae.batchtopk_threshold_rate', f'must be in (0, 1], got {rate}'
  )
  prefixes = tuple(sae.matryoshka_prefixes)
  _require(
      bool(prefixes)
      and all(0 < p <= 1 for p in prefixes)
      and all(a < b for a, b in zip(prefixes, prefixes[1:], strict=False)),
      'sae.matryoshka_prefixes',
      f'must be increasing fractions in (0, 1], got {prefixes}',
  )
  archs = set(config.sweep.architecture) | {arch}
  for a in sorted(archs - set(models.L1_FAMILY)):
    _require(
        sae.sparsity == 'l1',
        'sae.sparsity',
        f"{a} SAEs train with the unit-norm decoder only ('l1'), got {sae.sparsity!r}",
    )
    _require(
        sae.step_impl != 'custom_vjp',
        'sae.step_impl',
        f"'custom_vjp' covers gated and baseline SAEs only, not {a}",
    )
    if config.resample.enabled:
      _require(
          a == 'jumprelu',
          'resample.enabled',
          f'{a} SAEs revive dead latents with the AuxK loss, not resampling',
      )


def _validate_sweep(config: ml_collections.ConfigDict) -> None:
  sweep, stack = config.sweep, config.stack
  for name in (
      'site',
      'architecture',
      'd_sae',
      'l1_coeff',
      'l0_coeff',
      'k',
      'width_factors',
      'lr',
      'lr_warmup_steps',
      'l1_warmup_steps',
      'l0_warmup_steps',
      'seed',
  ):
    _require(
        isinstance(sweep[name], tuple),
        f'sweep.{name}',
        f'must be a tuple, got {sweep[name]!r}',
    )
  for v in sweep.d_sae:
    _require(isinstance(v, int) and v > 0, 'sweep.d_sae', f'must be > 0, got {v}')
  for site in sweep.site:
    _require(
        isinstance(site, str)
        and bool(re.fullmatch(rf'blocks\.\d+\.hook_({"|".join(HOOKS)})', site)),
        'sweep.site',
        f'{site!r} is not a hook name like blocks.15.hook_resid_post',
    )
  _require(
      len(sweep.site) <= 1
      or config.data.source != 'cache'
      or '{site}' in config.data.cache_dir,
      'data.cache_dir',
      f"must contain '{{site}}' for a sweep over {len(sweep.site)} sites, got "
      f'{config.data.cache_dir!r}',
  )
  for name, ok, what in (
      ('l1_coeff', lambda v: v >= 0, '>= 0'),
      ('l0_coeff', lambda v: v >= 0, '>= 0'),
      ('k', lambda v: isinstance(v, int) and v >= 1, 'an int >= 1'),
      ('lr', lambda v: v > 0, '> 0'),
      ('lr_warmup_steps', lambda v: v >= 0, '>= 0'),
      ('l1_warmup_steps', lambda v: v >= 0, '>= 0'),
      ('l0_warmup_steps', lambda v: v >= 0, '>= 0'),
      ('seed', lambda v: isinstance(v, int) and v >= 0, 'an int >= 0'),
  ):
    for v in tuple(sweep[name]) + tuple(stack[name]):
      _require(ok(v), f'sweep.{name}', f'values must be {what}, got {v!r}')
  _require(
      sweep.baseline_width_factor > 0,
      'sweep.baseline_width_factor',
      f'must be > 0, got {sweep.baseline_width_factor}',
  )
  for pair in sweep.width_factors:
    ok = (
        isinstance(pair, tuple)
        and len(pair) == 2
        and pair[0] in models.ARCHITECTURES
        and isinstance(pair[1], (int, float))
        and pair[1] > 0
    )
    _require(
        ok,
        'sweep.width_factors',
        f'entries are (architecture, factor > 0) pairs, got {pair!r}',
    )
  _require(
      sweep.memory_budget_gib >= 0,
      'sweep.memory_budget_gib',
      f'must be >= 0 (0 = the device memory), got {sweep.memory_budget_gib}',
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


def base_value(config: ml_collections.ConfigDict, name: str) -> Any:
  """The run's own value of grid field `name` (architecture, d_sae or a
  stackable field), read from its home in sae/train/seed."""
  home = {
      'site': 'harvest.site',
      'architecture': 'sae.architecture',
      'd_sae': 'sae.d_sae',
  }
  return config[home.get(name) or STACK_FIELD_HOME[name]]


def stack_values(config: ml_collections.ConfigDict, name: str) -> tuple:
  """Per-SAE values of stackable field `name` (the base value if not stacked)."""
  values = tuple(config.stack[name])
  if values:
    return values
  return (base_value(config, name),) * stack_size(config)


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
  stored = copy.deepcopy(stored)
  # Before train.l0_warmup_steps existed, train.l1_warmup_steps also warmed up
  # JumpReLU's L0 coefficient: a stored JumpReLU run keeps its schedule.
  archs = set(stored.get('sweep', {}).get('architecture', ()))
  archs.add(stored.get('sae', {}).get('architecture'))
  if 'jumprelu' in archs and 'l0_warmup_steps' not in stored.get('train', {}):
    for section in ('train', 'stack', 'sweep'):
      fields = stored.get(section, {})
      if 'l1_warmup_steps' in fields:
        fields['l0_warmup_steps'] = fields['l1_warmup_steps']

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
