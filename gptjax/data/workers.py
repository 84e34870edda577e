"""The token cache built by N independent workers: SLURM array tasks, the hosts of a run, or the
tasks of a Beam pipeline (`beam_build`).

Worker i builds the units u with u mod N = i (`cache.units`) into a staging folder they all share
under `data.cache_dir`; a unit is done when its record exists, so a failed worker is simply run
again and keeps what it finished. Each worker first records its settings there, and a worker whose
settings differ from the first one's is stopped, naming the differences. The last worker to finish
(or the explicit final step, `commit_workers`) checks that all finished and agree, verifies every
shard, writes the manifest and renames the folder into place: the entry is the one a local build
gives, byte for byte.

    workers.build_worker(cfg.data, tokenizer, num_workers=4, worker_index=i)
    entry = workers.commit_workers(cfg.data, tokenizer, num_workers=4)
"""

import hashlib
import json
import os
import time
import uuid
from typing import Any

import ml_collections

from gptjax.data import cache, files
from gptjax.data import shards
from gptjax.data import sources
from gptjax.data.errors import DataError, fail
from gptjax.data.tokenizer import Tokenizer

SETTINGS = "settings.json"  # the build's key, which every worker must share


def check_shared(d: ml_collections.ConfigDict) -> None:
  """Workers meet in a staging folder, which needs a filesystem they all write: not a URL."""
  where = files.remote(d, cache.root(d))
  if where:
    raise fail(where[0], f"is a URL ({where[1]}), but independent workers and Beam tasks meet in "
               "a staging folder that every worker writes, which an object store cannot hold",
               "Build into a shared filesystem or a mounted bucket, or build on one machine "
               "(without --num_workers or --beam): a URL cache uploads each entry it builds.")


def staging_path(d: ml_collections.ConfigDict, corpus: sources.Corpus) -> str:
  """The folder the independent workers of one build share. It is named by the source alone, so
  workers whose settings differ meet there and are stopped (`SETTINGS`)."""
  check_shared(d)
  where = {"source": d.source, "paths": d.paths, "tfds_name": d.tfds_name}
  digest = hashlib.sha256(json.dumps(where, sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(cache.root(d), "tokens", f"{corpus.fingerprint['source']}-{digest}.parallel")


def build_worker(d: ml_collections.ConfigDict, tokenizer: Tokenizer, num_workers: int,
                 worker_index: int, *, commit: bool = True) -> cache.TokenCache | None:
  """Builds worker `worker_index`'s share (units u with u mod `num_workers` = `worker_index`) of
  the entry `load_or_build` would build, into the shared staging folder; units already built
  there are kept, so a failed worker is simply run again. With `commit`, the last worker to
  finish commits (else a final `commit_workers` does).

  Returns:
    The complete entry when this call committed it (or it existed), else None (others still work).

  Raises:
    DataError: bad worker numbers, or workers whose settings (tokenizer, corpus, data.*) differ.
  """
  if not 0 <= worker_index < num_workers:
    raise fail("data.build_workers", f"worker {worker_index} of {num_workers} does not exist",
               f"Run workers 0 to {num_workers - 1}, each with --worker_index=i.")
  cache.check_settings(d)
  corpus, k, final, entry = _find(d, tokenizer)
  if entry:
    return entry
  staging = _join_staging(d, corpus, k, num_workers)
  start, n_units = time.perf_counter(), 0
  for unit, docs in cache.units(corpus, d.shard_chars):
    n_units += 1
    if unit % num_workers == worker_index and not os.path.isfile(cache.unit_record(staging, unit)):
      cache.build_unit(unit, docs, tokenizer, staging)
  cache.write_atomic(os.path.join(staging, f"worker-{worker_index}.json"), json.dumps(
      {"units": n_units, "seconds": round(time.perf_counter() - start, 3)}).encode())
  return commit_workers(d, tokenizer, num_workers, wait=False) if commit else None


def commit_workers(d: ml_collections.ConfigDict, tokenizer: Tokenizer, num_workers: int, *,
                   wait: bool = True) -> cache.TokenCache | None:
  """The final step of a build by independent workers: checks that every worker finished and
  agreed, verifies the shards, writes the manifest and moves the entry into place.

  Args:
    wait: True (the explicit final step): unfinished workers are an error naming them. False
      (called by each worker): return None while others are unfinished.
  """
  corpus, k, final, entry = _find(d, tokenizer)
  if entry:
    return entry
  staging = _join_staging(d, corpus, k, num_workers)
  done = {}
  for i in range(num_workers):
    path = os.path.join(staging, f"worker-{i}.json")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        done[i] = json.load(f)
  if len(done) < num_workers:
    if not wait:
      return None
    left = sorted(set(range(num_workers)) - set(done))
    raise fail("data.build_workers", f"workers {left} of {num_workers} have not finished the "
               f"build in {staging}", "Run them (--worker_index=i), then commit again.")
  counts = {w["units"] for w in done.values()}
  if len(counts) != 1:
    raise DataError(f"the workers of the build in {staging} saw different corpora "
                    f"({sorted(counts)} units): give every worker the same files")
  build = {"workers": num_workers, "seconds": max(w["seconds"] for w in done.values())}
  lock = f"{staging}.lock"  # beside the folder, which the commit renames
  if not _claim(lock, f"pid {os.getpid()} on {os.uname().nodename}"):
    if not wait:
      return None  # another worker is committing
    raise DataError(f"{lock} says another process is committing the build in {staging}; wait for "
                    "it, or delete the lock if no worker is running and commit again")
  try:
    if not os.path.isfile(os.path.join(final, shards.MANIFEST)):  # not committed meanwhile
      cache.commit(staging, final, k, tokenizer, corpus, counts.pop(), build)
  finally:
    os.remove(lock)
  return cache.load(final, d)


def _claim(path: str, text: str) -> bool:
  """Creates `path` holding `text` unless it exists (atomic: os.link fails on an existing name);
  True if this call created it."""
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  finally:
    os.remove(tmp)


def _find(d: ml_collections.ConfigDict, tokenizer: Tokenizer):
  """(corpus, key, entry path, the complete entry or None) of `d` tokenized by `tokenizer`."""
  corpus = sources.open_corpus(d)
  k = cache.key(d, tokenizer, corpus)
  final = cache.entry_path(d, k)
  done = os.path.isfile(os.path.join(final, shards.MANIFEST))
  return corpus, k, final, cache.load(final, d) if done else None


def _join_staging(d: ml_collections.ConfigDict, corpus: sources.Corpus, k: dict[str, Any],
                  num_workers: int) -> str:
  """The shared staging folder, after checking this worker's settings against the first one's
  (recorded atomically: os.link fails if another worker recorded first)."""
  staging = staging_path(d, corpus)
  os.makedirs(staging, exist_ok=True)
  mine = {"key": k, "num_workers": num_workers}
  path = os.path.join(staging, SETTINGS)
  _claim(path, json.dumps(mine, sort_keys=True))
  with open(path, encoding="utf-8") as f:
    theirs = json.load(f)
  if theirs != json.loads(json.dumps(mine)):
    diffs = _differences(theirs, json.loads(json.dumps(mine)))
    raise fail("data", f"this worker's settings differ from those the build in {staging} "
               f"started with: {'; '.join(diffs[:5])}",
               "Give every worker the same config, tokenizer, files and --num_workers (or delete "
               "that folder to start the build anew).")
  return staging


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b))
            for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else k)]
  return [] if a == b else [f"{where}: {json.dumps(a)[:80]} (first) vs {json.dumps(b)[:80]} "
                            "(this worker)"]
