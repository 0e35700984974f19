"""evaluate/probing.py: sparse probing on constructed data, the corpus tasks,
and pooling on the real LM."""

import numpy as np
import pytest
from fake_saes import SITE, baseline_sae, random_sae

from gsae_jax.data.text_corpus import text_corpus
from gsae_jax.evaluate import probing


def _split(rng, u, n_per_class, flipped):
  """x = s u + small noise with s = +1 for positives, -1 for negatives, except
  `flipped` of each class on the wrong side (so a perfect probe scores
  1 - flipped / n_per_class)."""
  s = np.ones(n_per_class)
  s[:flipped] = -1.0
  s = np.concatenate([s, -s])
  y = np.concatenate([np.ones(n_per_class, bool), np.zeros(n_per_class, bool)])
  x = s[:, None] * u[None, :] + 0.01 * rng.normal(size=(s.size, u.size))
  return x, y


def test_a_latent_on_the_probe_direction_matches_the_raw_probe_at_k1():
  rng = np.random.default_rng(0)
  d_in, d_sae = 16, 12
  u = rng.normal(size=d_in)
  u /= np.linalg.norm(u)
  train_x, train_y = _split(rng, u, 100, 10)
  test_x, test_y = _split(rng, u, 50, 5)
  # Latent 3 reads and writes exactly u; the others are random directions.
  w_enc = rng.normal(size=(d_in, d_sae))
  w_enc /= np.linalg.norm(w_enc, axis=0)
  w_enc[:, 3] = u
  sae = baseline_sae(w_enc, np.zeros(d_sae), w_enc.T)
  train_f, test_f = np.asarray(sae.encode(train_x)), np.asarray(sae.encode(test_x))
  assert probing.top_k_by_mean_difference(train_f, train_y, 1).tolist() == [3]
  raw = probing.probe_accuracy(train_x, train_y, test_x, test_y)
  accs = probing.sparse_probe_accuracies(train_f, train_y, test_f, test_y, (1, 2, 5))
  assert raw == 0.9  # 5 of 50 per class are on the wrong side
  assert accs[1] == raw
  assert set(accs) == {1, 2, 5}


def test_top_k_by_mean_difference():
  x = np.array([[0.0, 5.0, 1.0], [0.0, 5.0, 3.0], [4.0, 5.0, 0.0], [2.0, 4.0, 0.0]])
  y = np.array([0, 0, 1, 1])
  # |mean differences| = [3, 0.5, 2].
  assert probing.top_k_by_mean_difference(x, y, 2).tolist() == [0, 2]


def test_speech_lines():
  text = (
      'ACT I.\n\nPROSPERO.\nMark his condition, and the event; then tell me\n'
      'If this might be a brother.\n\nMir.\nI should sin\n\n[Exit Ariel.]\n'
  )
  headings, spoken = probing.speech_lines(text)
  assert headings == ['PROSPERO.', 'Mir.']
  assert spoken == [
      'Mark his condition, and the event; then tell me',
      'If this might be a brother.',
  ]


class _ByteTokenizer:
  """text -> its UTF-8 bytes as token ids (no LM needed)."""

  def encode(self, text):
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)


def test_build_tasks_are_balanced_held_out_and_labelled_from_the_folio():
  plays = {
      s.split('/')[1]
      for s, _ in text_corpus.corpus_works()
      if s.startswith('shakespeare/')
  }
  # Every play the First Folio table names is in the corpus, and no play is
  # both a comedy and a tragedy.
  folio = probing.FOLIO_COMEDIES + probing.FOLIO_TRAGEDIES + probing.FOLIO_HISTORIES
  assert set(folio) <= plays and len(set(folio)) == len(folio) == 35
  tasks = probing.build_tasks(_ByteTokenizer(), n_train=6, n_test=3, example_len=40)
  assert [t.name for t in tasks] == list(probing.TASKS)
  for t in tasks:
    assert t.ids.shape == t.mask.shape == (18, 40)
    assert t.train.sum() == 12 and t.labels[t.train].sum() == 6
    assert t.labels[~t.train].sum() == 3
    assert np.all(t.mask[:, 0] == 0)  # position 0 is never pooled
  lines = tasks[3]
  headings = lines.ids[lines.labels == 1]
  assert np.all(headings[:, 0] == ord('\n'))
  for row, mask in zip(headings, lines.mask[lines.labels == 1], strict=True):
    text = bytes(row[1 : int(mask.sum()) + 1].astype(np.uint8)).decode()
    assert probing._HEADING.fullmatch(text), text
  with pytest.raises(
      ValueError, match='unknown probing task.*valid: shakespeare_vs_bible'
  ):
    probing.build_tasks(_ByteTokenizer(), tasks=('sonnets',))


def test_pooled_features_are_masked_means_of_the_lm_activations(lm):
  sae = random_sae('gated', d_in=lm.d_model, d_sae=24, seed=2)
  ids = np.random.default_rng(0).integers(0, 1000, size=(3, 6)).astype(np.int32)
  mask = np.array(
      [[0, 1, 1, 1, 1, 1], [0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]], np.float32
  )
  raw, [latents] = probing.pooled_features(
      [sae], lm, SITE, ids, mask, batch_size=2, progress=False
  )
  acts = np.asarray(lm.activations(ids, SITE), np.float64)
  f = np.asarray(sae.encode(acts.astype(np.float32)), np.float64)
  weights = mask / mask.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(
      raw, np.einsum('bt,btd->bd', weights, acts), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
      latents, np.einsum('bt,btf->bf', weights, f), rtol=1e-4, atol=1e-5
  )
