"""Faults never lose work: kill -9, SIGTERM, corrupt checkpoints, NaN, disk full.

The kill and signal tests run launch.train in a subprocess on the tiny
synthetic config and compare with an uninterrupted run (same seed, CPU).
"""

import errno
import glob
import os
import random
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

import gsae_jax
from experiments import synthetic as synthetic_exp
from gsae_jax import train
from gsae_jax.data import sources
from gsae_jax.train import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 400
FLAGS = [  # ~5 ms a step: kills land mid-run
    '--config=experiments/synthetic.py:test',
    '--config.sae.d_in=64',
    '--config.sae.d_sae=512',
    '--config.train.batch_size=1024',
    f'--config.train.num_steps={STEPS}',
    '--config.checkpoint.every_steps=25',
    '--config.checkpoint.async_save=True',
    '--config.log.every_steps=5',
]


def _start(workdir):
  return subprocess.Popen(
      [sys.executable, '-m', 'launch.train', f'--workdir={workdir}', *FLAGS],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )


def _run_until(proc, step):
  """Reads progress lines until `step` is logged (or the run ends)."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(f'train: {step:,}/'):
      return lines
  return lines


def _finish(workdir):
  proc = _start(workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('faults') / 'straight'
  _finish(workdir)
  return gsae_jax.load(str(workdir))


def _assert_same_sae(a, b):
  for k, v in b.params.items():
    np.testing.assert_array_equal(a.params[k], v, err_msg=k)


def _logged_steps(workdir):
  return [r['step'] for r in train.load_metrics(str(workdir))]


def test_kill_9_at_random_points_loses_nothing(uninterrupted, tmp_path):
  workdir = tmp_path / 'killed'
  # Three kill points at random (fixed seed), each later than the last: every
  # restart resumes from a checkpoint and runs past the previous kill.
  targets = sorted(random.Random(0).sample(range(20, STEPS - 100, 5), 3))
  for target in targets:
    proc = _start(workdir)
    _run_until(proc, target)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
  _finish(workdir)
  _assert_same_sae(gsae_jax.load(str(workdir)), uninterrupted)
  assert _logged_steps(workdir) == list(range(5, STEPS + 1, 5))  # no gaps, no repeats


def test_sigterm_checkpoints_the_current_step_and_resume_continues(
    uninterrupted, tmp_path
):
  workdir = tmp_path / 'term'
  proc = _start(workdir)
  _run_until(proc, 105)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == train.EXIT_RESUME, out[-3000:]
  stopped = checkpoints.steps(str(workdir))[-1]
  assert stopped >= 105 and f'checkpointed step {stopped}' in out
  proc = _start(workdir)
  lines = _run_until(proc, STEPS)
  proc.communicate(timeout=120)
  assert proc.returncode == 0
  first = next(
      int(ln.split()[1].split('/')[0].replace(',', ''))
      for ln in lines
      if ln.startswith('train: ')
  )
  assert stopped < first <= stopped + 5  # picked up exactly where it stopped
  _assert_same_sae(gsae_jax.load(str(workdir)), uninterrupted)


def _tiny(**train_overrides):
  c = synthetic_exp.get_config('test')
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, capfd):
  straight = train.train_and_evaluate(_tiny(num_steps=30), str(tmp_path / 'a'))
  workdir = str(tmp_path / 'b')
  train.train_and_evaluate(_tiny(num_steps=20), workdir)
  newest = os.path.join(checkpoints.checkpoint_dir(workdir), '20')
  for path in glob.glob(os.path.join(newest, 'state', '**', '*'), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  capfd.readouterr()
  with pytest.raises(ValueError, match='unreadable'):
    gsae_jax.load(workdir, step=20)
  assert gsae_jax.load(workdir).step == 10  # load falls back too
  resumed = train.train_and_evaluate(_tiny(num_steps=30), workdir)
  assert newest in capfd.readouterr().err
  for k, v in straight.params.items():
    np.testing.assert_array_equal(np.asarray(resumed.params[k]), np.asarray(v), k)


class _NaNAt:
  """Wraps a source so that batch `step` (1-based) is NaN."""

  def __init__(self, source, step):
    self.source, self.step, self.served = source, step, 0

  def __getattr__(self, name):
    return getattr(self.source, name)

  def next_batch(self):
    self.served += 1
    x = self.source.next_batch()
    return x * np.nan if self.served == self.step else x


def test_a_nan_batch_stops_the_run_keeping_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
  real = sources.make_source
  monkeypatch.setattr(sources, 'make_source', lambda c: _NaNAt(real(c), 13))
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError, match='input batch of step 13'):
    train.train_and_evaluate(_tiny(num_steps=30), workdir)
  assert checkpoints.steps(workdir) == [10]
  assert all(np.isfinite(v).all() for v in gsae_jax.load(workdir).params.values())


def test_freeze_mode_flags_the_diverged_sae_and_trains_the_rest(tmp_path):
  c = _tiny(num_steps=20, on_nonfinite='freeze')
  c.stack.l1_coeff = (3e-3, float('inf'))  # SAE 1's loss is Inf from step 1
  state = train.train_and_evaluate(c, str(tmp_path / 'stack'))
  np.testing.assert_array_equal(np.asarray(state.bad_step), [-1, 1])
  alone = train.train_and_evaluate(_tiny(num_steps=20), str(tmp_path / 'alone'))
  for k, v in alone.params.items():
    np.testing.assert_allclose(state.params[k][0], v[0], rtol=1e-5, atol=1e-6)
  assert train.load_metrics(str(tmp_path / 'stack'))[-1]['frozen'] == [0, 1]


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 20:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  workdir = str(tmp_path / 'run')
  with pytest.raises(OSError, match=r'step 20 .*No space left.*step 10\) is intact'):
    train.train_and_evaluate(_tiny(num_steps=30), workdir)
  assert checkpoints.steps(workdir) == [10]
  assert gsae_jax.load(workdir).step == 10
