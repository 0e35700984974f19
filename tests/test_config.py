"""The config schema: defaults, options, validation, and its generated docs."""

import json
import os

import pytest

from experiments import smollm2, synthetic
from gsae_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_configs_md_is_generated_from_the_schema():
  with open(os.path.join(ROOT, 'docs', 'configs.md')) as f:
    assert (
        f.read() == config_lib.reference_markdown()
    ), 'docs/configs.md is stale: python -m launch.config_reference > docs/configs.md'


def test_every_field_has_a_description_and_valid_default():
  fields = config_lib.schema()
  assert len(fields) > 50
  for f in fields.values():
    assert f.doc and '\n' not in f.doc, f.name
    if f.options is not None:
      values = f.default if isinstance(f.default, tuple) else (f.default,)
      assert all(v in f.options for v in values), f.name
  config_lib.validate(config_lib.default_config())


@pytest.mark.parametrize(
    'field, value, message',
    [
        (
            'sae.architecture',
            'sparse_coding',
            r"config\.sae\.architecture: 'sparse_coding' is not one of",
        ),
        ('sae.step_impl', 'fast', r"config\.sae\.step_impl: 'fast' is not one of"),
        (
            'train.lr_decay',
            'exp',
            r'config\.train\.lr_decay: .* constant, linear, cosine',
        ),
        ('harvest.context_len', 1, r'config\.harvest\.context_len: must be >= 2'),
        ('harvest.site', 'layer15', r'config\.harvest\.site: .* hook name'),
        ('harvest.dtype', 'float32', r'config\.harvest\.dtype: .* float16, bfloat16'),
        ('harvest.shard_rows', 100, r'config\.harvest\.shard_rows: .* multiple'),
    ],
)
def test_validate_names_the_bad_field(field, value, message):
  c = smollm2.get_config()
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_sweep_axis_options_come_from_the_schema():
  c = synthetic.get_config('test')
  c.sweep.architecture = ('gated', 'crosscoder')
  with pytest.raises(ValueError, match=r"config\.sweep\.architecture: 'crosscoder'"):
    config_lib.validate(c)


def test_base_and_stack_values():
  c = synthetic.get_config('test')
  assert config_lib.base_value(c, 'd_sae') == c.sae.d_sae
  assert config_lib.stack_values(c, 'l1_coeff') == (c.sae.l1_coeff,)
  c.stack.l1_coeff, c.stack.seed = (0.1, 0.2), (3, 4)
  assert config_lib.stack_size(c) == 2
  assert config_lib.stack_values(c, 'lr') == (c.train.lr,) * 2
  assert config_lib.stack_values(c, 'seed') == (3, 4)


def test_config_round_trips_through_json():
  c = synthetic.get_config()
  back = config_lib.from_json(config_lib.to_json(c))
  assert config_lib.incompatible_fields(c, back) == []
  assert json.loads(config_lib.to_json(back)) == json.loads(config_lib.to_json(c))


def test_a_stored_jumprelu_run_keeps_its_sparsity_warm_up():
  # Before train.l0_warmup_steps, train.l1_warmup_steps also warmed up
  # JumpReLU's L0 coefficient: a stored run must keep that schedule.
  old = synthetic.get_config('test').to_dict()
  for section in ('train', 'stack', 'sweep'):
    del old[section]['l0_warmup_steps']
  old['train']['l1_warmup_steps'] = 40
  old['stack']['l1_warmup_steps'] = [40, 60]
  for arch, expected in (('jumprelu', 40), ('gated', 0)):
    old['sae']['architecture'] = arch
    c = config_lib.with_defaults(old)
    assert c.train.l0_warmup_steps == expected
    assert c.stack.l0_warmup_steps == ((40, 60) if arch == 'jumprelu' else ())
    assert c.train.l1_warmup_steps == 40
