"""A fresh train state: the encoder's initialisation (train.w_enc_init)."""

import numpy as np
from tiny import tiny_config

from gsae_jax import train


def _params(**overrides):
  c = tiny_config(**overrides)
  c.stack.seed = (0, 1)
  state = train.init_state(
      c, train.hparams_from_config(c), train.seeds_from_config(c), 1.0
  )
  return {k: np.asarray(v) for k, v in state.params.items()}


def test_transpose_init_ties_the_encoder_to_the_decoder():
  p = _params()
  np.testing.assert_array_equal(p['W_enc'], np.swapaxes(p['W_dec'], 1, 2))


def test_random_init_draws_unit_columns_apart_from_the_decoder():
  p, tied = _params(train__w_enc_init='random'), _params()
  np.testing.assert_array_equal(p['W_dec'], tied['W_dec'])  # decoder unchanged
  np.testing.assert_allclose(np.linalg.norm(p['W_enc'], axis=1), 1.0, rtol=1e-5)
  # [n_sae, d_in, d_sae]: no column aligned with its decoder row, SAEs differ.
  cos = np.abs(np.sum(p['W_enc'] * np.swapaxes(p['W_dec'], 1, 2), axis=1))
  assert cos.max() < 0.95
  assert not np.allclose(p['W_enc'][0], p['W_enc'][1])
