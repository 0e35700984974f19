"""The code passes the project's linter and formatter (config in pyproject.toml)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ['gsae_jax', 'launch', 'experiments', 'tests', 'benchmarks', 'setup.py']


def _run(*args):
  return subprocess.run(
      [sys.executable, '-m', *args, *PATHS], cwd=ROOT, capture_output=True, text=True
  )


def test_ruff():
  result = _run('ruff', 'check')
  assert result.returncode == 0, result.stdout + result.stderr


def test_pyink_formatting():
  result = _run('pyink', '--check')
  assert result.returncode == 0, result.stdout + result.stderr
