"""evaluate/absorption.py: known answers on constructed letters, the formula on
hand-made numbers, and the prompts on the real tokenizer."""

import numpy as np
import pytest
from fake_saes import baseline_sae

from gsae_jax.evaluate import absorption

S = absorption.LETTERS.index('s')
N_ABSORBED = 5  # of the 20 test words starting with 's'


def _letters_world(seed=0, d_in=64, n_train=30, n_test=20):
  """Activations x = a u_letter + noise; N_ABSORBED test 's' words also carry
  a direction v_w of their own (the words a latent will absorb)."""
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.normal(size=(d_in, d_in)))
  u, v = basis[:, :26].T, basis[:, 26 : 26 + N_ABSORBED].T  # [26, d], [5, d]

  def words(n):
    letters = np.repeat(np.arange(26), n)
    a = rng.uniform(1.0, 2.0, size=letters.size)
    return (
        a[:, None] * u[letters] + 0.05 * rng.normal(size=(letters.size, d_in)),
        letters,
    )

  train_x, train_letters = words(n_train)
  test_x, test_letters = words(n_test)
  absorbed = np.flatnonzero(test_letters == S)[:N_ABSORBED]
  test_x[absorbed] += v
  return u, v, train_x, train_letters, test_x, test_letters


def _scores(sae, train_x, train_letters, test_x, test_letters):
  probes = absorption.letter_probes(train_x, train_letters)
  f1s = absorption.probe_f1s(probes, test_x, test_letters)
  assert np.all(f1s > absorption.MIN_PROBE_F1)
  return absorption.absorption_scores(
      probes,
      f1s,
      test_x,
      test_letters,
      np.asarray(sae.encode(train_x), np.float64),
      train_letters,
      np.asarray(sae.encode(test_x), np.float64),
      sae.params['W_dec'].astype(np.float64),
  )


def test_latents_on_the_letter_directions_absorb_nothing():
  u, v, *data = _letters_world()
  # One latent per letter (reads and writes u_letter), and one per absorbed
  # word's own direction (orthogonal to every probe).
  w_enc = np.concatenate([u, v]).T  # [d_in, 31]
  sae = baseline_sae(w_enc, np.full(31, -0.5), np.concatenate([u, v]))
  scores = _scores(sae, *data)
  assert scores['absorption_letters'] == 26
  assert scores['absorption_rate'] == 0.0 and scores['absorption_fraction'] == 0.0
  assert scores['absorption_main_latent_fraction'] == 1.0
  for c, letter in enumerate(absorption.LETTERS):
    assert scores['per_letter'][letter]['main_latents'][0] == c


def test_a_latent_taking_over_a_subset_reports_its_share():
  u, v, train_x, train_letters, test_x, test_letters = _letters_world()
  # Main latent 's' is silenced by each absorbed word's direction, and word w's
  # latent fires instead (at 1.5), writing (u_s + v_w) / sqrt 2 (cos 0.71
  # with u_s): 1.06 of the word's projection a in [1, 2] on the probe.
  w_enc = np.concatenate([u, 2.0 * v]).T
  w_enc[:, S] -= 2.0 * v.sum(axis=0)
  w_dec = np.concatenate([u, (u[S] + v) / np.sqrt(2)])
  sae = baseline_sae(w_enc, np.full(31, -0.5), w_dec)
  scores = _scores(sae, train_x, train_letters, test_x, test_letters)
  s = scores['per_letter']['s']
  assert s['main_latents'] == [S] and s['clear_main_latent']
  share = N_ABSORBED / s['true_positives']
  assert s['true_positives'] == pytest.approx(20, abs=1)  # the probe finds them
  assert s['rate'] == pytest.approx(share) and s['fraction'] == pytest.approx(share)
  assert share == pytest.approx(N_ABSORBED / 20, abs=0.02)
  others = [p['rate'] for letter, p in scores['per_letter'].items() if letter != 's']
  assert others == [0.0] * 25
  assert scores['absorption_rate'] == pytest.approx(share / 26)


def test_absorption_does_not_depend_on_the_activations_scale():
  # An SAE trained on normalised activations acts on raw ones with the scale
  # folded into its weights (W_dec rows of norm 1 / scale): the same SAE on
  # activations 40x larger must score the same.
  u, v, train_x, train_letters, test_x, test_letters = _letters_world()
  w_enc = np.concatenate([u, 2.0 * v]).T
  w_enc[:, S] -= 2.0 * v.sum(axis=0)
  w_dec = np.concatenate([u, (u[S] + v) / np.sqrt(2)])
  scale = 40.0
  unit = _scores(
      baseline_sae(w_enc, np.full(31, -0.5), w_dec),
      train_x,
      train_letters,
      test_x,
      test_letters,
  )
  folded = _scores(
      baseline_sae(w_enc / scale, np.full(31, -0.5), w_dec * scale),
      train_x * scale,
      train_letters,
      test_x * scale,
      test_letters,
  )
  assert unit['absorption_rate'] > 0
  for key in ('absorption_rate', 'absorption_fraction'):
    assert folded[key] == pytest.approx(unit[key], rel=1e-6)


def test_word_absorption_follows_the_definitions():
  p = np.array([1.0, 0.0])
  # Latent 0 (main) along p; latent 1 at cos 0.6; latent 2 at cos 0.02.
  w_dec = np.array([[1.0, 0.0], [0.6, 0.8], [0.02, np.sqrt(1 - 0.02**2)]])
  x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
  f = np.array(
      [
          [0.3, 0.5, 0.0],  # main carries 0.3, latent 1 0.3: partial
          [0.0, 1.0, 0.0],  # main silent, latent 1 carries 0.6: full
          [0.0, 0.5, 0.0],  # latent 1 carries 0.3 < 0.4 of a = 1: none
          [0.0, 0.0, 50.0],  # latent 2 projects 1.0 but is below both cosines
      ]
  )
  full, fraction = absorption.word_absorption(x, f, p, w_dec, [0])
  assert full.tolist() == [False, True, False, False]
  # Word 0: m = 0.3, A = 0.3 (share 0.3 < 0.4) -> 0. Word 1: m = 0 -> 1.
  assert fraction.tolist() == [0.0, 1.0, 0.0, 0.0]
  f[0, 1] = 0.8  # A = 0.48: share 0.48; taken min(0.48, 0.7) = 0.48
  _, fraction = absorption.word_absorption(x, f, p, w_dec, [0])
  assert fraction[0] == pytest.approx(0.48 / (0.48 + 0.3))


def test_prompts_read_the_word_in_the_icl_template(lm):
  word_ids = np.asarray([lm.encode(w)[0] for w in (' cat', ' dog', ' sun', ' tree')])
  words = [' cat', ' dog', ' sun', ' tree']
  assert all(len(lm.encode(w)) == 1 for w in words)
  ids, mask = absorption.build_prompts(lm, word_ids, words, n_icl=2, seed=0)
  assert mask.sum(axis=1).tolist() == [1.0] * 4
  for row, m, word, word_id in zip(ids, mask, words, word_ids, strict=True):
    pos = int(np.argmax(m))
    assert row[pos] == word_id
    text = lm.decode(row)
    lines = text.split('\n')
    assert lines[0] == '' and lines[-1] == f'{word} has the first letter:'
    for line in lines[1:-1]:  # two examples of other words, answered
      other = line.split(' has the first letter:')[0]
      assert other in words and other != word
      assert line.endswith(f' has the first letter: {other[1].upper()}')
