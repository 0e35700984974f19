"""Text for harvesting: TFDS documents (no TensorFlow) packed into LM contexts.

The bundled corpus (Shakespeare + KJV Bible, see `gsae_jax.text_corpus`) is a
tensorflow-datasets builder that writes array_record files; everything is read
with `builder.as_data_source` (random access, pure NumPy). `tfds.load` and
`as_dataset` would need TensorFlow, and the parquet format was seen to drop
rows, so neither is used.

Typical use:

  model = gsae_jax.lm.load()
  docs = text.iter_documents(split="train", shuffle_seed=0)   # or "validation"
  contexts = text.pack_documents(docs, model, context_len=128)
  # contexts: [n, 128] int32

BOS: the bundled LM's tokenizer adds no BOS (docs/design.md §3), and packing adds none
by default: a context is a plain window of the token stream. Pass `bos_id` to
start every context with that token instead. Either way position 0 of a
context is an attention sink (residual norm ~100x the median): harvesting
drops it, and loss-recovered leaves it unspliced.
"""

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

DEFAULT_DATASET = "gsae_text_corpus"


def default_data_dir() -> str:
  """Where TFDS datasets live: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get(
      "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  )


def get_builder(
    name: str = DEFAULT_DATASET,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    prepare: bool | None = None,
) -> Any:
  """Returns a prepared TFDS builder for `name` (array_record files).

  Args:
    name: a TFDS name ('gsae_text_corpus', 'wikipedia/20230601.en', ...).
    data_dir: TFDS data directory; default `default_data_dir()`.
    prepare: build the dataset when it is not prepared yet. Default: True for
      the bundled corpus (it needs no network, takes ~1 s), False for others
      (those are prepared with
      `builder.download_and_prepare(file_format='array_record')`).

  Raises:
    FileNotFoundError: the dataset is not prepared and prepare is False.
    ValueError: the prepared files are not array_record.
  """
  import tensorflow_datasets as tfds

  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  if name.split("/")[0].split(":")[0] == DEFAULT_DATASET:
    # Importing the module registers the builder with TFDS.
    from gsae_jax.data import text_corpus

    builder = text_corpus.GsaeTextCorpus(data_dir=data_dir)
    prepare = True if prepare is None else prepare
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
      raise FileNotFoundError(
          f"TFDS dataset {name!r} was not found: no builder of that name is "
          f"registered and {data_dir} holds no prepared copy of it"
      ) from None
  if not builder.is_prepared():
    if not prepare:
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {data_dir}; prepare it with "
          "tfds.builder(name, data_dir=...).download_and_prepare("
          "file_format='array_record') or pass prepare=True"
      )
    builder.download_and_prepare(file_format="array_record")
  file_format = builder.info.file_format
  file_format = getattr(file_format, "value", file_format)  # enum or str
  if file_format is not None and file_format != "array_record":
    raise ValueError(
        f"TFDS dataset {name!r} in {data_dir} is stored as {file_format}, which "
        "needs TensorFlow to read; re-prepare it with file_format='array_record'"
    )
  return builder


def load_documents(
    name: str = DEFAULT_DATASET,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    text_key: str = "text",
    prepare: bool | None = None,
) -> "DocumentSource":
  """Random-access view of the text documents of one split.

  Args:
    name: TFDS dataset name (default: the bundled corpus).
    split: split name, TFDS slicing allowed ('train', 'validation[:50%]').
    data_dir: TFDS data directory; default `default_data_dir()`.
    text_key: the feature holding the text; '/' walks nested features.
    prepare: see `get_builder`.

  Returns:
    A sequence of str (len, integer indexing).
  """
  builder = get_builder(name, data_dir, prepare=prepare)
  return DocumentSource(builder.as_data_source(split=split), text_key)


class DocumentSource(Sequence[str]):
  """A TFDS data source seen as a sequence of document strings."""

  def __init__(self, source: Any, text_key: str = "text"):
    self._source = source
    self._path = text_key.split("/")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):  # type: ignore[override]
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    example = self._source[index]
    for key in self._path:
      if key not in example:
        raise KeyError(
            f"text_key {'/'.join(self._path)!r} not in example; features are "
            f"{sorted(example)}"
        )
      example = example[key]
    if isinstance(example, np.ndarray) and example.shape == ():
      example = example.item()
    return example.decode("utf-8") if isinstance(example, bytes) else str(example)


def iter_documents(
    name: str = DEFAULT_DATASET,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    text_key: str = "text",
    shuffle_seed: int | None = None,
    prepare: bool | None = None,
) -> Iterator[str]:
  """Yields the documents of a split once, as str.

  Args:
    name: TFDS dataset name (default: the bundled corpus).
    split: split name, TFDS slicing allowed.
    data_dir: TFDS data directory; default `default_data_dir()`.
    text_key: the feature holding the text; '/' walks nested features.
    shuffle_seed: None keeps the stored order (corpus order for the bundled
      corpus: all Shakespeare, then the Bible); an int gives a seeded
      permutation of documents, the same on every run and machine.
    prepare: see `get_builder`.
  """
  documents = load_documents(name, split, data_dir, text_key=text_key, prepare=prepare)
  order = np.arange(len(documents))
  if shuffle_seed is not None:
    order = np.random.default_rng(shuffle_seed).permutation(len(documents))
  for index in order:
    yield documents[int(index)]


TokenizerLike = Callable[[str], Any] | Any
"""text -> token ids: a callable, or an object with .encode(text) (the LM from
`gsae_jax.lm.load()`, a `gsae_jax.tokenizer.Tokenizer`, a `tokenizers`
Tokenizer whose Encoding has .ids)."""


def encoder(tokenizer: TokenizerLike) -> Callable[[str], np.ndarray]:
  """text -> int32 [n_tokens] from a callable or an object with .encode."""
  encode = getattr(tokenizer, "encode", None)
  if encode is None:
    if not callable(tokenizer):
      raise TypeError(
          f"tokenizer must be callable or have .encode(text), got {type(tokenizer)}"
      )
    encode = tokenizer

  def encode_ids(text: str) -> np.ndarray:
    ids = encode(text)
    ids = np.asarray(getattr(ids, "ids", ids))  # tokenizers.Encoding has .ids
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(
          f"the tokenizer must return 1-D integer token ids, got {ids.dtype} "
          f"{ids.shape} for {text[:40]!r}"
      )
    return ids.astype(np.int32, copy=False)

  return encode_ids


def iter_contexts(
    documents: Iterable[str],
    tokenizer: TokenizerLike,
    context_len: int,
    *,
    bos_id: int | None = None,
    separator_id: int | None = None,
) -> Iterator[np.ndarray]:
  """Tokenises documents into one stream and yields it in fixed-length contexts.

  Documents are concatenated in order; with separator_id set, that token
  follows every document. Contexts cut across document boundaries; the final
  partial context is dropped. Deterministic given the documents.

  BOS: with bos_id None (default; docs/design.md §3: no BOS by default) a context is
  context_len consecutive stream tokens. With bos_id set, a context is bos_id
  followed by the next context_len - 1 stream tokens. Position 0 is an
  attention sink in both cases; harvesting drops it.

  Args:
    documents: the texts.
    tokenizer: text -> 1-D integer token ids: a callable or an object with
      .encode (e.g. `gsae_jax.lm.load()`; see `TokenizerLike`).
    context_len: tokens per context, BOS included.
    bos_id: token put at position 0 of every context, or None.
    separator_id: token appended after each document (e.g. an EOS id), or None.

  Yields:
    int32 arrays [context_len].
  """
  body_len = context_len - (bos_id is not None)  # stream tokens per context
  if body_len < 1:
    raise ValueError(
        f"context_len must be >= {1 + (bos_id is not None)}, got {context_len}"
    )
  encode = encoder(tokenizer)
  bos = None if bos_id is None else np.array([bos_id], dtype=np.int32)
  separator = None if separator_id is None else np.array([separator_id], dtype=np.int32)
  pending: list[np.ndarray] = []
  pending_len = 0
  for text in documents:
    ids = encode(text)
    pending.append(ids)
    pending_len += ids.size
    if separator is not None:
      pending.append(separator)
      pending_len += 1
    if pending_len < body_len:
      continue
    stream = np.concatenate(pending)  # [pending_len]
    n_full = pending_len // body_len
    for i in range(n_full):
      body = stream[i * body_len : (i + 1) * body_len]
      yield body if bos is None else np.concatenate([bos, body])
    rest = stream[n_full * body_len :]
    pending, pending_len = [rest], rest.size


def pack_documents(
    documents: Iterable[str],
    tokenizer: TokenizerLike,
    context_len: int,
    *,
    bos_id: int | None = None,
    separator_id: int | None = None,
    max_contexts: int | None = None,
) -> np.ndarray:
  """Packs documents into fixed-length contexts (see `iter_contexts`).

  Args:
    documents: the texts.
    tokenizer: a callable text -> token ids, or an object with .encode.
    context_len: tokens per context, BOS included.
    bos_id: token put at position 0 of every context, or None (default).
    separator_id: token appended after each document, or None.
    max_contexts: stop after this many contexts (None: use every document).

  Returns:
    int32 array [n_contexts, context_len].
  """
  contexts = []
  if max_contexts is None or max_contexts > 0:
    for context in iter_contexts(
        documents, tokenizer, context_len, bos_id=bos_id, separator_id=separator_id
    ):
      contexts.append(context)
      if max_contexts is not None and len(contexts) >= max_contexts:
        break
  if not contexts:
    return np.zeros((0, context_len), dtype=np.int32)
  return np.stack(contexts).astype(np.int32, copy=False)
