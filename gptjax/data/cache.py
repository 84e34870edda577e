"""The token cache: a corpus tokenized once into flat `.npy` token streams, one per split.

Each split is one stream of token ids: every document followed by EOS, in corpus order (uint16 when
the vocabulary fits, else uint32), memory-mapped by the pipeline. A cache entry is a folder named
by a hash of everything that determines its content (tokenizer model, source settings, split
settings, format version), so a changed setting can never reuse stale tokens. Entries are built in
a temporary folder and renamed into place in one step: a crash or an error leaves no entry that a
later run would trust.

    tc = cache.load_or_build(cfg.data, tokenizer)
    train_tokens = tc.tokens("train")  # np.memmap, shape [n_tokens]
"""

import collections
from concurrent import futures
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import ml_collections
import numpy as np
import tqdm

from gptjax.data import sources
from gptjax.data.errors import fail

from gptjax.data.files import root, write_atomic  # noqa: F401  (re-exported)
from gptjax.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
META = "meta.json"
_BATCH_CHARS = 1 << 22  # characters per encode call: large enough to keep every thread busy


@dataclasses.dataclass(frozen=True)
class TokenCache:
  """A complete cache entry.

  Attributes:
    path: its folder, holding `train.npy`, `val.npy` and `meta.json`.
    meta: what `meta.json` records: dtype, vocab_size, eos_id, per-split `documents`, `tokens` and
      `chars`, the build time in `seconds`, and the tokenizer and corpus fingerprints.
  """

  path: str
  meta: dict[str, Any]

  def file(self, split: str) -> str:
    """The `.npy` file of a split (`'train'` or `'val'`)."""
    return os.path.join(self.path, f"{split}.npy")

  def tokens(self, split: str) -> np.ndarray:
    """The token stream of a split, memory-mapped (read-only)."""
    return np.load(self.file(split), mmap_mode="r")


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits (vocab_size <= 65536), else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def load_or_build(d: ml_collections.ConfigDict, tokenizer: Tokenizer,
                  corpus: sources.Corpus | None = None) -> TokenCache:
  """The cache entry of `cfg.data` tokenized by `tokenizer`, building it if absent.

  Args:
    d: the `data` section of the config.
    tokenizer: the tokenizer; its fingerprint is part of the key.
    corpus: the opened corpus, if the caller has it (else opened from `d`).

  Returns:
    The complete entry.

  Raises:
    DataError: the corpus has no training documents, or a document cannot be read; no entry and
      no temporary files are left behind.
  """
  corpus = corpus or sources.open_corpus(d)
  key = {"format": FORMAT_VERSION, "tokenizer": tokenizer.fingerprint, "corpus": corpus.fingerprint}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  final = os.path.join(root(d), "tokens", f"{corpus.fingerprint['source']}-{digest}")
  if os.path.isfile(os.path.join(final, META)):
    return _load(final)
  if os.path.isdir(final):  # damaged by hand: entries only appear complete (renamed with META)
    shutil.rmtree(final, ignore_errors=True)
  tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    meta = _build(tmp, corpus, tokenizer)
    meta.update(key)
    write_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1).encode())
    try:
      os.rename(tmp, final)
    except OSError:  # another process finished the same entry first; theirs is identical
      if not os.path.isfile(os.path.join(final, META)):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return _load(final)


def _load(path: str) -> TokenCache:
  with open(os.path.join(path, META), encoding="utf-8") as f:
    return TokenCache(path, json.load(f))


def _build(folder: str, corpus: sources.Corpus, tokenizer: Tokenizer) -> dict[str, Any]:
  """Tokenizes every document into `<folder>/{train,val}.npy`; returns the statistics."""
  dtype = token_dtype(tokenizer.vocab_size)
  splits = (sources.TRAIN, sources.VAL)
  stats = {s: {"documents": 0, "tokens": 0, "chars": 0} for s in splits}
  # pylint: disable-next=consider-using-with
  raw = {s: open(os.path.join(folder, f"{s}.bin"), "wb") for s in splits}
  start = time.perf_counter()
  try:
    with tqdm.tqdm(total=corpus.approx_chars or None, unit="char", unit_scale=True,
                   desc="tokenizing", disable=None) as bar:
      batches = _batches(corpus.documents(), _BATCH_CHARS)
      workers = 1 if tokenizer.threaded else os.cpu_count() or 1
      if corpus.approx_chars and corpus.approx_chars < 2 * _BATCH_CHARS:
        workers = 1  # starting processes would cost more than they save
      for batch, ids in _encode(batches, tokenizer, workers):
        for split in splits:
          docs = [(text, seq) for (s, text), seq in zip(batch, ids) if s == split]
          if not docs:
            continue
          tokens = np.fromiter(
              itertools.chain.from_iterable(seq + [tokenizer.eos_id] for _, seq in docs), dtype)
          raw[split].write(tokens.tobytes())
          st = stats[split]
          st["documents"] += len(docs)
          st["tokens"] += len(tokens)
          st["chars"] += sum(len(text) for text, _ in docs)
        bar.update(sum(len(text) for _, text in batch))
  finally:
    for f in raw.values():
      f.close()
  if not stats[sources.TRAIN]["documents"]:
    raise fail(corpus.setting, "the corpus has no training documents (all empty or held out)",
               "Point the source at non-empty text (and check data.max_docs/val_fraction).")
  for split in splits:
    _raw_to_npy(os.path.join(folder, f"{split}.bin"), os.path.join(folder, f"{split}.npy"),
                dtype, stats[split]["tokens"])
  seconds = time.perf_counter() - start
  total = sum(s["tokens"] for s in stats.values())
  logging.info("tokenized %d documents into %d tokens in %.1f s", sum(
      s["documents"] for s in stats.values()), total, seconds)
  return {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
          "splits": stats, "seconds": round(seconds, 3)}


def _encode(batches: Iterable[list[tuple[str, str]]], tokenizer: Tokenizer,
            workers: int) -> Iterator[tuple[list[tuple[str, str]], list[list[int]]]]:
  """Yields `(batch, token ids)` in order, encoding up to 2 * `workers` batches at once."""
  if workers <= 1:
    for batch in batches:
      yield batch, tokenizer.encode_batch([text for _, text in batch])
    return
  # spawn, not fork: the parent may hold JAX or Grain threads.
  with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_set_worker_tokenizer,
                                   initargs=(tokenizer,)) as pool:
    pending = collections.deque()
    for batch in batches:
      pending.append((batch, pool.submit(_worker_encode, [text for _, text in batch])))
      if len(pending) >= 2 * workers:
        batch, ids = pending.popleft()
        yield batch, ids.result()
    for batch, ids in pending:
      yield batch, ids.result()


_worker_tokenizer = None


def _set_worker_tokenizer(tokenizer: Tokenizer) -> None:
  global _worker_tokenizer  # pylint: disable=global-statement
  _worker_tokenizer = tokenizer


def _worker_encode(texts: list[str]) -> list[list[int]]:
  return _worker_tokenizer.encode_batch(texts)


def _batches(documents: Iterable[tuple[str, str]], chars: int) -> Iterator[list[tuple[str, str]]]:
  """Groups documents into lists of about `chars` characters."""
  batch, size = [], 0
  for doc in documents:
    batch.append(doc)
    size += len(doc[1])
    if size >= chars:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def _raw_to_npy(raw: str, npy: str, dtype: np.dtype, n: int) -> None:
  """Prefixes the raw token file with an `.npy` header (the length is known only at the end)."""
  with open(npy, "wb") as out, open(raw, "rb") as src:
    np.lib.format.write_array_header_1_0(
        out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
    shutil.copyfileobj(src, out, 1 << 24)
  os.remove(raw)
