"""GPT-2's byte-level BPE, read from an existing `vocab.json` + `merges.txt`, encoded by tiktoken.

The algorithm is Radford et al. (2019) and OpenAI's `encoder.py`: text is split by GPT-2's regex
into words, each word's UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`), and
the ranked merges are applied greedily, lowest rank first. Every byte is in the base vocabulary, so
any text round-trips. `<|endoftext|>` ends documents; text is always encoded literally (tiktoken's
`encode_ordinary`, and the token is not one of its mergeable ranks), so a document that contains
that string cannot inject a fake end of document.

Engine. `GPT2BPETokenizer` encodes with tiktoken (compiled, multithreaded batches; about 10x the
plain-Python speed). tiktoken merges by the rank of the *merged token*, GPT-2 by the rank of the
*pair* in merges.txt; the two give the same ids when the merged tokens' ranks follow merges.txt,
each merge makes a new token, and every token tiktoken may form is one GPT-2's algorithm can form
from its own bytes (see `_tiktoken_ranks`, which checks all three at load time and proves the
equivalence). The last condition holds for GPT-2's own files and vocabularies trained by Hugging
Face `tokenizers`; tokens that fail it are never produced by GPT-2's algorithm, so they are left
out of tiktoken's table instead. When vocab.json's ids do not follow merges.txt (a renumbered
vocabulary), tiktoken is given merge-order ranks and its output is mapped back to vocab.json's ids:
exact, slightly slower, and said in one log line. A merges.txt that no compiled engine reproduces
exactly (a merge that makes an existing token again, uses a token before the merge that makes it, or
makes a token vocab.json lacks or `<|endoftext|>`) is a `DataError` naming the setting, rather than
ids that differ.

The oracle. `ReferenceBPE` is GPT-2's algorithm in plain Python (OpenAI's `encoder.py`): the tests
compare tiktoken against it and against Hugging Face's GPT-2 tokenizer, and the load-time check
runs it on single tokens. It never encodes training data. Its pre-tokenizer spells `\\p{L}` and
`\\p{N}` from Python's `unicodedata` and `\\s` as Unicode's White_Space (Python's `\\s` also takes
U+001C..U+001F, which GPT-2's `regex` does not), so it needs no `regex` package; it agrees with
tiktoken except on characters its Unicode version (`unicodedata.unidata_version`) predates.
"""

from collections.abc import Iterable, Sequence
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import unicodedata

import numpy as np
import tiktoken

from gptjax.data import files
from gptjax.data.errors import fail

EOS_TOKEN = "<|endoftext|>"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
# GPT-2's pre-tokenizer (OpenAI's encoder.py), in the `regex` syntax tiktoken compiles.
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Unicode's White_Space property: what `\s` means to GPT-2's `regex` and to tiktoken.
_WHITE_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


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


@functools.cache
def _byte_decoder() -> dict[str, int]:
  return {c: b for b, c in bytes_to_unicode().items()}


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
  """GPT-2's word-splitting regex for the `re` module (the oracle's): `PATTERN` with `\\p{L}`,
  `\\p{N}` spelled out from `unicodedata` and `\\s` as Unicode's White_Space."""
  letters, numbers, space = _char_class("L"), _char_class("N"), _WHITE_SPACE
  return re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+"""
                    rf"""| ?[^{space}{letters}{numbers}]+|[{space}]+(?![^{space}])|[{space}]+""")


class ReferenceBPE:
  """GPT-2's algorithm in plain Python, as OpenAI's `encoder.py`: the test oracle.

  About 300k tokens/s; `GPT2BPETokenizer` encodes with tiktoken and is checked against this. Not
  used to encode training data.
  """

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]]):
    self._encoder = vocab
    self._ranks = {pair: rank for rank, pair in enumerate(merges)}
    self._byte_encoder = bytes_to_unicode()
    self._cache: dict[str, list[str]] = {}

  def bpe(self, word: str) -> list[str]:
    """The tokens (as vocab.json strings) of one pre-tokenized word of byte characters."""
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
    if len(self._cache) < 1_000_000:
      self._cache[word] = parts
    return parts

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, `<|endoftext|>` included as literal text."""
    ids = []
    for word in pretokenizer().findall(text):
      ids.extend(self._encoder[p] for p in self.bpe(
          "".join(self._byte_encoder[b] for b in word.encode("utf-8"))))
    return ids


def _tiktoken_ranks(vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                    setting: str) -> tuple[dict[bytes, int], list[int] | None]:
  """tiktoken's mergeable ranks that reproduce GPT-2's algorithm on these files exactly.

  Let GPT-2's algorithm (G) merge, at each step, every occurrence of the pair with the lowest
  merges.txt rank; tiktoken (T) merges the leftmost adjacent pair whose concatenation has the lowest
  rank in its table. Checked here: (1) each merge's parts are bytes or tokens made by earlier
  merges, (2) no two merges make the same token, (3) each merge's token is in vocab.json and is
  not `<|endoftext|>` (which text must never produce). (1) lets G merge one occurrence at a time,
  leftmost first, without changing its result. T's table holds the bytes and the tokens t that G
  turns their own bytes into ([t]: 'reachable'), ranked in merge order.

  Proof sketch that T == G on every word: a token G makes anywhere is reachable (the merges inside
  its span run as they would on its bytes alone), so leaving unreachable ones out changes nothing.
  Should T ever merge an adjacent (x, y) that is not the merge making t = x + y, G's run on t's
  bytes alone would reach [x, y] and then stop or make t another way, against reachability and (2);
  otherwise T's and G's choices coincide, as the ranks follow merge order. The check costs about
  0.6 s for GPT-2's 50,000 merges (the oracle runs once per token).

  Args:
    vocab: vocab.json.
    merges: merges.txt's pairs, in rank order.
    setting: the config key to blame in errors.

  Returns:
    `(ranks, remap)`: tiktoken's table (token bytes -> rank) and None when the ranks are
    vocab.json's ids, or, when vocab.json's ids do not follow merges.txt, ranks in merge order and
    the list mapping each rank to its vocab.json id.

  Raises:
    DataError: the merges break (1), (2) or (3).
  """
  byte_chars = set(bytes_to_unicode().values())
  bad = next((rank for rank, pair in enumerate(merges) if len(pair) != 2), None)
  if bad is not None:
    raise fail(setting, f"merge {bad} ({' '.join(merges[bad])!r}) is not a pair",
               "Use GPT-2's merges.txt format: one 'left right' pair per line.")
  outputs = {a + b for a, b in merges}
  made: dict[str, int] = {}
  for rank, pair in enumerate(merges):
    token = pair[0] + pair[1]
    late = [p for p in pair if p not in byte_chars and p not in made and p in outputs]
    if late:
      raise fail(setting, f"merge {rank} ({' '.join(pair)!r}) uses {late[0]!r} before the merge "
                 "that makes it, which GPT-2's algorithm and tiktoken order differently",
                 "Use merges.txt as its trainer wrote it (each merge after those making its "
                 "parts).")
    if token in made:
      raise fail(setting, f"merges {made[token]} and {rank} both make {token!r}; no compiled "
                 "engine reproduces GPT-2's algorithm exactly for such merges",
                 "Use a vocabulary where each merge makes a new token (GPT-2's own, or one trained "
                 "by Hugging Face tokenizers or SentencePiece).")
    if token == EOS_TOKEN:
      raise fail(setting, f"merge {rank} ({' '.join(pair)!r}) makes {EOS_TOKEN}, so a document "
                 "containing that text would fake an end of document",
                 f"Use a vocabulary where {EOS_TOKEN} is only the end-of-document token.")
    if token not in vocab:
      raise fail(setting, f"merge {rank} ({' '.join(pair)!r}) makes {token!r}, which vocab.json "
                 "lacks", "Use the vocab.json and merges.txt written together by one trainer.")
    made[token] = rank
  reference = ReferenceBPE(vocab, merges)
  reachable = [t for t in made if reference.bpe(t) == [t]]
  dropped = len(made) - len(reachable)
  if dropped:
    logging.debug("GPT-2 BPE: %d tokens that merges never make from their own bytes are left out "
                  "of tiktoken's table", dropped)
  bd = _byte_decoder()
  to_bytes = lambda t: bytes(bd[c] for c in t)
  ids = [vocab[t] for t in reachable]
  if all(a < b for a, b in zip(ids, ids[1:])):
    ranks = {bytes([bd[c]]): vocab[c] for c in byte_chars}
    ranks.update((to_bytes(t), vocab[t]) for t in reachable)
    return ranks, None
  ranks = {bytes([b]): b for b in range(256)}
  ranks.update((to_bytes(t), 256 + made[t]) for t in reachable)
  remap, be = [0] * (256 + len(merges)), bytes_to_unicode()
  for token, rank in ranks.items():
    remap[rank] = vocab["".join(be[b] for b in token)]
  logging.info("GPT-2 BPE: vocab.json's ids do not follow merges.txt's order, so tiktoken "
               "merges by merge order and its output is mapped back to vocab.json's ids (exact, "
               "a little slower)")
  return ranks, remap


class GPT2BPETokenizer:
  """Byte-level BPE with GPT-2's vocabulary format, encoded by tiktoken (see the module doc).

  Attributes:
    vocab_size: number of tokens (`len(vocab.json)`).
    bos_id, eos_id, pad_id: all `<|endoftext|>`, as in GPT-2, which has no other special token.
    origin: where the vocabulary came from, for logs.
    fingerprint: sha256 of the vocabulary and merges.
    engine: the library that encodes, `{'library': 'tiktoken', 'version': ...}`.
    num_threads: threads `encode_batch` uses (all cores).
  """

  kind = "gpt2_bpe"
  threaded = True  # encode_batch runs tiktoken on `num_threads` threads

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], origin: str = "",
               setting: str = "data.tokenizer.path"):
    """Builds the tokenizer.

    Raises:
      DataError: naming `setting`, for merges that no compiled engine reproduces exactly.
    """
    self._encoder = dict(vocab)
    self._decoder = {i: t for t, i in vocab.items()}
    self._merges = [tuple(m) for m in merges]
    self.vocab_size = len(vocab)
    self.eos_id = self.bos_id = self.pad_id = vocab[EOS_TOKEN]
    self.origin = origin
    files = json.dumps(vocab, sort_keys=True) + "\n".join(" ".join(m) for m in merges)
    self.fingerprint = hashlib.sha256(files.encode()).hexdigest()
    self.engine = {"library": "tiktoken", "version": tiktoken.__version__}
    self.num_threads = os.cpu_count() or 1
    bd = _byte_decoder()
    self._bytes = [b""] * (max(self._decoder) + 1)
    for token, i in vocab.items():  # tokens outside the byte alphabet decode as their text
      self._bytes[i] = (bytes(bd[c] for c in token) if all(c in bd for c in token)
                        else token.encode("utf-8"))
    self._ranks, self._remap = _tiktoken_ranks(self._encoder, self._merges, setting)
    self._tiktoken = self._build_tiktoken()

  def _build_tiktoken(self) -> tiktoken.Encoding:
    return tiktoken.Encoding(f"gptjax_gpt2_bpe_{self.fingerprint[:16]}", pat_str=PATTERN,
                             mergeable_ranks=self._ranks, special_tokens={})

  def __getstate__(self) -> dict:
    """Pickles without the tiktoken object (rebuilt from the checked ranks on unpickling)."""
    return {k: v for k, v in self.__dict__.items() if k != "_tiktoken"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._tiktoken = self._build_tiktoken()

  @classmethod
  def from_dir(cls, path: str, setting: str = "data.tokenizer.path") -> "GPT2BPETokenizer":
    """Loads `vocab.json` and `merges.txt` from a folder.

    Raises:
      DataError: naming `setting`, if a file is missing or lacks `<|endoftext|>` or a byte token,
        or if the merges are ones no compiled engine reproduces exactly (see the module doc).
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
    return cls(vocab, merges, origin=f"GPT-2 BPE from {path}", setting=setting)

  def save(self, path: str) -> None:
    """Writes `vocab.json` and `merges.txt` into the folder `path` (created if needed)."""
    os.makedirs(path, exist_ok=True)
    for name, text in ((VOCAB_FILE, json.dumps(self._encoder, ensure_ascii=False)),
                       (MERGES_FILE,
                        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges))):
      files.write_atomic(os.path.join(path, name), text.encode("utf-8"))

  def reference(self) -> ReferenceBPE:
    """The plain-Python oracle on the same files (for tests and checks, not for training data)."""
    return ReferenceBPE(self._encoder, self._merges)

  @property
  def cache_identity(self) -> dict:
    """What decides the ids, for cache keys: kind, files (`fingerprint`) and encoding library."""
    return {"kind": self.kind, "fingerprint": self.fingerprint, "engine": dict(self.engine)}

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added; `<|endoftext|>` in `text` is literal text)."""
    ids = self._tiktoken.encode_ordinary(text)
    return ids if self._remap is None else [self._remap[i] for i in ids]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text, on `num_threads` threads."""
    batch = self._tiktoken.encode_ordinary_batch(list(texts), num_threads=self.num_threads)
    if self._remap is None:
      return batch
    remap = self._remap
    return [[remap[i] for i in ids] for ids in batch]

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; invalid UTF-8 (a cut multi-byte character) decodes to U+FFFD."""
    return b"".join([self._bytes[int(i)] for i in ids]).decode("utf-8", errors="replace")

  def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
    """`decode` of each sequence."""
    return [self.decode(ids) for ids in batch]

  @property
  def byte_ids(self) -> np.ndarray:
    """Ids that stand for raw bytes when a piece is unknown: none, GPT-2's bytes are ordinary."""
    return np.zeros((0,), np.int64)


def train_vocabulary(texts: Iterable[str], num_merges: int, out_dir: str) -> str:
  """Trains a GPT-2-format byte-level BPE on `texts` with Hugging Face `tokenizers` (the `hf`
  extra); writes `vocab.json` + `merges.txt` into `out_dir` for `GPT2BPETokenizer.from_dir`.

  The vocabulary holds `<|endoftext|>` (id 0: the trainer puts special tokens first), the 256 byte
  tokens, then one token per merge in merge order, so ids follow merges as in GPT-2's own files.

  Args:
    texts: training documents.
    num_merges: merges to learn (fewer if the texts run out of pairs seen at least twice).
    out_dir: folder to write into (created if needed).

  Returns:
    `out_dir`.
  """
  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=1 + 256 + num_merges, min_frequency=2, show_progress=False,
      special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  texts = iter(texts)
  tok.train_from_iterator(iter(lambda: list(itertools.islice(texts, 256)), []), trainer=trainer)
  os.makedirs(out_dir, exist_ok=True)
  tok.model.save(out_dir)
  return out_dir
