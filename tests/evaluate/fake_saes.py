"""Hand-made SAEs for the evaluation tests: exact identities and random ones."""

import jax
import numpy as np

from gsae_jax import api
from gsae_jax import config as config_lib
from gsae_jax.sae import models

SITE = 'blocks.15.hook_resid_post'


def lm_config(architecture, d_in, d_sae):
  c = config_lib.default_config()
  c.data.source = 'cache'
  c.sae.architecture, c.sae.d_in, c.sae.d_sae = architecture, d_in, d_sae
  c.harvest.site = SITE
  c.harvest.context_len = 16
  c.harvest.lm_batch_size = 2
  return c


def scaled_identity_sae(d_in, scale, index=0):
  """A baseline SAE with x_hat = scale * x exactly: W_enc = [I, -I] and
  W_dec = scale [I; -I], so ReLU(x) - ReLU(-x) = x."""
  eye = np.eye(d_in, dtype=np.float32)
  params = {
      'W_enc': np.concatenate([eye, -eye], axis=1),
      'b_enc': np.zeros(2 * d_in, np.float32),
      'W_dec': np.float32(scale) * np.concatenate([eye, -eye], axis=0),
      'b_dec': np.zeros(d_in, np.float32),
  }
  return api.SAE(lm_config('baseline', d_in, 2 * d_in), params, index=index)


def random_sae(architecture, d_in=16, d_sae=32, seed=0, k=4):
  """An SAE with random weights (gated: thresholds of both signs; TopK
  family: k active latents)."""
  rng = np.random.default_rng(seed)
  config = lm_config(architecture, d_in, d_sae)
  config.sae.k = k
  spec = models.SAESpec.from_config(config.sae)
  params = {
      name: np.asarray(v)
      for name, v in models.init_params(spec, jax.random.PRNGKey(seed)).items()
  }
  for name in params:
    if name != 'W_dec' and name != 'W_enc':
      params[name] = rng.normal(0, 0.5, params[name].shape).astype(np.float32)
  if 'threshold' in params:  # BatchTopK's one global threshold
    params['threshold'] = np.float32(0.3)
  params['W_enc'] = params['W_enc'] * np.float32(0.7)
  return api.SAE(config, params, index=seed)


def baseline_sae(w_enc, b_enc, w_dec):
  """A baseline (ReLU) SAE from its weights W_enc [d_in, d_sae], b_enc, W_dec;
  b_dec = 0."""
  d_in, d_sae = np.shape(w_enc)
  params = {
      'W_enc': np.asarray(w_enc, np.float32),
      'b_enc': np.asarray(b_enc, np.float32),
      'W_dec': np.asarray(w_dec, np.float32),
      'b_dec': np.zeros(d_in, np.float32),
  }
  return api.SAE(lm_config('baseline', d_in, d_sae), params)
