"""TFDS builder for the bundled text corpus (Shakespeare + KJV Bible).

Importing this package registers the `gsae_text_corpus` builder with
tensorflow-datasets; `gsae_jax.text` is the place to use it from.
"""

from gsae_jax.data.text_corpus.text_corpus import (
    CHUNK_CHARS,
    VALIDATION_EVERY,
    GsaeTextCorpus,
    chunk_text,
    corpus_documents,
    corpus_works,
    kjv_path,
    shakespeare_dir,
)

__all__ = [
    "CHUNK_CHARS",
    "GsaeTextCorpus",
    "VALIDATION_EVERY",
    "chunk_text",
    "corpus_documents",
    "corpus_works",
    "kjv_path",
    "shakespeare_dir",
]
