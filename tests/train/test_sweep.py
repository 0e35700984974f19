"""Sweeps: grouping, one program per group, equivalence, resume, load."""

import os
import subprocess
import sys

import numpy as np
import pytest

import gsae_jax
from experiments import synthetic as synthetic_exp
from gsae_jax import backends, train
from gsae_jax.sae import models
from gsae_jax.train import sweep


def sweep_config():
  c = synthetic_exp.get_config('test')
  c.sweep.architecture = ('gated', 'baseline')
  c.sweep.l1_coeff = (1e-3, 3e-2)
  c.sweep.seed = (0, 7)
  c.sweep.baseline_width_factor = 1.5
  return c


def test_plan_groups_by_architecture_and_width():
  groups = sweep.plan(sweep_config())
  assert [g.name for g in groups] == ['gated_d32', 'baseline_d48']
  assert [g.size for g in groups] == [4, 4]
  gated = groups[0].config
  assert gated.stack.l1_coeff == (1e-3, 1e-3, 3e-2, 3e-2)
  assert gated.stack.seed == (0, 7, 0, 7)
  assert gated.sweep.l1_coeff == ()  # a group config is a plain stacked run
  assert [m['index'] for g in groups for m in g.members] == list(range(8))


def test_each_architecture_sweeps_its_own_sparsity_knob_at_its_own_width():
  c = sweep_config()
  c.sweep.architecture = ('gated', 'jumprelu', 'topk')
  c.sweep.l1_coeff, c.sweep.l0_coeff, c.sweep.k = (1e-3, 3e-2), (0.01,), (2, 4, 8)
  c.sweep.seed = ()
  c.sweep.width_factors = (('jumprelu', 1.5), ('topk', 0.5))
  groups = sweep.plan(c)
  assert [(g.name, g.size) for g in groups] == [
      ('gated_d32', 2),
      ('jumprelu_d48', 1),
      ('topk_d16', 3),
  ]
  assert groups[0].config.stack.l1_coeff == (1e-3, 3e-2)
  assert groups[1].config.stack.l0_coeff == (0.01,)
  assert groups[2].config.stack.k == (2, 4, 8)
  # One program per group: the stack's k are an array bounded by the largest.
  assert models.SAESpec.for_run(groups[2].config).k_max == 8
  c.sweep.k = (2, 32)  # k above the group's d_sae (16) is refused, naming k
  with pytest.raises(ValueError, match=r'config\.sae\.k: .*d_sae=16.*32'):
    sweep.plan(c)
  c.sweep.k = (2,)
  c.sweep.width_factors = (('topk', -1.0),)
  with pytest.raises(ValueError, match=r'config\.sweep\.width_factors'):
    sweep.plan(c)


def test_bad_sweep_values_name_the_field():
  c = sweep_config()
  c.sweep.l1_coeff = (1e-3, -1.0)
  with pytest.raises(ValueError, match=r'config\.sweep\.l1_coeff: .* got -1\.0'):
    sweep.plan(c)
  c = sweep_config()
  c.sweep.architecture = ('gated', 'sparse_coding')
  with pytest.raises(ValueError, match=r'config\.sweep\.architecture'):
    sweep.plan(c)


def test_sweep_trains_each_group_as_one_program_and_matches_separate_runs(
    tmp_path, monkeypatch
):
  c = sweep_config()
  c.sweep.architecture = ('gated',)
  traced = []
  real_forward = backends.stacked_forward

  def counting_forward(*args, **kwargs):
    traced.append(1)
    return real_forward(*args, **kwargs)

  monkeypatch.setattr(backends, 'stacked_forward', counting_forward)
  rows = sweep.run(c, str(tmp_path / 'sweep'))
  assert len(traced) == 1  # four SAEs, one trace of the step
  monkeypatch.setattr(backends, 'stacked_forward', real_forward)
  assert [r['status'] for r in rows] == ['done'] * 4
  assert all(np.isfinite(r['metric_fvu']) for r in rows)

  stacked = gsae_jax.load(str(tmp_path / 'sweep'))
  assert [s.index for s in stacked] == [0, 1, 2, 3]
  for member, sae in zip(sweep.expand(c), stacked, strict=True):
    alone = synthetic_exp.get_config('test')
    alone.sae.l1_coeff, alone.seed = member['l1_coeff'], member['seed']
    workdir = str(tmp_path / f'alone{member["index"]}')
    train.train_and_evaluate(alone, workdir)
    ref = gsae_jax.load(workdir)
    assert sae.config.sae.l1_coeff == ref.config.sae.l1_coeff
    for name, value in ref.params.items():
      np.testing.assert_allclose(sae.params[name], value, rtol=2e-5, atol=2e-6)

  one = gsae_jax.load(str(tmp_path / 'sweep'), l1_coeff=3e-2, seed=7)
  assert one.index == 3 and one.config.seed == 7
  assert gsae_jax.load(str(tmp_path / 'sweep'), index=2).config.sae.l1_coeff == 3e-2
  assert len(gsae_jax.load(str(tmp_path / 'sweep'), l1_coeff=1e-3)) == 2
  with pytest.raises(LookupError, match='no SAE'):
    gsae_jax.load(str(tmp_path / 'sweep'), l1_coeff=0.5)


def test_half_finished_sweep_resumes_skipping_done_groups(tmp_path):
  c = sweep_config()
  c.sweep.seed = ()
  workdir = str(tmp_path / 'sweep')
  rows = sweep.run(c, workdir, only=('gated_d32',))
  assert [r['status'] for r in rows] == ['done', 'done', 'pending', 'pending']
  ckpt = os.path.join(workdir, 'groups', 'gated_d32', 'checkpoints')
  mtime = os.path.getmtime(ckpt)
  trained = []

  def spy(config, group_dir):
    trained.append(os.path.basename(group_dir))
    return train.train_and_evaluate(config, group_dir)

  rows = sweep.run(c, workdir, train_fn=spy)
  assert trained == ['baseline_d48']
  assert [r['status'] for r in rows] == ['done'] * 4
  assert os.path.getmtime(ckpt) == mtime
  with open(os.path.join(workdir, 'sweep.csv')) as f:
    assert len(f.read().strip().splitlines()) == 5  # header + one row per SAE
  other = sweep_config()
  other.train.lr = 1e-2
  with pytest.raises(ValueError, match=r'train\.lr'):
    sweep.run(other, workdir)


def test_sweep_cli_dry_run_and_cluster_commands(tmp_path):
  args = [
      sys.executable,
      '-m',
      'launch.sweep',
      '--config=experiments/synthetic_sweep.py:runlocal',
      f'--workdir={tmp_path}/s',
      '--config.sweep.l1_coeff=(0.01,0.02)',
  ]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run(
      args + ['--dry_run'], cwd=root, capture_output=True, text=True, check=True
  ).stdout
  assert 'sweep of 4 SAEs in 2 group(s)' in out
  assert 'gated_d512: 2 SAEs' in out and 'baseline_d768: 2 SAEs' in out
  assert not os.path.exists(tmp_path / 's')  # a dry run writes nothing
  out = subprocess.run(
      args + ['--cluster=slurm'], cwd=root, capture_output=True, text=True, check=True
  ).stdout
  assert '#SBATCH --array=0-1' in out and '--group=' in out
