"""Sweeps: grouping, one program per group, equivalence, resume, load."""

import copy
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import gsae_jax
from experiments import synthetic as synthetic_exp
from gsae_jax import backends, train
from gsae_jax.data import sources
from gsae_jax.sae import models
from gsae_jax.train import checkpoints, planner, sweep


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


def test_each_penalised_architecture_warms_up_its_own_coefficient():
  c = sweep_config()
  c.sweep.architecture = ('gated', 'jumprelu', 'topk')
  c.sweep.l1_coeff, c.sweep.l0_coeff, c.sweep.k, c.sweep.seed = (), (), (), ()
  c.sweep.l1_warmup_steps, c.sweep.l0_warmup_steps = (0, 5), (0, 3, 7)
  groups = sweep.plan(c)
  # The L1 warm-up is gated's axis, the L0 warm-up jumprelu's, neither topk's.
  assert [(g.name, g.size) for g in groups] == [
      ('gated_d32', 2),
      ('jumprelu_d32', 3),
      ('topk_d32', 1),
  ]
  gated, jumprelu, topk = (g.config for g in groups)
  assert gated.stack.l1_warmup_steps == (0, 5)
  assert jumprelu.stack.l0_warmup_steps == (0, 3, 7)
  # Each stack's HParams carry the warm-up of its own coefficient.
  warmup = lambda config: train.hparams_from_config(config).l1_warmup_steps.tolist()
  assert warmup(gated) == [0, 5]
  assert warmup(jumprelu) == [0, 3, 7]
  assert warmup(topk) == [c.train.l1_warmup_steps]


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
  assert 'data passes: 1 (auto: the 2 groups fit together' in out
  assert 'pass 1: gated_d512, baseline_d768' in out
  assert not os.path.exists(tmp_path / 's')  # a dry run writes nothing
  out = subprocess.run(
      args + ['--cluster=slurm'], cwd=root, capture_output=True, text=True, check=True
  ).stdout
  assert '#SBATCH --array=0-1' in out and '--group=' in out


class _CountingSource:
  """Wraps a source, counting reads; `on_read(n)` runs before the n-th batch."""

  def __init__(self, source, log, on_read=None):
    self.source, self.log, self.on_read = source, log, on_read

  def __getattr__(self, name):
    return getattr(self.source, name)

  def next_batch(self):
    self.log['next_batch'] += 1
    if self.on_read is not None:
      self.on_read(self.log['next_batch'])
    return self.source.next_batch()

  def mean_squared_norm(self, num_batches):
    self.log['mean_squared_norm'] += 1
    return self.source.mean_squared_norm(num_batches)


def _count_reads(monkeypatch, on_read=None):
  log = {'sources': 0, 'next_batch': 0, 'mean_squared_norm': 0}
  real = sources.make_source

  def make(config):
    log['sources'] += 1
    return _CountingSource(real(config), log, on_read)

  monkeypatch.setattr(sources, 'make_source', make)
  return log


def two_group_config():
  """gated d_sae 32 and baseline d_sae 48, two SAEs each, with held-out
  metrics and resampling on."""
  c = sweep_config()
  c.sweep.seed = ()
  c.eval.every_steps = 10
  c.resample.enabled = True
  c.resample.every_steps = 10
  c.checkpoint.every_steps = 5
  return c


def _final_params(group_dir):
  state, _, step = checkpoints.read(group_dir)
  return step, state['params']


def test_groups_share_one_read_of_each_batch_and_equal_each_group_alone(
    tmp_path, monkeypatch
):
  c = two_group_config()
  workdir = str(tmp_path / 'sweep')
  assert 'data passes: 1 (auto: the 2 groups fit together' in sweep.describe(c, workdir)
  log = _count_reads(monkeypatch)
  rows = sweep.run(c, workdir)
  assert [r['status'] for r in rows] == ['done'] * 4
  # One source, each of the 20 batches read once, E||x||^2 estimated once.
  assert log == {'sources': 1, 'next_batch': 20, 'mean_squared_norm': 1}

  for g in sweep.plan(c):
    log.update(sources=0, next_batch=0)
    alone = str(tmp_path / f'alone_{g.name}')
    state = train.train_and_evaluate(g.config, alone)
    assert log['sources'] == 1 and log['next_batch'] == 20
    step, params = _final_params(sweep.group_workdir(workdir, g))
    assert step == 20
    for name, value in state.params.items():
      np.testing.assert_array_equal(params[name], np.asarray(value), err_msg=name)
    together = train.load_metrics(sweep.group_workdir(workdir, g))
    assert together == train.load_metrics(alone)  # every metric, bit for bit
    logged = {r['step']: r for r in together if 'loss' in r}
    assert list(logged) == [5, 10, 15, 20]
    assert 'heldout_fvu' in logged[10] and 'heldout_fvu' not in logged[5]
    assert [r['step'] for r in together if 'resampled' in r] == [10, 20]


def test_an_interrupted_pass_resumes_to_the_uninterrupted_params(tmp_path, monkeypatch):
  c = two_group_config()
  straight = str(tmp_path / 'straight')
  sweep.run(c, straight)
  workdir = str(tmp_path / 'interrupted')
  gated_dir = sweep.group_workdir(workdir, 'gated_d32')
  baseline_dir = sweep.group_workdir(workdir, 'baseline_d48')

  # 1. SIGTERM during batch 7: every group checkpoints step 7, then exit 75.
  def sigterm_at_7(n):
    if n == 7:
      os.kill(os.getpid(), signal.SIGTERM)

  log = _count_reads(monkeypatch, sigterm_at_7)
  with pytest.raises(train.Preempted, match='step 7'):
    sweep.run(c, workdir)
  assert log['next_batch'] == 7
  assert checkpoints.steps(gated_dir)[-1] == checkpoints.steps(baseline_dir)[-1] == 7

  # 2. Killed between the two groups' saves of step 10: gated has it,
  # baseline does not.
  class Killed(BaseException):
    pass

  real_save = checkpoints.Manager.save

  def save(self, step, *args):
    if step == 10 and 'baseline' in str(self._mngr.directory):
      raise Killed
    return real_save(self, step, *args)

  monkeypatch.setattr(checkpoints.Manager, 'save', save)
  log = _count_reads(monkeypatch)
  with pytest.raises(Killed):
    sweep.run(c, workdir)
  assert log['next_batch'] == 3  # resumed at step 7: batches 8, 9, 10
  assert checkpoints.steps(gated_dir)[-1] == 10
  assert checkpoints.steps(baseline_dir)[-1] == 7

  # 3. The pass restarts at baseline's step 7; gated sits out 8..10.
  monkeypatch.setattr(checkpoints.Manager, 'save', real_save)
  log = _count_reads(monkeypatch)
  rows = sweep.run(c, workdir)
  assert [r['status'] for r in rows] == ['done'] * 4
  assert log['next_batch'] == 13  # batches 8..20, each read once
  for g in sweep.plan(c):
    _, want = _final_params(sweep.group_workdir(straight, g))
    step, got = _final_params(sweep.group_workdir(workdir, g))
    assert step == 20
    for name, value in want.items():
      np.testing.assert_array_equal(got[name], value, err_msg=f'{g.name} {name}')
    records = train.load_metrics(sweep.group_workdir(workdir, g))
    assert records == train.load_metrics(sweep.group_workdir(straight, g))


def test_groups_that_do_not_fit_together_train_one_at_a_time(tmp_path, monkeypatch):
  c = two_group_config()
  c.sweep.architecture = ('gated', 'baseline', 'topk')
  c.sweep.k = (4,)
  c.resample.enabled = False  # the TopK family uses AuxK instead
  groups = sweep.plan(c)
  plans = [sweep.memory_estimate(g.config, g.size) for g in groups]
  pair = planner.shared_pass_bytes(plans[:2])
  assert pair < sum(p.total for p in plans[:2])  # one group's activations at a time
  passes, why = sweep.data_passes(c, groups, budget=pair)
  assert [[g.name for g in p] for p in passes] == [
      ['gated_d32', 'baseline_d48'],
      ['topk_d32'],
  ]
  assert '2 passes' in why
  passes, why = sweep.data_passes(c, groups, budget=max(p.total for p in plans))
  assert [len(p) for p in passes] == [1, 1, 1] and 'one group at a time' in why
  c.sweep.shared_data_pass = 'on'
  assert [len(p) for p in sweep.data_passes(c, groups, budget=1)[0]] == [3]
  c.sweep.shared_data_pass = 'off'
  assert [len(p) for p in sweep.data_passes(c, groups, budget=1e18)[0]] == [1, 1, 1]

  # A budget too small for two: sweep.run trains each group in turn, alone.
  c = two_group_config()
  c.sweep.memory_budget_gib = 1e-5
  assert 'one group at a time' in sweep.describe(c, str(tmp_path / 's'))
  trained = []

  def alone(config, group_dir):
    trained.append(os.path.basename(group_dir))

  def together(runs):
    raise AssertionError('train_together called though the groups do not fit')

  monkeypatch.setattr(train, 'train_together', together)
  sweep.run(c, str(tmp_path / 's'), train_fn=alone)
  assert trained == ['gated_d32', 'baseline_d48']


def test_runs_reading_other_data_are_refused_before_anything_is_written(tmp_path):
  a, b = sweep.plan(two_group_config())
  other = copy.deepcopy(b.config)
  other.train.batch_size = 32
  runs = [(a.config, str(tmp_path / 'a')), (other, str(tmp_path / 'b'))]
  with pytest.raises(ValueError, match=r'config\.train\.batch_size'):
    train.train_together(runs)
  with pytest.raises(ValueError, match='given twice'):
    train.train_together([(a.config, str(tmp_path / 'a'))] * 2)
  assert not os.listdir(tmp_path)
