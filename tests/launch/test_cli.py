"""Every launcher at the CLI boundary: bad input is one line, nothing written.

For each launcher: a bad value exits with status 2 and ONE line on stderr that
names the field (no traceback) and leaves the workdir / cache absent; the
corrected command then succeeds in the same place. Files written under a
umask of 022 are group- and world-readable.
"""

import os
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [  # a few-second synthetic run
    '--config=experiments/synthetic.py:test',
    '--config.train.num_steps=10',
    '--config.checkpoint.every_steps=10',
]


def _run(*args, env=None):
  """`python -m <args>` under a umask of 022 (set by a shell: preexec_fn is
  unsafe in this multithreaded process)."""
  command = ' '.join(shlex.quote(a) for a in (sys.executable, '-m', *args))
  return subprocess.run(
      ['/bin/sh', '-c', f'umask 022 && exec {command}'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu', **(env or {})),
  )


def _assert_bad_input(proc, *needles):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


def _assert_group_readable(directory):
  checked = 0
  for dirpath, _, names in os.walk(directory):
    for name in names:
      mode = os.stat(os.path.join(dirpath, name)).st_mode
      assert mode & stat.S_IRGRP and mode & stat.S_IROTH, (name, oct(mode))
      checked += 1
  assert checked


def test_train_refuses_bad_input_then_runs_in_the_same_workdir(tmp_path):
  workdir = str(tmp_path / 'run')
  bad = _run('launch.train', *TINY, '--config.sae.d_sae=0', f'--workdir={workdir}')
  _assert_bad_input(bad, 'config.sae.d_sae')
  missing = _run(
      'launch.train',
      *TINY,
      '--config.data.source=cache',
      f'--config.data.cache_dir={tmp_path / "no_cache"}',
      f'--workdir={workdir}',
  )
  _assert_bad_input(missing, 'config.data.cache_dir', 'launch.harvest')
  assert not os.path.exists(workdir)
  good = _run('launch.train', *TINY, f'--workdir={workdir}')
  assert good.returncode == 0, good.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  _assert_group_readable(workdir)

  # The other launchers that read a run: evaluate and export.
  bad = _run('launch.evaluate', f'--workdir={tmp_path / "nothing"}')
  _assert_bad_input(bad, str(tmp_path / 'nothing'))
  bad = _run('launch.evaluate', f'--workdir={workdir}', '--evals=core,saebench')
  _assert_bad_input(bad, "'saebench'", 'valid: core, probing, absorption')
  out = str(tmp_path / 'eval')
  good = _run('launch.evaluate', f'--workdir={workdir}', f'--out={out}', '--noplots')
  assert good.returncode == 0, good.stderr[-3000:]
  _assert_group_readable(out)
  export_dir = str(tmp_path / 'export')
  bad = _run(
      'launch.export', f'--workdir={tmp_path / "nothing"}', f'--out={export_dir}'
  )
  _assert_bad_input(bad, str(tmp_path / 'nothing'))
  assert not os.path.exists(export_dir)
  good = _run(
      'launch.export', f'--workdir={workdir}', '--format=npz', f'--out={export_dir}'
  )
  assert good.returncode == 0, good.stderr[-3000:]
  _assert_group_readable(export_dir)


def test_sweep_and_main_refuse_bad_input_then_run(tmp_path):
  sweep_args = [  # one group of two SAEs
      '--config=experiments/synthetic_sweep.py:runlocal',
      '--config.train.num_steps=10',
      '--config.checkpoint.every_steps=10',
      "--config.sweep.architecture=('gated',)",
      '--config.sweep.l1_coeff=(0.02,0.04)',
  ]
  workdir = str(tmp_path / 'sweep')
  bad = _run(
      'launch.sweep', *sweep_args, '--config.train.lr=-1.0', f'--workdir={workdir}'
  )
  _assert_bad_input(bad, 'config.train.lr')
  assert not os.path.exists(workdir)
  good = _run('launch.sweep', *sweep_args, f'--workdir={workdir}')
  assert good.returncode == 0, good.stderr[-3000:]
  _assert_group_readable(workdir)

  main_dir = str(tmp_path / 'main')
  bad = _run(
      'launch.main',
      *sweep_args,
      "--config.sweep.architecture=('sparse_coding',)",
      f'--workdir={main_dir}',
  )
  _assert_bad_input(bad, 'config.sweep.architecture', 'sparse_coding')
  assert not os.path.exists(main_dir)
  good = _run(
      'launch.main',
      *sweep_args,
      f'--workdir={main_dir}',
      '--config.eval.num_tokens=512',
  )
  assert good.returncode == 0, good.stderr[-3000:]
  assert os.path.exists(os.path.join(main_dir, 'results.md'))
  _assert_group_readable(main_dir)


@pytest.mark.slow
def test_harvest_refuses_bad_input_at_once_then_harvests(tmp_path):
  cache = str(tmp_path / 'cache')
  args = [
      '--config=experiments/smollm2.py:runlocal',
      f'--config.data.cache_dir={cache}',
      '--config.harvest.site=blocks.0.hook_resid_post',
      '--config.harvest.num_tokens=64',
      '--config.harvest.context_len=9',
      '--config.harvest.lm_batch_size=2',
      '--config.harvest.record_rows=32',
      '--config.harvest.shard_rows=64',
  ]
  bad = _run('launch.harvest', *args, '--config.harvest.context_len=1')
  _assert_bad_input(bad, 'config.harvest.context_len')
  unknown = _run('launch.harvest', *args, '--config.harvest.dataset=no_such_dataset')
  _assert_bad_input(unknown, "'no_such_dataset'", 'not found')
  assert not os.path.exists(cache)
  good = _run('launch.harvest', *args)
  assert good.returncode == 0, good.stderr[-3000:]
  assert 'blocks.0.hook_resid_post: 64 activations' in good.stdout
  _assert_group_readable(cache)


def test_plan_refuses_bad_input():
  bad = _run('launch.plan', '--d_in=0')
  _assert_bad_input(bad, '--d_in')
  good = _run('launch.plan', '--d_in=64', '--d_sae=1024', '--devices=1')
  assert good.returncode == 0, good.stderr[-2000:]
