"""Feature absorption on the first-letter task [Chanin et al. 2024, arXiv
2409.14507, as SAEBench implements it]; definitions in docs/design.md §2.

The task: single-token words of the vocabulary (tokens that decode to ' ' +
letters), each read at its own token in an in-context prompt
'\\n<w1> has the first letter: W\\n ... <word> has the first letter:'
(SAEBench's template; N_ICL examples drawn from the same split's words). The
words are split 80/20 into train and test (seeded).

1. Ground-truth probes: per letter, a one-vs-rest L2 logistic regression on
   the raw activations (class-balanced), fitted on the training words. Only
   letters whose probe reaches test F1 > MIN_PROBE_F1 are evaluated, and at
   least MIN_LETTERS of them must be (else the scores are NaN).
2. Main latents (k-sparse probing): an L1 logistic probe per letter on the
   SAE's latents ranks the latents by weight; for k = 1..MAX_K a balanced L2
   probe on the top k is scored by test F1, and k grows while each step adds
   more than F1_JUMP: the latents kept are the letter's main latents.
3. Per test word the letter's probe gets right ("true positive"), with p the
   unit probe direction, a = x . p the activation's projection on it and
   proj_i = f_i (W_dec,i . p) each latent's share of the reconstruction's
   projection (SAEBench writes f_i cos(W_dec,i, p), the same number for its
   unit-norm decoder rows; an SAE here acts on raw activations with the
   normalisation folded into W_dec, whose rows then have norm 1 / scale, and
   the dot product keeps proj in the units of a):
   - full absorption: every main latent is silent (f < 1e-8), the latent of
     largest proj has cos >= FULL_COS, a >= 0, and proj_top / a >= PROJ_SHARE;
   - absorption fraction: with m = sum of the main latents' proj and A the sum
     of the largest (up to MAX_ABSORBERS) positive proj of other latents with
     cos >= FRACTION_COS: 0 if m >= a or A / a < PROJ_SHARE, 1 if m <= 0,
     else min(A, a - m) / (min(A, a - m) + m).
   A letter's absorption rate is its full-absorption count over its true
   positives (its fraction likewise the mean); the scores are means over the
   evaluated letters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from gsae_jax import logs
from gsae_jax.evaluate import linear_probe, probing

LETTERS = 'abcdefghijklmnopqrstuvwxyz'
TEMPLATE = ' has the first letter:'  # SAEBench: '{word} has the first letter:'
N_ICL = 5  # in-context examples per prompt (SAEBench: 10; halved for 2 cores)
TRAIN_FRACTION = 0.8
# SAEBench's thresholds (its absorption eval config and calculator).
MIN_PROBE_F1 = 0.6
# SAEBench needs 20 letters with a good probe (and advises models >= 2B); the
# bundled 135M model passes ~17-20 on the default sizes, so 10 are required
# here and the count is reported beside every score (absorption_letters).
MIN_LETTERS = 10
MAX_K = 10
F1_JUMP = 0.03
L1_COEFF = 0.01
FULL_COS = 0.025
FRACTION_COS = 0.1
PROJ_SHARE = 0.4
MAX_ABSORBERS = 3
SILENT = 1e-8

_WORD = re.compile(r' [A-Za-z]+')


def alpha_vocab(tokenizer: Any) -> tuple[np.ndarray, list[str]]:
  """Token ids and texts of the single-token words ' ' + letters, by id."""
  ids, words = [], []
  for token in range(tokenizer.vocab_size):
    text = tokenizer.decode(np.asarray([token], np.int32))
    if _WORD.fullmatch(text):
      ids.append(token)
      words.append(text)
  return np.asarray(ids, np.int32), words


def build_prompts(
    tokenizer: Any, word_ids: np.ndarray, words: Sequence[str], n_icl: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """ICL prompts for each word: ids [n, t] (padded with 0) and the one-hot
  mask [n, t] of the word's position. Examples come from the other words."""
  encode = tokenizer.encode
  template = list(encode(TEMPLATE))
  newline = list(encode('\n'))
  answers = {c: list(encode(' ' + c.upper())) for c in LETTERS}
  rng = np.random.default_rng(seed)
  rows, positions = [], []
  for i in range(len(words)):
    others = rng.choice(len(words) - 1, size=min(n_icl, len(words) - 1), replace=False)
    ids = list(newline)
    for j in others:
      j = int(j) + (int(j) >= i)  # skip the word itself
      ids += [int(word_ids[j])] + template + answers[words[j][1].lower()] + newline
    positions.append(len(ids))
    rows.append(ids + [int(word_ids[i])] + template)
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.float32)
  for r, (row, pos) in enumerate(zip(rows, positions, strict=True)):
    ids[r, : len(row)] = row
    mask[r, pos] = 1.0
  return ids, mask


# ---------------------------------------------------------------------------
# The metric, on activations and latents (no LM here).


def letter_probes(
    x: np.ndarray, letters: np.ndarray
) -> list[linear_probe.Probe | None]:
  """Per letter index, a balanced L2 probe on x (None if a class is empty)."""
  out = []
  for c in range(len(LETTERS)):
    y = letters == c
    if y.all() or not y.any():
      out.append(None)
      continue
    out.append(
        linear_probe.fit_logistic(x, y, sample_weight=linear_probe.balanced_weights(y))
    )
  return out


def probe_f1s(probes, x: np.ndarray, letters: np.ndarray) -> np.ndarray:
  """Test F1 of each letter's probe [26] (0 where there is none)."""
  return np.asarray(
      [
          0.0 if p is None else linear_probe.f1_score(p.score(x) > 0, letters == c)
          for c, p in enumerate(probes)
      ]
  )


def main_latents(
    ranking: np.ndarray,
    train_f: np.ndarray,
    train_y: np.ndarray,
    test_f: np.ndarray,
    test_y: np.ndarray,
    *,
    max_k: int = MAX_K,
    f1_jump: float = F1_JUMP,
) -> tuple[list[int], float]:
  """A letter's main latents by k-sparse probing, and the k = 1 probe's F1.

  ranking: latents in order of the L1 probe's weight (largest first); k grows
  from 1 while the k-latent probe's test F1 beats the best so far by more
  than f1_jump.
  """
  best, kept, f1_first = -np.inf, [], 0.0
  weights = linear_probe.balanced_weights(train_y)
  for k in range(1, max_k + 1):
    cols = ranking[:k]
    probe = linear_probe.fit_logistic(train_f[:, cols], train_y, sample_weight=weights)
    f1 = linear_probe.f1_score(probe.score(test_f[:, cols]) > 0, test_y)
    if k == 1:
      f1_first = f1
    if f1 <= best + f1_jump:
      break
    best, kept = f1, [int(i) for i in cols]
  return kept, f1_first


def word_absorption(
    x: np.ndarray,
    f: np.ndarray,
    direction: np.ndarray,
    w_dec: np.ndarray,
    main: list[int],
) -> tuple[np.ndarray, np.ndarray]:
  """(full absorption [n] bool, absorption fraction [n]) of words x [n, d_in]
  with latents f [n, d_sae], for a probe direction and main latents."""
  p = direction / np.linalg.norm(direction)
  dots = w_dec @ p  # [d_sae]
  cos = dots / np.maximum(np.linalg.norm(w_dec, axis=1), 1e-12)  # [d_sae]
  a = x @ p  # [n]
  proj = f * dots  # [n, d_sae]: each latent's part of x_hat . p
  is_main = np.zeros(f.shape[1], bool)
  is_main[main] = True
  # Full absorption: main latents silent, the top-projecting latent aligned
  # and carrying at least PROJ_SHARE of the probe projection.
  top = np.argmax(proj, axis=1)
  top_proj = proj[np.arange(len(a)), top]
  silent = np.all(f[:, is_main] < SILENT, axis=1)
  with np.errstate(divide='ignore', invalid='ignore'):
    full = silent & (cos[top] >= FULL_COS) & (a >= 0) & (top_proj / a >= PROJ_SHARE)
  # Absorption fraction: up to MAX_ABSORBERS aligned non-main latents.
  m = proj[:, is_main].sum(axis=1)
  candidates = np.where(~is_main & (cos >= FRACTION_COS) & (proj > 0), proj, 0.0)
  absorbed = -np.sort(-candidates, axis=1)[:, :MAX_ABSORBERS].sum(axis=1)
  with np.errstate(divide='ignore', invalid='ignore'):
    share = absorbed / a
    taken = np.minimum(absorbed, a - m)
    partial = np.clip(taken / (taken + m), 0.0, 1.0)
  fraction = np.where(
      (m >= a) | ~(share >= PROJ_SHARE), 0.0, np.where(m <= 0, 1.0, partial)
  )
  return full, fraction


def absorption_scores(
    probes,
    f1s: np.ndarray,
    test_x: np.ndarray,
    test_letters: np.ndarray,
    train_f: np.ndarray,
    train_letters: np.ndarray,
    test_f: np.ndarray,
    w_dec: np.ndarray,
    *,
    min_letters: int = MIN_LETTERS,
) -> dict[str, Any]:
  """One SAE's absorption scores from the shared probes and its latents.

  Returns absorption_rate (mean full-absorption rate), absorption_fraction,
  absorption_main_latent_fraction (letters whose best single latent alone
  reaches F1 > MIN_PROBE_F1), absorption_split_latents (mean main latents per
  letter), absorption_letters (letters evaluated) and 'per_letter' {letter:
  (rate, fraction, main latents, true positives)}.
  """
  ranking_weights = linear_probe.fit_l1_logistic(
      train_f, train_letters, len(LETTERS), l1=L1_COEFF
  )
  per_letter = {}
  for c, letter in enumerate(LETTERS):
    if probes[c] is None or f1s[c] <= MIN_PROBE_F1:
      continue
    ranking = np.argsort(-ranking_weights[c], kind='stable')
    main, f1_first = main_latents(
        ranking, train_f, train_letters == c, test_f, test_letters == c
    )
    tp = (test_letters == c) & (probes[c].score(test_x) > 0)
    full, fraction = word_absorption(
        test_x[tp], test_f[tp], probes[c].weight, w_dec, main
    )
    per_letter[letter] = {
        'rate': float(full.mean()) if tp.any() else 0.0,
        'fraction': float(fraction.mean()) if tp.any() else 0.0,
        'main_latents': main,
        'clear_main_latent': f1_first > MIN_PROBE_F1,
        'true_positives': int(tp.sum()),
    }
  enough = len(per_letter) >= min_letters

  def mean(key):
    if not enough:
      return float('nan')
    return float(np.mean([float(v[key]) for v in per_letter.values()]))

  return {
      'absorption_rate': mean('rate'),
      'absorption_fraction': mean('fraction'),
      'absorption_main_latent_fraction': mean('clear_main_latent'),
      'absorption_split_latents': (
          float(np.mean([len(v['main_latents']) for v in per_letter.values()]))
          if enough
          else float('nan')
      ),
      'absorption_letters': len(per_letter),
      'per_letter': per_letter,
  }


# ---------------------------------------------------------------------------
# On the LM.


def evaluate_absorption(
    saes: Sequence[Any],
    lm: Any,
    *,
    site: str,
    n_words: int = 1560,
    n_icl: int = N_ICL,
    batch_size: int = 16,
    min_letters: int = MIN_LETTERS,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
  """Absorption results for SAEs at one site (one LM pass for all of them).

  Args:
    saes: SAEs at `site`.
    lm: the language model.
    site: the hook site.
    n_words: words sampled (seeded) from the single-token alphabetic vocab.
    n_icl: in-context examples per prompt.
    batch_size: prompts per LM call.
    min_letters: letters with a good probe needed for a score (else NaN).
    seed: sampling seed.
    progress: print a progress line on stderr.

  Returns:
    One dict per SAE: the `absorption_scores` keys, plus
    absorption_probe_letters (letters whose probe passed) and
    absorption_probe_f1 (mean over all letters).
  """
  vocab_ids, vocab = alpha_vocab(lm)
  rng = np.random.default_rng(seed)
  pick = np.sort(rng.choice(len(vocab), size=min(n_words, len(vocab)), replace=False))
  pick = rng.permutation(pick)
  n_train = int(round(TRAIN_FRACTION * pick.size))
  letters = np.asarray([LETTERS.index(vocab[i][1].lower()) for i in pick])
  splits = (pick[:n_train], pick[n_train:])
  ids, masks = [], []
  for s, part in enumerate(splits):
    words = [vocab[i] for i in part]
    got_ids, got_mask = build_prompts(lm, vocab_ids[part], words, n_icl, seed + 1 + s)
    ids.append(got_ids)
    masks.append(got_mask)
  length = max(a.shape[1] for a in ids)
  ids = np.concatenate([np.pad(a, ((0, 0), (0, length - a.shape[1]))) for a in ids])
  mask = np.concatenate([np.pad(a, ((0, 0), (0, length - a.shape[1]))) for a in masks])
  raw, latents = probing.pooled_features(
      saes,
      lm,
      site,
      ids,
      mask,
      batch_size=batch_size,
      label=f'absorption {len(saes)} SAE(s) at {site}',
      progress=progress,
  )
  train = np.arange(pick.size) < n_train
  probes = letter_probes(raw[train], letters[train])
  f1s = probe_f1s(probes, raw[~train], letters[~train])
  n_good = int(np.sum(f1s > MIN_PROBE_F1))
  if n_good < min_letters:
    logs.info(
        f'absorption: only {n_good} letters have a probe with test F1 > '
        f'{MIN_PROBE_F1} at {site} (at least {min_letters} needed); the scores '
        'are NaN'
    )
  results = []
  for sae, f in zip(saes, latents, strict=True):
    scores = absorption_scores(
        probes,
        f1s,
        raw[~train],
        letters[~train],
        f[train],
        letters[train],
        f[~train],
        np.asarray(sae.params['W_dec'], np.float64),
        min_letters=min_letters,
    )
    scores['absorption_probe_f1'] = float(f1s.mean())
    results.append(scores)
  return results
