"""Per-latent HTML report: top-activating text snippets for a sample of latents.

For an LM evaluation result (`gsae_jax.evaluate.evaluate`), which keeps each
latent's top activations ('top_values', 'top_tokens') and the token ids of the
evaluated contexts ('contexts'), this writes one self-contained HTML page: for
a seeded random sample of live latents, its firing frequency and its top
snippets, each a window of the context around the max-activating token, that
token highlighted with its activation.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from gsae_jax import files

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
.latent { border-top: 1px solid #ccc; padding: 0.5em 0; }
.snippet { font-family: monospace; white-space: pre-wrap; margin: 0.2em 0; }
.snippet mark { background: #ffb347; font-weight: bold; }
.act { color: #666; display: inline-block; width: 6em; }
.meta { color: #444; font-size: 90%; }
"""


def _token_text(tokenizer: Any, token: int, cache: dict[int, str]) -> str:
  if token not in cache:
    text = tokenizer.decode(np.asarray([token], np.int32))
    cache[token] = text.replace('\n', '\u21b5').replace('\t', '\u2192')
  return cache[token]


def snippet_html(
    tokenizer: Any,
    context: np.ndarray,
    position: int,
    before: int = 16,
    after: int = 4,
    cache: dict[int, str] | None = None,
) -> str:
  """HTML of context[position - before : position + after + 1], the token at
  `position` in <mark>."""
  cache = {} if cache is None else cache
  lo, hi = max(0, position - before), min(len(context), position + after + 1)
  parts = []
  for p in range(lo, hi):
    text = html.escape(_token_text(tokenizer, int(context[p]), cache))
    parts.append(f'<mark>{text}</mark>' if p == position else text)
  prefix = '\u2026' if lo > 0 else ''
  suffix = '\u2026' if hi < len(context) else ''
  return prefix + ''.join(parts) + suffix


def sample_latents(result: dict, n_latents: int, seed: int = 0) -> np.ndarray:
  """A seeded random sample of live latents (fired at least once), sorted."""
  alive = np.flatnonzero(np.asarray(result['firing_frequency']) > 0)
  if alive.size <= n_latents:
    return alive
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(alive, size=n_latents, replace=False))


def report_html(
    result: dict,
    tokenizer: Any,
    *,
    n_latents: int = 24,
    n_examples: int = 8,
    seed: int = 0,
) -> str:
  """The report page for one SAE's result.

  Args:
    result: an `evaluate` result with top_values, top_tokens, contexts.
    tokenizer: anything with .decode(ids) -> str (the LM).
    n_latents: latents to show (a seeded sample of the live ones).
    n_examples: snippets per latent (at most the evaluation's top_k).
    seed: the sampling seed.
  """
  for key in ('top_values', 'top_tokens', 'contexts', 'firing_frequency'):
    if key not in result:
      raise ValueError(
          f'result of SAE index {result.get("index")} has no {key!r}: the report '
          'needs an LM evaluation with top_k > 0'
      )
  contexts = np.asarray(result['contexts'])
  context_len = contexts.shape[1]
  freq = np.asarray(result['firing_frequency'])
  cache: dict[int, str] = {}
  title = (
      f'SAE #{result["index"]}: {result["architecture"]}, d_sae {result["d_sae"]}, '
      f'{result.get("sparsity")}, {result.get("site")}'
  )
  summary = ', '.join(
      f'{k} {result[k]:.4g}'
      for k in ('l0', 'fvu', 'shrinkage_gamma', 'loss_recovered', 'dead_fraction')
      if isinstance(result.get(k), float)
  )
  body = [
      f'<h1>{html.escape(title)}</h1>',
      f'<p class="meta">{html.escape(summary)}; {result.get("num_tokens")} tokens '
      f'of the {html.escape(str(result.get("split")))} split. Each snippet ends '
      'a few tokens after the highlighted max-activating token.</p>',
  ]
  latents = sample_latents(result, n_latents, seed)
  if not latents.size:
    body.append('<p>No latent fired on the evaluation set.</p>')
  for latent in latents:
    values = result['top_values'][latent][:n_examples]
    tokens = result['top_tokens'][latent][:n_examples]
    body.append(
        f'<div class="latent"><h3>latent {latent}</h3><p class="meta">firing '
        f'frequency {freq[latent]:.3g} (log10 {np.log10(freq[latent]):.2f}), '
        f'max activation {values[0]:.3g}</p>'
    )
    for value, token in zip(values, tokens, strict=True):
      if token < 0:
        continue
      ctx, pos = divmod(int(token), context_len)
      body.append(
          f'<div class="snippet"><span class="act">{value:.3g}</span>'
          f'{snippet_html(tokenizer, contexts[ctx], pos, cache=cache)}</div>'
      )
    body.append('</div>')
  return (
      '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
      f'<title>{html.escape(title)}</title><style>{_STYLE}</style></head>'
      f'<body>\n' + '\n'.join(body) + '\n</body></html>\n'
  )


def write_report(result: dict, tokenizer: Any, path: str, **kwargs) -> str:
  """Writes `report_html(result, tokenizer, **kwargs)` to path; returns it."""
  files.atomic_write_text(path, report_html(result, tokenizer, **kwargs))
  return path
