"""The store on S3, for real: an S3-compatible server on loopback (moto), in process.

tensorstore's s3 kvstore talks HTTP to the server exactly as to AWS; the
endpoint and credentials come from the AWS_* environment, as for any AWS tool.
"""

import logging
import os
import signal

import numpy as np
import pytest
import toy_store as toy
from test_harvest import SITE, mini_config

import gsae_jax
from gsae_jax import evaluate
from gsae_jax.data import harvest
from gsae_jax.data import store as store_lib
from gsae_jax.train import checkpoints

BUCKET = 'acts'


@pytest.fixture(scope='module')
def s3():
  """A boto3 client of a fresh loopback S3 server; AWS_* set for tensorstore."""
  moto_server = pytest.importorskip('moto.server')
  boto3 = pytest.importorskip('boto3')
  logging.getLogger('werkzeug').setLevel(logging.ERROR)
  server = moto_server.ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
  server.start()
  _, port = server.get_host_and_port()
  env = {
      'AWS_ACCESS_KEY_ID': 'test',
      'AWS_SECRET_ACCESS_KEY': 'test',
      'AWS_ENDPOINT_URL': f'http://127.0.0.1:{port}',
      'AWS_REGION': 'us-east-1',
  }
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  client = boto3.client('s3', endpoint_url=env['AWS_ENDPOINT_URL'])
  client.create_bucket(Bucket=BUCKET)
  yield client
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()


def _objects(client, prefix):
  listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + '/')
  return {
      o['Key'][len(prefix) + 1 :]: client.get_object(Bucket=BUCKET, Key=o['Key'])[
          'Body'
      ].read()
      for o in listed.get('Contents', [])
  }


def test_the_same_store_on_s3_byte_for_byte(s3, acts, store_path):
  toy.write(f's3://{BUCKET}/toy', acts)
  assert _objects(s3, 'toy') == toy.tree_bytes(store_path)
  store = store_lib.Store(f's3://{BUCKET}/toy')
  np.testing.assert_array_equal(
      store.read_range(0, toy.N_ROWS), acts.astype(np.float16).astype(np.float32)
  )


def test_a_deleted_or_corrupt_chunk_on_s3_is_named(s3, acts):
  toy.write(f's3://{BUCKET}/broken', acts)
  s3.delete_object(Bucket=BUCKET, Key='broken/activations/c/9/0')
  with pytest.raises(
      store_lib.StoreError, match=r'chunk 9 .*s3://acts/broken is missing'
  ):
    store_lib.Store(f's3://{BUCKET}/broken').verify()
  key = 'broken/activations/c/3/0'
  data = bytearray(s3.get_object(Bucket=BUCKET, Key=key)['Body'].read())
  data[40] ^= 0xFF
  s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
  with pytest.raises(store_lib.StoreError, match=r'chunk 3 .*s3://acts/broken fails'):
    store_lib.Store(f's3://{BUCKET}/broken').read_range(0, 1024)
  with pytest.raises(store_lib.StoreError, match='does not exist; run harvest'):
    store_lib.Store(f's3://{BUCKET}/nothing')


def _train_cli(workdir, cache, steps):
  return toy.start_cli(  # inherits the AWS_* environment the fixture set
      'launch.train',
      '--config.sweep.architecture=()',
      '--config.sweep.l1_coeff=()',
      f'--config.data.cache_dir={cache}',
      f'--config.train.num_steps={steps}',
      '--config.checkpoint.every_steps=10',
      '--config.checkpoint.async_save=False',
      f'--workdir={workdir}',
  )


@pytest.mark.slow
def test_harvest_train_kill_resume_evaluate_on_s3(s3, lm, tmp_path):
  cache = f's3://{BUCKET}/smollm2/{{site}}'
  manifest = harvest.harvest(mini_config(cache), model=lm)[SITE]
  assert manifest['count'] == 600
  assert 'smollm2/blocks.15.hook_resid_post/zarr.json' in {
      o['Key'] for o in s3.list_objects_v2(Bucket=BUCKET)['Contents']
  }
  steps = 60
  straight = tmp_path / 'straight'
  proc = _train_cli(straight, cache, steps)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  killed = tmp_path / 'killed'
  proc = _train_cli(killed, cache, steps)
  for line in proc.stdout:  # kill -9 after the step-30 checkpoint, mid-run
    if line.startswith('train: 35/'):
      break
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert checkpoints.steps(str(killed))[-1] == 30
  proc = _train_cli(killed, cache, steps)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  a, b = gsae_jax.load(str(straight)), gsae_jax.load(str(killed))
  for name, value in a.params.items():
    np.testing.assert_array_equal(b.params[name], value, err_msg=name)
  (result,) = evaluate.evaluate_workdir(
      str(killed), num_tokens=64, split='validation', lm=lm, plots=False, progress=False
  )
  assert np.isfinite(result['loss_recovered']) and result['l0'] > 0
