"""Tokenizers: a Hugging Face `tokenizer.json` through `tokenizers`, or bytes.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, and the special ids
they know; the engine works on token ids and only uses these at the edges.
"""

from __future__ import annotations

import json
import os
import re
from typing import Protocol, Sequence


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: id = byte + 3, with 0 = pad, 1 = bos, 2 = eos (ByT5's layout).

  Decoding skips the special ids and replaces invalid UTF-8 (a partial multi-byte character at the
  end of a stream, say) with U+FFFD.
  """

  PAD, BOS, EOS = 0, 1, 2
  OFFSET = 3
  vocab_size = 256 + OFFSET

  def __init__(self):
    self.bos_id, self.eos_id, self.pad_id = self.BOS, self.EOS, self.PAD

  def encode(self, text: str) -> list[int]:
    return [b + self.OFFSET for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.vocab_size)
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizer.json` loaded with the `tokenizers` library (no `transformers` needed)."""

  def __init__(self, path: str, bos_id: int | None = None, eos_id: int | None = None,
               add_bos: bool | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception type for malformed files
      raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id = bos_id, eos_id
    # tokenizer.json's post-processor may already add BOS; add it ourselves only when asked to.
    self._add_bos = bool(add_bos) and bos_id is not None

  def encode(self, text: str) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=True).ids
    if self._add_bos and (not ids or ids[0] != self.bos_id):
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(model_dir: str | None, bos_id: int | None = None,
                   eos_id: int | None = None) -> Tokenizer:
  """`tokenizer.json` in `model_dir` when present, else the byte tokenizer."""
  path = os.path.join(model_dir, "tokenizer.json") if model_dir else None
  if path and os.path.exists(path):
    add_bos = None
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(config_path):
      try:
        with open(config_path) as f:
          add_bos = json.load(f).get("add_bos_token")
      except (json.JSONDecodeError, UnicodeDecodeError):
        add_bos = None
    return HFTokenizer(path, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos)
  return ByteTokenizer()


def unicode_problem(text: str) -> str | None:
  """Why `text` cannot be encoded as UTF-8 (a lone surrogate, as JSON's "\\ud800" escape
  gives), as the end of a sentence; None if it can."""
  found = _SURROGATE.search(text)
  if found is None:
    return None
  return (f"holds a lone surrogate U+{ord(found.group()):04X} at character {found.start()}: "
          "text must be valid Unicode")


_SURROGATE = re.compile("[\ud800-\udfff]")
