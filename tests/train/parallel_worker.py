"""Trains the test run under given meshes; run as a subprocess by test_parallel.

  python tests/train/parallel_worker.py --devices=8 --out=DIR --workdir=DIR \
      --runs=jit:8,1,1 jit:1,8,1 pmap [--steps=20] [--process_id=0 ...]

XLA_FLAGS must be set before JAX starts, hence a separate process. For each
run it saves the final parameters (DIR/<run>.npz) and the bytes of W_enc and
W_dec held by the first local device (DIR/<run>.json).
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument('--devices', type=int, required=True)
parser.add_argument('--out', required=True)
parser.add_argument('--workdir', required=True)
parser.add_argument('--runs', nargs='+', required=True)
parser.add_argument('--steps', type=int, default=20)
parser.add_argument('--coordinator', default=None)
parser.add_argument('--num_processes', type=int, default=None)
parser.add_argument('--process_id', type=int, default=None)
args = parser.parse_args()
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from experiments import synthetic as synthetic_exp  # noqa: E402
from gsae_jax import train  # noqa: E402
from gsae_jax.train import placement  # noqa: E402

if args.coordinator:
  placement.initialize_distributed(
      args.coordinator, args.num_processes, args.process_id
  )


def config_for(run: str):
  """A run is '<strategy>[:data,model,sweep][@architecture]'."""
  run, _, arch = run.partition('@')
  c = synthetic_exp.get_config('test')
  c.train.num_steps = args.steps
  c.stack.l1_coeff = (1e-3, 3e-3, 1e-2, 3e-2)
  c.stack.seed = (0, 1, 2, 3)
  if arch:  # e.g. batchtopk: a selection over the whole sharded batch
    c.sae.architecture = arch
    c.stack.k = (2, 4, 6, 8)
    c.train.dead_window_tokens = 128  # AuxK at work within the run
  c.checkpoint.every_steps = 10
  if run == 'pmap':
    c.mesh.strategy = 'pmap'
  else:
    data, model, sweep = (int(v) for v in run.split(':')[1].split(','))
    c.mesh.data, c.mesh.model, c.mesh.sweep = data, model, sweep
  return c


for run in args.runs:
  name = run.replace(':', '_').replace(',', 'x').replace('@', '_')
  state = train.train_and_evaluate(config_for(run), os.path.join(args.workdir, name))
  local = {
      k: placement.local_bytes(state.params[k]) for k in ('W_enc', 'W_dec', 'b_dec')
  }
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    np.savez(os.path.join(args.out, f'{name}.npz'), **params)
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
      json.dump({'local_bytes': local, 'devices': jax.device_count()}, f)
