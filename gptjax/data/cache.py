"""The token cache: a corpus tokenized once into checksummed shards, built in parallel.

The documents (`sources.Corpus`, in their fixed order) are cut into work units of about
`data.shard_chars` characters, whole documents each; unit u becomes the shards `train-<u>.npy` and
`val-<u>.npy` (its documents of each split, each followed by EOS; see `shards.py`). A unit's bytes
depend only on its documents and the tokenizer, so the cache is byte-identical however many
workers built it and in whatever order. Three ways to build, one result:

- locally (the default): `load_or_build` spreads the units over `data.build_workers` processes;
- by N independent workers (`gptjax.data.workers`: SLURM array tasks, the hosts of a run, ...),
  worker i building the units u with u mod N = i into a shared staging folder;
- by an Apache Beam pipeline (`gptjax.data.beam_build`), whose workers run the same units.

An entry is a folder named by a hash of everything its bytes depend on (tokenizer fingerprint and
library versions, corpus fingerprint, shard size, format). It is built elsewhere and renamed into
place with its manifest written last, so a half-built entry is never used; on load every shard is
checked against the manifest (size, and sha256 unless `data.verify_shards` is off) and a damaged
shard is refused.

    tc = cache.load_or_build(cfg.data, tokenizer)
    stream = tc.stream("train")  # the shards as one token sequence: len(stream), stream[a:b]
"""

import collections
from collections.abc import Iterator
from concurrent import futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import unicodedata
import uuid
from typing import Any

import ml_collections
import numpy as np
import tqdm

from gptjax.data import files, hf_source
from gptjax.data import shards
from gptjax.data import sources
from gptjax.data.errors import DataError, fail

from gptjax.data.files import root, write_atomic  # noqa: F401  (re-exported)
from gptjax.data.tokenizer import Tokenizer

FORMAT_VERSION = 2
BUILD = "build.json"  # how an entry was built (workers, seconds): not part of its content
_BATCH_CHARS = 1 << 22  # characters per encode call: bounds memory, keeps every thread busy
_SPLITS = (sources.TRAIN, sources.VAL)


@dataclasses.dataclass(frozen=True)
class TokenCache:
  """A complete, verified cache entry.

  Attributes:
    path: its folder: the shards and `manifest.json`.
    meta: the manifest: `dtype`, `vocab_size`, `eos_id`, `tokenizer` (fingerprint), `key`, and per
      split `documents`, `tokens`, `chars`, UTF-8 `bytes` and `shards` (file, counts and sha256 of
      each).
  """

  path: str
  meta: dict[str, Any]

  def stream(self, split: str) -> shards.Stream:
    """A split's tokens as one sequence over its shards (memory-mapped, read on demand)."""
    return shards.Stream.of(self.path, self.meta, split)

  def tokens(self, split: str) -> np.ndarray:
    """A split's whole token stream in memory (for tests and small corpora; see `stream`)."""
    return np.asarray(self.stream(split))

  def npy_bytes(self, split: str, head: int) -> bytes:
    """The first and last `head` bytes the split would have as one `.npy` file (the layout of
    format 1): content fingerprints stay comparable across formats."""
    stream = self.stream(split)
    header = shards.npy_header(stream.dtype, len(stream))
    size = stream.dtype.itemsize
    body = lambda a, b: stream[a // size:-(-b // size)].tobytes()[a % size:][:b - a]
    total = len(header) + len(stream) * size
    first = (header + body(0, max(0, head - len(header))))[:head]
    lo = max(0, total - head)
    last = header[lo:] + body(max(0, lo - len(header)), total - len(header))
    return first + last


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits (vocab_size <= 65536), else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def key(d: ml_collections.ConfigDict, tokenizer: Tokenizer,
        corpus: sources.Corpus) -> dict[str, Any]:
  """Everything an entry's bytes depend on: the tokenizer's files and library version, the Unicode
  tables Python reads the documents with (which characters `str.strip` drops, what a blank line
  is), the corpus, the shard size and the format."""
  return {"format": FORMAT_VERSION, "tokenizer": tokenizer.fingerprint,
          "tokenizer_library": getattr(tokenizer, "cache_identity", {"kind": tokenizer.kind}),
          "unicode": unicodedata.unidata_version, "corpus": corpus.fingerprint,
          "shard_chars": int(d.shard_chars)}


def entry_path(d: ml_collections.ConfigDict, k: dict[str, Any]) -> str:
  digest = hashlib.sha256(json.dumps(k, sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(root(d), "tokens", f"{k['corpus']['source']}-{digest}")


def load_or_build(d: ml_collections.ConfigDict, tokenizer: Tokenizer,
                  corpus: sources.Corpus | None = None) -> TokenCache:
  """The cache entry of `cfg.data` tokenized by `tokenizer`, built locally if absent.

  Args:
    d: the `data` section of the config.
    tokenizer: the tokenizer; its fingerprint and library versions are part of the key.
    corpus: the opened corpus, if the caller has it (else opened from `d`).

  Returns:
    The complete entry, its shards checked against the manifest.

  Raises:
    DataError: a bad setting, a corpus without training documents, a document that cannot be
      read (no entry and no temporary files are left behind), or a damaged shard.
  """
  check_settings(d)
  corpus = corpus or sources.open_corpus(d)
  k = key(d, tokenizer, corpus)
  final = entry_path(d, k)
  if not os.path.isfile(os.path.join(final, shards.MANIFEST)):
    files.pull(d, final, shards.MANIFEST)  # a cache at a URL: another machine may have built it
  if os.path.isfile(os.path.join(final, shards.MANIFEST)):
    return load(final, d)
  if os.path.isdir(final):  # damaged by hand: entries only appear complete (renamed with manifest)
    shutil.rmtree(final, ignore_errors=True)
  tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    start = time.perf_counter()
    workers = _local_workers(d, tokenizer, corpus)
    n_units = _build_units(corpus, tokenizer, tmp, d.shard_chars, workers)
    commit(tmp, final, k, tokenizer, corpus, n_units,
            {"workers": workers, "seconds": round(time.perf_counter() - start, 3)})
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  files.push(d, final, shards.MANIFEST)  # a cache at a URL: the manifest goes last
  return load(final, d)


def load(path: str, d: ml_collections.ConfigDict | None = None) -> TokenCache:
  """Opens a complete entry, checking its shards (sizes, and sha256 unless
  `data.verify_shards` is False, which is logged)."""
  manifest = shards.read_manifest(path)
  checksums = True if d is None else bool(d.verify_shards)
  # A run opens its entry several times (fingerprint, validation, train): hash its shards once
  # per process, again only if a file's size or time has changed since.
  stamp = _stamp(path, manifest, checksums)
  if _VERIFIED.get(path) != stamp:
    if not checksums:
      logging.warning("token cache %s: shard sizes checked, sha256 not "
                      "(data.verify_shards=False)", path)
    shards.verify(path, manifest, checksums=checksums)
    if stamp is not None:
      _VERIFIED[path] = stamp
  return TokenCache(path, manifest)


_VERIFIED: dict[str, tuple] = {}  # entry path -> the `_stamp` it was verified at


def _stamp(path: str, manifest: dict[str, Any], checksums: bool) -> tuple | None:
  """Sizes and modification times of an entry's manifest and shards (None if one is missing)."""
  names = [shards.MANIFEST] + [s["file"] for v in manifest["splits"].values() for s in v["shards"]]
  try:
    stats = [os.stat(os.path.join(path, n)) for n in names]
  except FileNotFoundError:
    return None
  return (checksums, *((st.st_size, st.st_mtime_ns) for st in stats))


def check_settings(d: ml_collections.ConfigDict) -> None:
  """Refuses cache settings that cannot work, and a streamed source (it has no token cache)."""
  hf_source.refuse_streaming(d)
  if d.shard_chars < 1:
    raise fail("data.shard_chars", f"must be >= 1, got {d.shard_chars}",
               "Use e.g. 33_554_432 (about 8M tokens per shard).")
  if d.build_workers < 0:
    raise fail("data.build_workers", f"must be >= 0, got {d.build_workers}",
               "Use 0 for one process per core (one in all for a multi-threaded tokenizer).")


def _local_workers(d: ml_collections.ConfigDict, tokenizer: Tokenizer,
                   corpus: sources.Corpus) -> int:
  if d.build_workers:
    return int(d.build_workers)
  if tokenizer.threaded or (corpus.approx_chars and corpus.approx_chars < 2 * d.shard_chars):
    return 1  # the tokenizer already uses every core, or there is one unit's work in all
  return os.cpu_count() or 1


# ---- units -------------------------------------------------------------------------------------
def units(corpus: sources.Corpus, shard_chars: int) -> Iterator[tuple[int, list[tuple[str, str]]]]:
  """Yields `(u, [(split, text), ...])`: the corpus's documents in order, cut into units of whole
  documents holding at least `shard_chars` characters (the last one may hold fewer)."""
  unit, batch, size = 0, [], 0
  for doc in corpus.documents():
    batch.append(doc)
    size += len(doc[1])
    if size >= shard_chars:
      yield unit, batch
      unit, batch, size = unit + 1, [], 0
  if batch:
    yield unit, batch


def unit_record(folder: str, unit: int) -> str:
  return os.path.join(folder, f"unit-{unit:06d}.json")


def build_unit(unit: int, docs: list[tuple[str, str]], tokenizer: Tokenizer,
               folder: str) -> dict[str, Any]:
  """Tokenizes one unit into its shards in `folder`; writes and returns its record (counts and
  checksums per split), written last: a unit is done exactly when its record exists."""
  dtype = token_dtype(tokenizer.vocab_size)
  record: dict[str, Any] = {"unit": unit}
  for split in _SPLITS:
    texts = [text for s, text in docs if s == split]
    if not texts:
      continue
    parts, start, size = [], 0, 0
    for i, text in enumerate(texts + [None]):
      if text is None or size >= _BATCH_CHARS:
        for seq in tokenizer.encode_batch(texts[start:i]):
          parts.append(np.asarray(seq, dtype))
          parts.append(np.asarray([tokenizer.eos_id], dtype))
        start, size = i, 0
      if text is not None:
        size += len(text)
    tokens = np.concatenate(parts)
    name = shards.shard_name(split, unit)
    record[split] = {"file": name, "documents": len(texts), "tokens": len(tokens),
                     "chars": sum(map(len, texts)),
                     "bytes": sum(len(t.encode("utf-8", "surrogatepass")) for t in texts),
                     "sha256": shards.write_shard(os.path.join(folder, name), tokens)}
  write_atomic(unit_record(folder, unit), json.dumps(record).encode())
  return record


def _build_units(corpus: sources.Corpus, tokenizer: Tokenizer, folder: str, shard_chars: int,
                 workers: int) -> int:
  """Builds every unit into `folder` with `workers` processes; returns the number of units."""
  n_units = 0
  with tqdm.tqdm(total=corpus.approx_chars or None, unit="char", unit_scale=True,
                 desc="tokenizing", disable=None) as bar:
    if workers <= 1:
      for unit, docs in units(corpus, shard_chars):
        build_unit(unit, docs, tokenizer, folder)
        bar.update(sum(len(t) for _, t in docs))
        n_units += 1
      return n_units
    # spawn, not fork: the parent may hold JAX or Grain threads.
    with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_set_worker_tokenizer,
                                     initargs=(tokenizer, workers)) as pool:
      pending = collections.deque()
      for unit, docs in units(corpus, shard_chars):
        pending.append((sum(len(t) for _, t in docs), pool.submit(_worker_build, unit, docs,
                                                                  folder)))
        n_units += 1
        while len(pending) >= 2 * workers or (pending and pending[0][1].done()):
          chars, done = pending.popleft()
          done.result()
          bar.update(chars)
      for chars, done in pending:
        done.result()
        bar.update(chars)
  return n_units


_worker_tokenizer = None


def _set_worker_tokenizer(tokenizer: Tokenizer, workers: int) -> None:
  global _worker_tokenizer  # pylint: disable=global-statement
  if hasattr(tokenizer, "num_threads"):  # the cores are shared among the workers
    tokenizer.num_threads = max(1, (os.cpu_count() or 1) // workers)
  _worker_tokenizer = tokenizer


def _worker_build(unit: int, docs: list[tuple[str, str]], folder: str) -> dict[str, Any]:
  return build_unit(unit, docs, _worker_tokenizer, folder)


# ---- commit ------------------------------------------------------------------------------------
def commit(folder: str, final: str, k: dict[str, Any], tokenizer: Tokenizer,
            corpus: sources.Corpus, n_units: int, build: dict[str, Any]) -> None:
  """Checks the units of `folder` (all present, shards matching their records), writes the
  manifest, and renames the folder to `final`."""
  missing = [u for u in range(n_units) if not os.path.isfile(unit_record(folder, u))]
  if missing:
    raise DataError(f"the token cache build in {folder} lacks units {missing[:10]}"
                    f"{' ...' if len(missing) > 10 else ''} of {n_units}; rebuild them first")
  records = []
  for u in range(n_units):
    with open(unit_record(folder, u), encoding="utf-8") as f:
      records.append(json.load(f))
  splits = {}
  for split in _SPLITS:
    listed = [r[split] for r in records if split in r]
    splits[split] = {"documents": sum(s["documents"] for s in listed),
                     "tokens": sum(s["tokens"] for s in listed),
                     "chars": sum(s["chars"] for s in listed),
                     "bytes": sum(s["bytes"] for s in listed), "shards": listed}
  if not splits[sources.TRAIN]["documents"]:
    raise fail(corpus.setting, "the corpus has no training documents (all empty or held out)",
               "Point the source at non-empty text (and check data.max_docs/val_fraction).")
  manifest = {"format": FORMAT_VERSION, "dtype": token_dtype(tokenizer.vocab_size).name,
              "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
              "tokenizer": tokenizer.fingerprint, "key": k, "units": n_units, "splits": splits}
  shards.verify(folder, manifest)  # what the workers wrote is what their records say
  listed = {s["file"] for split in splits.values() for s in split["shards"]}
  for name in os.listdir(folder):  # unit records, worker and settings files: the build's, not
    if name not in listed:         # the entry's
      os.remove(os.path.join(folder, name))
  write_atomic(os.path.join(folder, BUILD), json.dumps(build).encode())
  shards.write_manifest(folder, manifest)
  total = sum(s["tokens"] for s in splits.values())
  logging.info("token cache: %d documents, %d tokens in %d shards (%s)",
               sum(s["documents"] for s in splits.values()), total,
               sum(len(s["shards"]) for s in splits.values()), build)
  try:
    os.rename(folder, final)
  except OSError:  # another process finished the same entry first; theirs is identical
    if not os.path.isfile(os.path.join(final, shards.MANIFEST)):
      raise
