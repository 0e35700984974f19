"""Sparse probing [Gurnee et al. 2023, as SAEBench defines it]: binary tasks
from the bundled corpus, probes on the k latents that separate the classes.

Tasks (labels that exist offline in the corpus; docs/design.md §2):

  shakespeare_vs_bible   a window of a Shakespeare work vs one of the KJV
  old_vs_new_testament   a KJV window from the Old vs the New Testament
  comedy_vs_tragedy      a window of a play the First Folio (1623) files under
                         Comedies vs one it files under Tragedies
  speaker_vs_verse       a speaker-heading line ('PROSPERO.') vs a spoken line

Each task has balanced classes; training examples come from the corpus's
'train' documents and test examples from its 'validation' documents (held
out by document), drawn with a seeded generator. An example is pooled over
its tokens: the mean of the activation (or of an SAE's latents) over
positions 1.. (position 0, the attention sink, excluded; so are other sink
positions, as in harvest). Per SAE and task, the k latents whose class means
differ most (|mean_pos - mean_neg| on the training split) are kept and an
L2 logistic regression on them (evaluate/linear_probe.py) is scored on the
test split, for k in K_VALUES; the same probe on all d_in raw activation
dimensions is the reference row.

The LM runs once per batch of examples; every SAE at the site encodes those
activations (`pooled_features`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax import logs
from gsae_jax.data import harvest
from gsae_jax.evaluate import linear_probe
from gsae_jax.evaluate import saes as saes_lib
from gsae_jax.sae import models

K_VALUES = (1, 2, 5, 20)
TASKS = (
    'shakespeare_vs_bible',
    'old_vs_new_testament',
    'comedy_vs_tragedy',
    'speaker_vs_verse',
)

# The First Folio (1623) catalogue: its Comedies and Tragedies sections, by the
# corpus's file names. Troilus and Cressida (printed between the Histories and
# the Tragedies, in no section of the catalogue) and Pericles (not in the
# Folio) are left out; the Histories are no class of this task.
FOLIO_COMEDIES = (
    'tempest',
    'two_gentlemen_of_verona',
    'merry_wives_of_windsor',
    'measure_for_measure',
    'comedy_of_errors',
    'much_ado_about_nothing',
    'loves_labours_lost',
    'midsummer_nights_dream',
    'merchant_of_venice',
    'as_you_like_it',
    'taming_of_the_shrew',
    'alls_well_that_ends_well',
    'twelfth_night',
    'winters_tale',
)
FOLIO_TRAGEDIES = (
    'coriolanus',
    'tragedy_of_titus_andronicus',
    'romeo_and_juliet',
    'timon_of_athens',
    'julius_caesar',
    'macbeth',
    'hamlet',
    'lear',
    'othello',
    'antony_and_cleopatra',
    'cymbeline',
)
FOLIO_HISTORIES = (
    'john',
    'richard_ii',
    'henry_iv_part_1',
    'henry_iv_part_2',
    'henry_v',
    'henry_vi_part_1',
    'henry_vi_part_2',
    'henry_vi_part_3',
    'richard_iii',
    'henry_viii',
)
_PLAYS = (
    FOLIO_COMEDIES
    + FOLIO_TRAGEDIES
    + FOLIO_HISTORIES
    + (
        'troilus_and_cressida',
        'pericles',
    )
)
# A speaker heading: a short capitalised name ending in '.', alone on its line.
_HEADING = re.compile(r"[A-Z][A-Za-z' -]{0,29}\.")
_ACT = re.compile(r'(ACT|SCENE) ')  # 'ACT I.' is a heading of another kind


@dataclasses.dataclass
class Task:
  """One binary task: token ids [n, example_len], mask [n, example_len] (1 on
  pooled positions), labels [n] and which rows are the training split."""

  name: str
  ids: np.ndarray
  mask: np.ndarray
  labels: np.ndarray
  train: np.ndarray  # [n] bool


# ---------------------------------------------------------------------------
# Task data from the bundled corpus.


def _play(source: str) -> str | None:
  kind, _, name = source.partition('/')
  return name if kind == 'shakespeare' and name in _PLAYS else None


def _class_of(task: str, source: str, new_testament: set[str]) -> int | None:
  """1, 0 or None (not in the task) for a document of the window tasks."""
  kind = source.split('/')[0]
  if task == 'shakespeare_vs_bible':
    return int(kind == 'shakespeare')
  if task == 'old_vs_new_testament':
    return None if kind != 'kjv' else int(source in new_testament)
  play = _play(source)
  if task == 'comedy_vs_tragedy' and play is not None:
    if play in FOLIO_COMEDIES:
      return 1
    if play in FOLIO_TRAGEDIES:
      return 0
  return None


def speech_lines(text: str) -> tuple[list[str], list[str]]:
  """(speaker-heading lines, spoken lines) of a play's text.

  A heading is a short capitalised name ending in '.' (not 'ACT I.'), alone
  on a line that follows a blank line and precedes a non-blank one; a spoken
  line is any other line of at least four words inside a speech (after a
  non-blank line, not a '[stage direction]').
  """
  lines = text.split('\n')
  headings, spoken = [], []
  for i, raw in enumerate(lines):
    line = raw.strip()
    before = lines[i - 1].strip() if i else ''
    after = lines[i + 1].strip() if i + 1 < len(lines) else ''
    if not line:
      continue
    if _HEADING.fullmatch(line) and not before and after and not _ACT.match(line):
      headings.append(line)
    elif before and not line.startswith('[') and len(line.split()) >= 4:
      spoken.append(line)
  return headings, spoken


def _windows(rng, encode, texts: list[str], n: int, length: int) -> list[np.ndarray]:
  """n token windows of `length` from random texts (with replacement if few)."""
  cache: dict[int, np.ndarray] = {}
  out = []
  while len(out) < n:
    i = int(rng.integers(len(texts)))
    if i not in cache:
      cache[i] = encode(texts[i])
    ids = cache[i]
    if ids.size < length:
      continue
    start = int(rng.integers(ids.size - length + 1))
    out.append(ids[start : start + length])
  return out


def _lines(rng, encode, lines: list[str], n: int, length: int, newline: np.ndarray):
  """n lines, each '\\n' + line as tokens, cut or padded (pad 0) to length."""
  picks = rng.choice(len(lines), size=n, replace=len(lines) < n)
  out, masks = [], []
  for i in picks:
    ids = np.concatenate([newline, encode(lines[int(i)])])[:length]
    mask = np.zeros(length, np.float32)
    mask[1 : ids.size] = 1.0
    out.append(np.pad(ids, (0, length - ids.size)))
    masks.append(mask)
  return out, masks


def build_tasks(
    tokenizer: Any,
    *,
    tasks: Sequence[str] = TASKS,
    n_train: int = 160,
    n_test: int = 80,
    example_len: int = 32,
    seed: int = 0,
) -> list[Task]:
  """The probing tasks' examples, balanced, train/test held out by document.

  Args:
    tokenizer: anything with .encode(text) -> ids (the LM).
    tasks: names from TASKS.
    n_train: training examples per class.
    n_test: test examples per class.
    example_len: tokens per example (windows; lines are cut or padded).
    seed: the sampling seed.
  """
  from gsae_jax.data.text_corpus import text_corpus  # noqa: PLC0415 (tfds import)

  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    raise ValueError(f'unknown probing task(s) {unknown}; valid: {", ".join(TASKS)}')
  if example_len < 2:
    raise ValueError(
        f'example_len must be >= 2 (position 0 is excluded), got {example_len}'
    )
  documents = text_corpus.corpus_documents()
  books = list(dict.fromkeys(s for _, s, _ in documents if s.startswith('kjv/')))
  new_testament = set(books[books.index('kjv/Matthew') :])
  encode = tokenizer.encode
  newline = np.asarray(encode('\n'), np.int32)
  out = []
  for t, name in enumerate(tasks):
    rng = np.random.default_rng([seed, t])
    ids, masks, labels, train = [], [], [], []
    for split, n in (('train', n_train), ('validation', n_test)):
      for label in (1, 0):
        if name == 'speaker_vs_verse':
          pool = []
          for doc_split, source, text in documents:
            if doc_split == split and _play(source):
              pool += speech_lines(text)[0 if label else 1]
          got, got_masks = _lines(rng, encode, pool, n, example_len, newline)
        else:
          pool = [
              text
              for doc_split, source, text in documents
              if doc_split == split and _class_of(name, source, new_testament) == label
          ]
          got = _windows(rng, encode, pool, n, example_len)
          mask = np.ones(example_len, np.float32)
          mask[0] = 0.0
          got_masks = [mask] * n
        ids += got
        masks += got_masks
        labels += [label] * n
        train += [split == 'train'] * n
    out.append(
        Task(
            name,
            np.stack(ids).astype(np.int32),
            np.stack(masks),
            np.asarray(labels, np.int8),
            np.asarray(train, bool),
        )
    )
  return out


# ---------------------------------------------------------------------------
# Pooled activations and latents: one LM pass for every SAE at a site.


@functools.cache
def _pooled_fn(spec: models.SAESpec):
  """(params, acts [b, t, d_in], weights [b, t]) -> sum_t weights * latents."""

  def pooled(params, acts, weights):
    f = models.encode(spec, params, acts)  # [b, t, d_sae]
    return jnp.einsum('bt,btf->bf', weights, f)

  return jax.jit(pooled)


def pooled_features(
    saes: Sequence[Any],
    lm: Any,
    site: str,
    ids: np.ndarray,
    mask: np.ndarray,
    *,
    batch_size: int,
    outlier_norm_factor: float = 0.0,
    label: str = 'features',
    progress: bool = True,
) -> tuple[np.ndarray, list[np.ndarray]]:
  """Masked means over positions of the activations and of every SAE's latents.

  Args:
    saes: SAEs at `site` (raw-activation params).
    lm: the language model.
    site: the hook site.
    ids: token ids [n, t].
    mask: [n, t] 1 where a position is pooled (a single 1 reads one position).
    batch_size: examples per LM call.
    outlier_norm_factor: also leave out pooled positions whose activation norm
      exceeds this x the batch median (the extra attention sinks); 0 keeps all.
    label: the progress line's label.
    progress: print a progress line on stderr.

  Returns:
    raw [n, d_in] float64 and, per SAE, latents [n, d_sae] float64. An
    example left with no pooled position is all zeros.
  """
  n, length = ids.shape
  specs = [saes_lib.spec_of(s) for s in saes]
  params = [saes_lib.device_params(s) for s in saes]
  raw = np.zeros((n, lm.d_model), np.float64)
  latents = [np.zeros((n, sp.d_sae), np.float64) for sp in specs]
  bar = logs.Progress(label, n * length, first_compiles=True, enabled=progress)
  for start in range(0, n, batch_size):
    rows = slice(start, min(start + batch_size, n))
    b_ids, b_mask = ids[rows], np.asarray(mask[rows], np.float32)
    real = b_ids.shape[0]
    if real < batch_size:  # one compiled shape; padding rows have no weight
      b_ids = np.concatenate([b_ids, np.repeat(b_ids[-1:], batch_size - real, 0)])
      b_mask = np.concatenate(
          [b_mask, np.zeros((batch_size - real, length), np.float32)]
      )
    acts = lm.activations(b_ids, site)  # [batch, t, d_in]
    host = np.asarray(acts)
    on = b_mask > 0
    keep = on.copy()
    keep[on] = harvest.inliers(host[on], outlier_norm_factor)
    counts = keep.sum(axis=1, keepdims=True)
    weights = np.where(keep, 1.0 / np.maximum(counts, 1), 0.0).astype(np.float32)
    raw[rows] = np.einsum('bt,btd->bd', weights, host.astype(np.float64))[:real]
    w = jnp.asarray(weights)
    for spec, p, out in zip(specs, params, latents, strict=True):
      out[rows] = np.asarray(_pooled_fn(spec)(p, acts, w), np.float64)[:real]
    bar.update(rows.stop * length)
  return raw, latents


# ---------------------------------------------------------------------------
# The probes.


def top_k_by_mean_difference(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k columns of x [n, d] whose class means differ most."""
  y = np.asarray(y, bool)
  diff = np.abs(x[y].mean(axis=0) - x[~y].mean(axis=0))
  return np.argsort(-diff, kind='stable')[:k]


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
  """Test accuracy of an L2 logistic regression fitted on the training split."""
  probe = linear_probe.fit_logistic(train_x, train_y)
  return linear_probe.accuracy(probe, test_x, test_y)


def sparse_probe_accuracies(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    ks: Sequence[int] = K_VALUES,
) -> dict[int, float]:
  """{k: test accuracy of the probe on the top-k mean-difference columns}."""
  out = {}
  for k in ks:
    cols = top_k_by_mean_difference(train_x, train_y, k)
    out[k] = probe_accuracy(train_x[:, cols], train_y, test_x[:, cols], test_y)
  return out


def evaluate_probing(
    saes: Sequence[Any],
    lm: Any,
    *,
    site: str,
    tasks: Sequence[str] = TASKS,
    n_train: int = 160,
    n_test: int = 80,
    example_len: int = 32,
    ks: Sequence[int] = K_VALUES,
    batch_size: int = 16,
    outlier_norm_factor: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
  """Sparse-probing results for SAEs at one site, one dict per SAE.

  Keys: probing_acc_k<k> and probing_acc_raw (means over tasks), and per task
  probing_<task>_k<k> and probing_<task>_raw. The raw reference is the same
  for every SAE of the site. Sizes: see `build_tasks`.
  """
  data = build_tasks(
      lm,
      tasks=tasks,
      n_train=n_train,
      n_test=n_test,
      example_len=example_len,
      seed=seed,
  )
  ids = np.concatenate([t.ids for t in data])
  mask = np.concatenate([t.mask for t in data])
  raw, latents = pooled_features(
      saes,
      lm,
      site,
      ids,
      mask,
      batch_size=batch_size,
      outlier_norm_factor=outlier_norm_factor,
      label=f'probing {len(saes)} SAE(s) at {site}',
      progress=progress,
  )
  results: list[dict[str, float]] = [{} for _ in saes]
  start = 0
  for task in data:
    rows = slice(start, start + task.labels.size)
    start = rows.stop
    y, train = task.labels, task.train
    raw_acc = probe_accuracy(raw[rows][train], y[train], raw[rows][~train], y[~train])
    for result, f in zip(results, latents, strict=True):
      x = f[rows]
      accs = sparse_probe_accuracies(x[train], y[train], x[~train], y[~train], ks)
      result[f'probing_{task.name}_raw'] = raw_acc
      for k, acc in accs.items():
        result[f'probing_{task.name}_k{k}'] = acc
  for result in results:
    for suffix in ['raw'] + [f'k{k}' for k in ks]:
      result[f'probing_acc_{suffix}'] = float(
          np.mean([result[f'probing_{t.name}_{suffix}'] for t in data])
      )
  return results
