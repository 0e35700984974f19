r"""Plans a run on paper: bytes per device, FLOPs and step time on a mesh.

  python -m launch.plan --d_in=4096 --d_sae=1048576 --batch=4096 \
      --devices=64 --mesh=1,64,1 --chip=tpu-v5p --dtype=bfloat16
  python -m launch.plan --d_in=576 --batch=4096 --devices=8 --device_gib=16
      # the largest d_sae that fits each mesh

All numbers are computed (gsae_jax.planner), not measured.
"""

import itertools

from absl import flags

from gsae_jax.sae import models
from gsae_jax.train import planner
from launch import cli

_D_IN = flags.DEFINE_integer('d_in', 4096, 'SAE input width.')
_D_SAE = flags.DEFINE_integer('d_sae', 1 << 20, 'SAE latents.')
_BATCH = flags.DEFINE_integer('batch', 4096, 'Global batch (activations).')
_N_SAE = flags.DEFINE_integer('n_sae', 1, 'SAEs in the stack.')
_DEVICES = flags.DEFINE_integer('devices', 64, 'Devices in the mesh.')
_MESH = flags.DEFINE_string(
    'mesh', '', 'data,model,sweep; empty = every factorisation of --devices.'
)
_CHIP = flags.DEFINE_enum('chip', 'tpu-v5p', list(planner.CHIPS), 'For step times.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], 'Compute.')
_DEVICE_GIB = flags.DEFINE_float('device_gib', 95.0, 'Device memory (GiB).')
_ARCH = flags.DEFINE_enum('architecture', 'gated', list(models.ARCHITECTURES), 'SAE.')


def _meshes(n: int):
  if _MESH.value:
    yield tuple(int(v) for v in _MESH.value.split(','))
    return
  for dp, mp in itertools.product(range(1, n + 1), repeat=2):
    if n % (dp * mp) == 0 and n // (dp * mp) <= max(_N_SAE.value, 1):
      sp = n // (dp * mp)
      if _N_SAE.value % sp == 0:
        yield (dp, mp, sp)


def main():
  for flag in (_D_IN, _D_SAE, _BATCH, _N_SAE, _DEVICES):
    if flag.value <= 0:
      raise ValueError(f'--{flag.name}: must be > 0, got {flag.value}')
  if _MESH.value:
    mesh = _MESH.value.split(',')
    if len(mesh) != 3 or not all(v.isdigit() and int(v) > 0 for v in mesh):
      raise ValueError(
          f'--mesh: expected data,model,sweep sizes > 0, got {_MESH.value!r}'
      )
  peak = planner.CHIPS[_CHIP.value][0 if _DTYPE.value == 'bfloat16' else 1]
  cb = 2 if _DTYPE.value == 'bfloat16' else 4
  device_bytes = _DEVICE_GIB.value * 2**30
  print(
      f'COMPUTED, NOT MEASURED: d_in {_D_IN.value}, d_sae {_D_SAE.value}, batch '
      f'{_BATCH.value}, {_N_SAE.value} SAE(s), {_DEVICES.value} x {_CHIP.value} '
      f'({peak / 1e12:.0f} TFLOP/s {_DTYPE.value}), {_DEVICE_GIB.value:g} GiB each'
  )
  print(
      f'{"mesh d,m,s":>12} {"params":>10} {"adam":>10} {"acts":>10} {"total":>10} '
      f'{"fits":>5} {"GFLOP/dev":>10} {"step ms":>8} {"max d_sae":>10}'
  )
  for mesh in _meshes(_DEVICES.value):
    p = planner.plan(
        _D_IN.value, _D_SAE.value, _BATCH.value, _N_SAE.value, mesh, _ARCH.value, cb
    )
    biggest = planner.largest_d_sae(
        device_bytes, _D_IN.value, _BATCH.value, _N_SAE.value, mesh, _ARCH.value, cb
    )
    fmt = planner.format_bytes
    print(
        f'{",".join(map(str, mesh)):>12} {fmt(p.params):>10} {fmt(p.adam):>10} '
        f'{fmt(p.activations):>10} {fmt(p.total):>10} '
        f'{"yes" if p.total <= 0.8 * device_bytes else "no":>5} '
        f'{p.flops_per_device / 1e9:>10.0f} {1e3 * p.flops_per_device / peak:>8.2f} '
        f'{biggest:>10}'
    )


if __name__ == '__main__':
  cli.run(main)
