"""The tokenizer: rebuilt from a GGUF file's vocabulary, or read from tokenizer.json.

GGUF files written by llama.cpp's converter carry the tokenizer as metadata:
`tokenizer.ggml.tokens` (byte-level strings, GPT-2 style), `.merges` ("a b"
pairs, in priority order) and `.token_type` (3 = control token). We rebuild it
with HF `tokenizers` as SmolLM2's tokenizer.json defines it: BPE, the
pre-tokenizer Digits(individual_digits=True) then ByteLevel with the GPT-2
regex split and no prefix space, a ByteLevel decoder, and the control tokens
as special tokens (matched whole, never split). No BOS is added by default.
A Hugging Face checkpoint's tokenizer.json is read as it is
(`Tokenizer.from_tokenizers`, lm/hf.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# llama.cpp's token types (gguf.TokenType): 1 normal, 2 unknown, 3 control,
# 4 user-defined, 5 unused, 6 byte.
_CONTROL = 3
_USER_DEFINED = 4
_SUPPORTED_MODELS = ("gpt2",)


def field_value(reader: Any, key: str, default: Any = None) -> Any:
  """Returns a GGUF metadata value as a Python scalar, str or list.

  Args:
    reader: a `gguf.GGUFReader`.
    key: the metadata key, e.g. 'llama.block_count'.
    default: returned when the key is absent.

  Written against `ReaderField.parts`/`.data`, which every gguf release has,
  rather than `ReaderField.contents()`, which older ones lack.
  """
  import gguf  # pylint: disable=g-import-not-at-top

  field = reader.fields.get(key)
  if field is None:
    return default
  types = field.types
  string = gguf.GGUFValueType.STRING

  def decode(part: np.ndarray, value_type: Any) -> Any:
    if value_type == string:
      return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0]

  if types[0] == gguf.GGUFValueType.ARRAY:
    return [decode(field.parts[i], types[-1]) for i in field.data]
  return decode(field.parts[field.data[0]], types[0])


class Tokenizer:
  """Encodes text to int32 token ids and back.

  Attributes:
    vocab_size: number of token ids.
    bos_id: the beginning-of-sequence id from the file (None if absent).
    eos_id: the end-of-sequence id from the file (None if absent).
    special_ids: ids of control tokens.
    add_bos: whether the model's tokenizer config puts BOS before a text
      (False for GGUF files; `encode` adds it only when asked).
  """

  add_bos = False

  def __init__(
      self,
      tokens: Sequence[str],
      merges: Iterable[str],
      token_types: Sequence[int] | None = None,
      bos_id: int | None = None,
      eos_id: int | None = None,
  ):
    """Builds the tokenizer from GGUF-style vocabulary lists.

    Args:
      tokens: byte-level token strings; the index is the id.
      merges: BPE merges as "left right" strings, highest priority first.
      token_types: GGUF token types per id (3 = control); None = all normal.
      bos_id: beginning-of-sequence id.
      eos_id: end-of-sequence id.
    """
    tokens = list(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise ValueError(
          f"tokenizer vocabulary has duplicate entries ({len(tokens)} tokens, "
          f"{len(vocab)} distinct); the GGUF file's tokenizer.ggml.tokens is "
          "not a valid BPE vocabulary"
      )
    merge_pairs = []
    for merge in merges:
      left, sep, right = merge.partition(" ")
      if not sep:
        raise ValueError(f"malformed BPE merge {merge!r} (expected 'a b')")
      merge_pairs.append((left, right))
    token_types = list(token_types) if token_types is not None else []
    specials = [
        i for i, kind in enumerate(token_types) if kind in (_CONTROL, _USER_DEFINED)
    ]
    self.vocab_size = len(tokens)
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.special_ids = tuple(i for i in specials if token_types[i] == _CONTROL)

    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False)
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            # use_regex=True: the GPT-2 split (contractions, letters, numbers,
            # punctuation, whitespace runs) applies before the byte mapping.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            tokenizers.AddedToken(
                tokens[i], special=token_types[i] == _CONTROL, normalized=False
            )
            for i in specials
        ]
    )
    self._tok = tok

  @classmethod
  def from_tokenizers(
      cls,
      tok: tokenizers.Tokenizer,
      bos_id: int | None = None,
      eos_id: int | None = None,
      add_bos: bool = False,
  ) -> Tokenizer:
    """Wraps a ready `tokenizers.Tokenizer` (e.g. read from tokenizer.json).

    Args:
      tok: the tokenizer; its post-processor is bypassed (ids come from
        encode(add_special_tokens=False)) and BOS is added by `encode` only.
      bos_id: beginning-of-sequence id.
      eos_id: end-of-sequence id.
      add_bos: the model's rule (see the class docstring).
    """
    self = cls.__new__(cls)
    self._tok = tok
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, bool(add_bos)
    self.special_ids = tuple(
        sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
    )
    return self

  @classmethod
  def from_gguf(cls, reader: Any) -> Tokenizer:
    """Builds the tokenizer from an open `gguf.GGUFReader`."""
    model = field_value(reader, "tokenizer.ggml.model")
    if model not in _SUPPORTED_MODELS:
      raise ValueError(
          f"GGUF tokenizer model {model!r} is not supported (only byte-level "
          f"BPE: {_SUPPORTED_MODELS})"
      )
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    merges = field_value(reader, "tokenizer.ggml.merges")
    if tokens is None or merges is None:
      raise ValueError("GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    return cls(
        tokens,
        merges,
        field_value(reader, "tokenizer.ggml.token_type"),
        bos_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
    )

  def encode(self, text: str, bos: bool = False) -> np.ndarray:
    """Returns the token ids of `text` as an int32 array [n_tokens].

    Args:
      text: the string to encode. Control-token strings in it (e.g.
        '<|im_start|>') become their single ids.
      bos: prepend `bos_id`.
    """
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if bos:
      if self.bos_id is None:
        raise ValueError("bos=True but this tokenizer has no bos_id")
      ids = [self.bos_id, *ids]
    return np.asarray(ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str], bos: bool = False) -> list[np.ndarray]:
    """Encodes many strings (in parallel); returns one int32 array each."""
    if bos and self.bos_id is None:
      raise ValueError("bos=True but this tokenizer has no bos_id")
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    prefix = [self.bos_id] if bos else []
    return [np.asarray(prefix + e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
    """Returns the text of a 1-D sequence of ids (list or array)."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f"decode expects a 1-D sequence of ids, got shape {ids.shape}")
    return self._tok.decode(
        ids.astype(np.int64).tolist(), skip_special_tokens=skip_special_tokens
    )

  def id_to_token(self, token_id: int) -> str | None:
    """Returns the raw (byte-level) vocabulary string of one id."""
    return self._tok.id_to_token(int(token_id))

  def token_to_id(self, token: str) -> int | None:
    """Returns the id of a raw (byte-level) vocabulary string, or None."""
    return self._tok.token_to_id(token)
