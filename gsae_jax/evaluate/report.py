"""Per-latent HTML report: top-activating text snippets and the logit lens.

For an LM evaluation result (`gsae_jax.evaluate.evaluate`), which keeps each
latent's top activations ('top_values', 'top_tokens') and the token ids of the
evaluated contexts ('contexts'), this writes one self-contained HTML page per
SAE: for a seeded random sample of live latents, its firing frequency, its
logit lens (the decoder direction through the LM's final norm and
unembedding: the tokens it promotes and suppresses most) and its top
snippets, each a window of the context around the max-activating token, that
token highlighted with its activation. An index page lists each SAE's
reported latents by firing frequency, linked to their entries.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
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
.lens { font-family: monospace; font-size: 90%; margin: 0.2em 0; }
.up { color: #1a7f37; } .down { color: #b42318; }
table { border-collapse: collapse; } td, th { padding: 0.1em 0.6em; text-align: left; }
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


def logit_lens(
    lm: Any, directions: np.ndarray, n_tokens: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The tokens each direction promotes and suppresses most.

  Args:
    lm: the LM (`.unembed`: final norm, then unembedding).
    directions: decoder rows [n, d_model].
    n_tokens: tokens per side.

  Returns:
    top_ids, top_logits, bottom_ids, bottom_logits, each [n, n_tokens]
    (top: largest logit first; bottom: smallest first).
  """
  logits = np.asarray(lm.unembed(np.asarray(directions, np.float32)))  # [n, vocab]
  order = np.argsort(-logits, axis=1, kind='stable')
  top, bottom = order[:, :n_tokens], order[:, ::-1][:, :n_tokens]
  return (
      top,
      np.take_along_axis(logits, top, axis=1),
      bottom,
      np.take_along_axis(logits, bottom, axis=1),
  )


def _lens_html(tokenizer, ids, values, css: str, cache: dict[int, str]) -> str:
  cells = [
      f'{html.escape(repr(_token_text(tokenizer, int(t), cache)))} {v:+.2f}'
      for t, v in zip(ids, values, strict=True)
  ]
  return f'<span class="{css}">' + ', '.join(cells) + '</span>'


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
    lens: dict[int, tuple] | None = None,
) -> str:
  """The report page for one SAE's result.

  Args:
    result: an `evaluate` result with top_values, top_tokens, contexts.
    tokenizer: anything with .decode(ids) -> str (the LM).
    n_latents: latents to show (a seeded sample of the live ones).
    n_examples: snippets per latent (at most the evaluation's top_k).
    seed: the sampling seed.
    lens: {latent: (top_ids, top_logits, bottom_ids, bottom_logits)} from
      `logit_lens`, shown for the latents it has.
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
        f'<div class="latent" id="latent-{latent}"><h3>latent {latent}</h3>'
        f'<p class="meta">firing frequency {freq[latent]:.3g} (log10 '
        f'{np.log10(freq[latent]):.2f}), max activation {values[0]:.3g}</p>'
    )
    if lens is not None and int(latent) in lens:
      top_ids, top_v, bottom_ids, bottom_v = lens[int(latent)]
      body.append(
          '<div class="lens">promotes: '
          f'{_lens_html(tokenizer, top_ids, top_v, "up", cache)}</div>'
          '<div class="lens">suppresses: '
          f'{_lens_html(tokenizer, bottom_ids, bottom_v, "down", cache)}</div>'
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


def index_html(entries: Sequence[tuple[dict, np.ndarray, dict]], tokenizer: Any) -> str:
  """The index page: per SAE, its reported latents by firing frequency.

  entries: (result, reported latents, lens) per SAE; each latent links to
  sae_<index>.html#latent-<latent>, with its top promoted tokens.
  """
  cache: dict[int, str] = {}
  body = ['<h1>Latent reports</h1>']
  for result, latents, lens in entries:
    page = f'sae_{result["index"]}.html'
    freq = np.asarray(result['firing_frequency'])
    body.append(
        f'<h2><a href="{page}">SAE #{result["index"]}</a>: '
        f'{html.escape(str(result["architecture"]))} {result.get("sparsity", "")}'
        f', L0 {result.get("l0", float("nan")):.1f}</h2>'
        '<table><tr><th>latent</th><th>firing frequency</th><th>promotes</th></tr>'
    )
    for latent in sorted(latents, key=lambda i: (-freq[i], i)):
      promoted = ''
      if int(latent) in lens:
        top_ids, top_v = lens[int(latent)][:2]
        promoted = _lens_html(tokenizer, top_ids[:5], top_v[:5], 'up', cache)
      body.append(
          f'<tr><td><a href="{page}#latent-{latent}">{latent}</a></td>'
          f'<td>{freq[latent]:.3g}</td><td>{promoted}</td></tr>'
      )
    body.append('</table>')
  return (
      '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Latent reports'
      f'</title><style>{_STYLE}</style></head><body>\n'
      + '\n'.join(body)
      + '\n</body></html>\n'
  )


def write_reports(
    pairs: Sequence[tuple[dict, Any]],
    lm: Any,
    out_dir: str,
    *,
    n_latents: int = 24,
    seed: int = 0,
    **kwargs,
) -> list[str]:
  """Writes sae_<index>.html per (result, SAE) pair, with the logit lens of
  the reported latents' decoder rows, and index.html; returns the paths."""
  paths, entries = [], []
  for result, sae in pairs:
    latents = sample_latents(result, n_latents, seed)
    w_dec = np.asarray(sae.params['W_dec'])[latents]
    lens = {}
    if latents.size:
      parts = logit_lens(lm, w_dec)
      lens = {int(i): tuple(p[j] for p in parts) for j, i in enumerate(latents)}
    path = os.path.join(out_dir, f'sae_{result["index"]}.html')
    paths.append(
        write_report(
            result, lm, path, n_latents=n_latents, seed=seed, lens=lens, **kwargs
        )
    )
    entries.append((result, latents, lens))
  index = os.path.join(out_dir, 'index.html')
  files.atomic_write_text(index, index_html(entries, lm))
  return paths + [index]
