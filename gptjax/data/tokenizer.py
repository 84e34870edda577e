"""Tokenizers: SentencePiece (trained on the corpus, or loaded) and GPT-2's byte-level BPE.

`load_or_train(cfg.data, workdir)` is the one entry point. It returns, in order of preference:
the tokenizer already saved in the workdir (so a resumed run uses the identical one), the one named
by `data.tokenizer.path`, or a SentencePiece model trained on the configured corpus (itself cached
under the data cache, keyed by corpus and settings, so a new run on the same data does not retrain).

Trained models are lossless: no normalisation, whitespace and newlines kept, and byte fallback, so
`decode(encode(text)) == text` for any text, and unseen characters become UTF-8 byte tokens.
"""

from collections.abc import Iterable, Iterator, Sequence
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from typing import Protocol

import ml_collections
import numpy as np
import sentencepiece as spm

from gptjax import storage
from gptjax.data import files
from gptjax.data import gpt2_bpe
from gptjax.data import sources
from gptjax.data.errors import fail

KINDS = ("sentencepiece", "gpt2_bpe")
MODEL_TYPES = ("bpe", "unigram")
WORKDIR_SPM, WORKDIR_GPT2 = "tokenizer.model", "tokenizer"  # file, folder
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Bump when the trainer options below change, so cached models are retrained.
TRAINER_VERSION = 2
# A trained SentencePiece model records its thread count, and a unigram model's pieces depend on it,
# so training uses a fixed count, SentencePiece's default: the same settings give the same model
# file (and fingerprint) on every machine, and on every host of a multi-process run.
TRAIN_THREADS = 16
_TRAINER_OPTIONS = dict(
    byte_fallback=True,  # unseen characters become UTF-8 bytes: nothing is unrepresentable
    normalization_rule_name="identity",  # no NFKC: code and unicode round-trip exactly
    remove_extra_whitespaces=False,  # keep indentation and runs of spaces
    add_dummy_prefix=False,  # documents are concatenated, not words; keep text as is
    allow_whitespace_only_pieces=True,  # one piece for common indentation
    split_digits=True,  # numbers digit by digit (as LLaMA), for arithmetic regularity
    user_defined_symbols=["\n"],  # newline is a piece (spm otherwise never sees one)
    character_coverage=0.9999,
    max_sentence_length=1 << 16,  # bytes; training sentences are lines
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
)


class Tokenizer(Protocol):
  """What the rest of gptjax needs from a tokenizer."""

  kind: str
  threaded: bool  # encode_batch already uses every core (else the cache spreads it over processes)
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  fingerprint: str  # sha256 of the model files: equal fingerprints tokenize identically
  cache_identity: dict  # fingerprint, kind and the encoding library's version: a cache key part
  origin: str  # how it was obtained, for logs ('trained on ... in 6.9 s', 'loaded from ...')

  def encode(self, text: str) -> list[int]: ...
  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
  def decode(self, ids: Iterable[int]) -> str: ...
  def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]: ...
  @property
  def byte_ids(self) -> np.ndarray: ...


class SentencePieceTokenizer:
  """A SentencePiece model (BPE or unigram) with the `Tokenizer` interface."""

  kind = "sentencepiece"
  threaded = True

  def __init__(self, model_proto: bytes, origin: str = ""):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()
    self.origin = origin
    self.num_threads = os.cpu_count() or 1

  @classmethod
  def from_file(cls, path: str, setting: str = "data.tokenizer.path") -> "SentencePieceTokenizer":
    """Loads a `.model` file; a bad file is a `DataError` naming `setting`."""
    if not os.path.isfile(path):
      raise fail(setting, f"{path!r} is not a file",
                 "Point it at a SentencePiece .model file, or set it to '' to train one.")
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return cls(proto, origin=f"loaded from {path}")
    except RuntimeError as e:
      raise fail(setting, f"{path!r} is not a SentencePiece model ({e})",
                 "Point it at a .model file written by SentencePiece.") from e

  def save(self, path: str) -> None:
    """Writes the model to `path` atomically."""
    files.write_atomic(path, self.model_proto)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added)."""
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, encoded by `num_threads` native threads."""
    return self._sp.encode(list(texts), num_threads=self.num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; control tokens (BOS/EOS/PAD) decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
    """`decode` of each sequence."""
    return self._sp.decode([[int(i) for i in ids] for ids in batch],
                           num_threads=self.num_threads)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  @property
  def cache_identity(self) -> dict:
    """What decides the ids, for cache keys: kind, model file (`fingerprint`) and library."""
    return {"kind": self.kind, "fingerprint": self.fingerprint,
            "engine": {"library": "sentencepiece", "version": spm.__version__}}

  @property
  def byte_ids(self) -> np.ndarray:
    """Ids of the 256 byte-fallback pieces (`<0x00>` ... `<0xFF>`)."""
    return np.array([i for i in range(self.vocab_size) if self._sp.is_byte(i)], np.int64)


def copy_saved(src_workdir: str, dst_workdir: str) -> None:
  """Copies the tokenizer a run saved (`WORKDIR_SPM` or `WORKDIR_GPT2`) into another workdir."""
  for name in (WORKDIR_SPM, WORKDIR_GPT2):
    src, dst = os.path.join(src_workdir, name), os.path.join(dst_workdir, name)
    if os.path.exists(src) and not os.path.exists(dst):
      os.makedirs(dst_workdir, exist_ok=True)
      (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, dst)


def load_or_train(d: ml_collections.ConfigDict, workdir: str | None = None) -> Tokenizer:
  """The run's tokenizer: from the workdir, else `data.tokenizer.path`, else trained on the corpus.

  Args:
    d: the `data` section of the config (`d.tokenizer` holds the tokenizer settings).
    workdir: run directory; the tokenizer is saved there (`tokenizer.model`, or a `tokenizer/`
      folder for GPT-2 BPE) and loaded from there on resume. None or '' = do not save.

  Returns:
    The tokenizer.

  Raises:
    DataError: unknown kind or model type, a bad path, or a vocabulary the corpus cannot fill.
  """
  tk = d.tokenizer
  if tk.kind not in KINDS:
    raise fail("data.tokenizer.kind", f"unknown kind {tk.kind!r}", f"Use one of {KINDS}.")
  saved = os.path.join(workdir, WORKDIR_SPM if tk.kind == "sentencepiece" else WORKDIR_GPT2) \
      if workdir else ""
  if saved and os.path.exists(saved):
    tok = (SentencePieceTokenizer.from_file(saved, "data.tokenizer.path")
           if tk.kind == "sentencepiece" else gpt2_bpe.GPT2BPETokenizer.from_dir(saved))
    tok.origin = f"loaded from the workdir ({saved})"
    return tok
  if tk.kind == "gpt2_bpe":
    if not tk.path:
      raise fail("data.tokenizer.path", "is empty but kind='gpt2_bpe' (it cannot be trained)",
                 "Point it at a folder with GPT-2's vocab.json and merges.txt.")
    tok = gpt2_bpe.GPT2BPETokenizer.from_dir(_local(tk.path))
  elif tk.path:
    tok = SentencePieceTokenizer.from_file(_local(tk.path))
  else:
    tok = _train_cached(d)
  if saved:
    os.makedirs(workdir, exist_ok=True)
    tok.save(saved)
  return tok


def _local(path: str) -> str:
  """`data.tokenizer.path` on this machine: a URL's files are downloaded first."""
  if storage.is_url(path):
    return storage.fetch(path, "data.tokenizer.path")
  return os.path.expanduser(path)


def _train_cached(d: ml_collections.ConfigDict) -> SentencePieceTokenizer:
  """Trains on the corpus, or loads the model a previous run trained with the same settings."""
  tk = d.tokenizer
  if tk.model_type not in MODEL_TYPES:
    raise fail("data.tokenizer.model_type", f"unknown type {tk.model_type!r}",
               f"Use one of {MODEL_TYPES}.")
  corpus = sources.open_corpus(d)
  key = {"corpus": corpus.fingerprint, "vocab_size": tk.vocab_size, "model_type": tk.model_type,
         "train_chars": tk.train_chars, "trainer": TRAINER_VERSION, "spm": spm.__version__}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(files.root(d), "tokenizers", f"{digest}.model")
  pair = [f"{digest}.model.json", f"{digest}.model"]  # the model last: it marks the pair complete
  if not os.path.isfile(path):
    files.pull(d, os.path.dirname(path), pair[1], only=pair)  # a cache at a URL
  if os.path.isfile(path):
    with open(path, "rb") as f:
      proto = f.read()
    with open(path + ".json", encoding="utf-8") as f:
      info = json.load(f)
    return SentencePieceTokenizer(proto, origin=f"{info['origin']}; cached at {path}")
  tok = train(corpus, vocab_size=tk.vocab_size, model_type=tk.model_type,
              train_chars=tk.train_chars)
  files.write_atomic(path + ".json", json.dumps({"origin": tok.origin, "settings": key}).encode())
  tok.save(path)
  files.push(d, os.path.dirname(path), pair[1], only=pair)
  return tok


def train(corpus: sources.Corpus, *, vocab_size: int, model_type: str,
          train_chars: int) -> SentencePieceTokenizer:
  """Trains a lossless SentencePiece model on the first `train_chars` characters of train documents.

  Args:
    corpus: the documents; only the train split is read.
    vocab_size: pieces in the model, including 4 specials and 256 byte pieces.
    model_type: 'bpe' or 'unigram'.
    train_chars: characters to sample (whole documents, in corpus order, until this many).

  Returns:
    The trained tokenizer.

  Raises:
    DataError: the corpus is empty, or too small for `vocab_size` (the message gives the maximum).
  """
  sample = _sample(corpus.texts(sources.TRAIN), train_chars)
  if not sample:
    raise fail(corpus.setting, "the corpus has no training documents",
               "Point the source at non-empty text (and check data.max_docs/val_fraction).")
  chars = sum(map(len, sample))
  lines = (line for text in sample for line in text.split("\n") if line)
  model = io.BytesIO()
  start = time.perf_counter()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
        model_type=model_type, num_threads=TRAIN_THREADS, minloglevel=2,
        **_TRAINER_OPTIONS)
  except RuntimeError as e:
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
    too_large = re.search(r"Vocabulary size too high.*<= (\d+)", str(e))
    if too_small:
      raise fail("data.tokenizer.vocab_size", f"{vocab_size} pieces cannot hold the specials, "
                 "bytes and characters of this corpus",
                 f"Use at least {too_small.group(1)}.") from e
    if too_large:
      raise fail("data.tokenizer.vocab_size", f"{vocab_size} pieces is more than this corpus can "
                 f"fill (at most {too_large.group(1)} from {chars:,} characters)",
                 "Lower data.tokenizer.vocab_size or give the tokenizer more text "
                 "(data.tokenizer.train_chars, a larger corpus).") from e
    raise
  seconds = time.perf_counter() - start
  origin = (f"trained SentencePiece {model_type} ({vocab_size} pieces) on {len(sample):,} documents"
            f" ({chars:,} characters) in {seconds:.1f} s")
  logging.info("%s", origin)
  return SentencePieceTokenizer(model.getvalue(), origin=origin)


def _sample(texts: Iterator[str], chars: int) -> list[str]:
  """Whole documents from the front of `texts` until they hold at least `chars` characters."""
  out, total = [], 0
  for text in texts:
    if total >= chars:
      break
    out.append(text)
    total += len(text)
  return out
