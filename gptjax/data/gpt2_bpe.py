"""GPT-2's byte-level BPE, read from an existing `vocab.json` + `merges.txt`, in plain Python.

The algorithm of Radford et al. (2019) and OpenAI's `encoder.py`: text is split by GPT-2's regex
into words, each word's UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`), and
the ranked merges are applied greedily, lowest rank first. Every byte is in the base vocabulary, so
any text round-trips. `<|endoftext|>` ends documents; text is always encoded literally, so a
document that contains that string cannot inject a fake end of document.

The pre-tokenizer's `\\p{L}` (letters) and `\\p{N}` (numbers) classes are built from `unicodedata`,
so the standard `re` module suffices (no `regex` dependency).
"""

from collections.abc import Iterable, Sequence
import functools
import hashlib
import json
import os
import re
import sys
import unicodedata

import numpy as np

from gptjax.data import files
from gptjax.data.errors import fail

EOS_TOKEN = "<|endoftext|>"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def _char_class(prefix: str) -> str:
  """A regex character-class body covering every code point whose category starts with `prefix`."""
  ranges, start, prev = [], None, None
  for cp in range(sys.maxunicode + 1):
    if unicodedata.category(chr(cp)).startswith(prefix):
      if start is None:
        start = cp
      prev = cp
    elif start is not None:
      ranges.append((start, prev))
      start = None
  if start is not None:
    ranges.append((start, prev))
  esc = lambda cp: f"\\U{cp:08x}"
  return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


@functools.cache
def pretokenizer() -> re.Pattern:
  """GPT-2's word-splitting regex, with `\\p{L}` and `\\p{N}` spelled out for the `re` module."""
  letters, numbers = _char_class("L"), _char_class("N")
  return re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+"""
                    rf"""| ?[^\s{letters}{numbers}]+|\s+(?!\S)|\s+""")


class GPT2BPETokenizer:
  """Byte-level BPE with GPT-2's vocabulary format.

  Attributes:
    vocab_size: number of tokens (`len(vocab.json)`).
    bos_id, eos_id, pad_id: all `<|endoftext|>`, as in GPT-2, which has no other special token.
    origin: where the vocabulary came from, for logs.
  """

  kind = "gpt2_bpe"
  threaded = False

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], origin: str = ""):
    self._encoder = dict(vocab)
    self._decoder = {i: t for t, i in vocab.items()}
    self._ranks = {pair: rank for rank, pair in enumerate(merges)}
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    self._cache: dict[str, list[int]] = {}
    self.vocab_size = len(vocab)
    self.eos_id = self.bos_id = self.pad_id = vocab[EOS_TOKEN]
    self.origin = origin
    files = json.dumps(vocab, sort_keys=True) + "\n".join(" ".join(m) for m in merges)
    self.fingerprint = hashlib.sha256(files.encode()).hexdigest()

  @classmethod
  def from_dir(cls, path: str, setting: str = "data.tokenizer.path") -> "GPT2BPETokenizer":
    """Loads `vocab.json` and `merges.txt` from a folder.

    Raises:
      DataError: naming `setting`, if a file is missing or lacks `<|endoftext|>` or a byte token.
    """
    files = [os.path.join(path, f) for f in (VOCAB_FILE, MERGES_FILE)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise fail(setting, f"{path!r} lacks {[os.path.basename(f) for f in missing]}",
                 "Point it at a folder holding GPT-2's vocab.json and merges.txt.")
    with open(files[0], encoding="utf-8") as f:
      vocab = json.load(f)
    with open(files[1], encoding="utf-8") as f:
      lines = [l.rstrip("\n") for l in f]
    merges = [tuple(l.split(" ")) for l in lines if l and not l.startswith("#version")]
    if EOS_TOKEN not in vocab or any(c not in vocab for c in bytes_to_unicode().values()):
      raise fail(setting, f"{files[0]!r} is not a byte-level vocabulary with {EOS_TOKEN}",
                 "Use GPT-2's vocab.json (all 256 byte tokens plus <|endoftext|>).")
    return cls(vocab, merges, origin=f"GPT-2 BPE from {path}")

  def save(self, path: str) -> None:
    """Writes `vocab.json` and `merges.txt` into the folder `path` (created if needed)."""
    os.makedirs(path, exist_ok=True)
    merges = sorted(self._ranks, key=self._ranks.get)
    for name, text in ((VOCAB_FILE, json.dumps(self._encoder, ensure_ascii=False)),
                       (MERGES_FILE, "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))):
      files.write_atomic(os.path.join(path, name), text.encode("utf-8"))

  def _bpe(self, word: str) -> list[int]:
    """Token ids of one pre-tokenized word (already mapped to byte characters)."""
    if word in self._cache:
      return self._cache[word]
    parts = list(word)
    while len(parts) > 1:
      pair = min(zip(parts, parts[1:]), key=lambda p: self._ranks.get(p, sys.maxsize))
      if pair not in self._ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    ids = [self._encoder[p] for p in parts]
    if len(self._cache) < 1_000_000:
      self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added)."""
    ids = []
    for word in pretokenizer().findall(text):
      ids.extend(self._bpe("".join(self._byte_encoder[b] for b in word.encode("utf-8"))))
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; invalid UTF-8 (a cut multi-byte character) decodes to U+FFFD."""
    chars = "".join(self._decoder[int(i)] for i in ids)
    return bytes(self._byte_decoder[c] for c in chars).decode("utf-8", errors="replace")

  def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
    """`decode` of each sequence."""
    return [self.decode(ids) for ids in batch]

  @property
  def byte_ids(self) -> np.ndarray:
    """Ids that stand for raw bytes when a piece is unknown: none, GPT-2's bytes are ordinary."""
    return np.zeros((0,), np.int64)
