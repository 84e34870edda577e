"""The token cache's files: shards of token ids, their manifest, and a split read as one stream.

An entry holds, per split, shards `train-000000.npy`, `train-000001.npy`, ... (each a 1-D `.npy`
of uint16 or uint32 ids: whole documents, each followed by EOS) and one `manifest.json` that lists
every shard with its token, document and character counts and its sha256, together with what the
tokens depend on (tokenizer fingerprint and library versions, corpus fingerprint, format). A split
is the concatenation of its shards in manifest order: `Stream` reads it as one sequence, memory-
mapping each shard on first touch, so only the pages a batch needs are read.

    manifest = shards.read_manifest(path)
    stream = shards.Stream.of(path, manifest, "train")  # len(stream), stream[a:b] -> np.ndarray
"""

from concurrent import futures
import hashlib
import io
import json
import os
from typing import Any

import numpy as np

from gptjax.data import files
from gptjax.data.errors import fail

MANIFEST = "manifest.json"
_HASH_BLOCK = 1 << 24


def shard_name(split: str, unit: int) -> str:
  """The file of `split`'s shard built from work unit `unit`."""
  return f"{split}-{unit:06d}.npy"


def write_shard(path: str, tokens: np.ndarray) -> str:
  """Writes a 1-D token array as `.npy` via a temporary file and a rename; returns its sha256."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(npy_header(tokens.dtype, len(tokens)))
    f.write(np.ascontiguousarray(tokens).tobytes())
  digest = sha256(tmp)
  os.replace(tmp, path)
  return digest


def sha256(path: str) -> str:
  """The sha256 of a file's bytes (hashlib releases the GIL: threads hash files in parallel)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_HASH_BLOCK):
      h.update(block)
  return h.hexdigest()


def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of the entry folder `path`."""
  with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
    return json.load(f)


def write_manifest(path: str, manifest: dict[str, Any]) -> None:
  """Writes the manifest last: an entry is complete exactly when its manifest exists."""
  files.write_atomic(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1).encode())


def verify(path: str, manifest: dict[str, Any], *, checksums: bool = True,
           threads: int = 4) -> None:
  """Checks every shard of an entry against its manifest: present, the right size, and (with
  `checksums`) the right sha256.

  Raises:
    DataError: naming the first shard that does not match; it must never be trained on.
  """
  dtype = np.dtype(manifest["dtype"])
  shards = [s for split in manifest["splits"].values() for s in split["shards"]]

  def check(shard: dict[str, Any]) -> str | None:
    file = os.path.join(path, shard["file"])
    if not os.path.isfile(file):
      return f"shard {shard['file']} is missing"
    size = len(npy_header(dtype, shard["tokens"])) + shard["tokens"] * dtype.itemsize
    if os.path.getsize(file) != size:
      return (f"shard {shard['file']} has {os.path.getsize(file)} bytes, not the {size} its "
              "manifest implies")
    if checksums and sha256(file) != shard["sha256"]:
      return f"shard {shard['file']} does not match its manifest's sha256 {shard['sha256'][:16]}…"
    return None

  with futures.ThreadPoolExecutor(max(1, threads)) as pool:
    problems = [p for p in pool.map(check, shards) if p]
  if problems:
    raise fail("data.cache_dir", f"{problems[0]} in the token cache {path} "
               f"({len(problems)} of {len(shards)} shards are damaged); it is refused",
               f"Delete {path} to rebuild it, and check the storage it lives on.")


def npy_header(dtype: np.dtype, n: int) -> bytes:
  """The `.npy` (version 1.0) header of a 1-D array of `n` elements of `dtype`."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
               "shape": (int(n),)})
  return buffer.getvalue()


class Stream:
  """The shards of one split as one read-only token sequence.

  `len(stream)` is the split's token count; `stream[a:b]` (a contiguous slice) returns those
  tokens as an array, reading across shard boundaries. Shards are memory-mapped lazily in each
  process, so a `Stream` pickles cheaply to data-loading workers.
  """

  def __init__(self, paths: list[str], lengths: list[int], dtype: np.dtype):
    self.paths, self.dtype = list(paths), np.dtype(dtype)
    self.offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))])
    self._maps: dict[int, np.ndarray] = {}

  @classmethod
  def of(cls, path: str, manifest: dict[str, Any], split: str) -> "Stream":
    shards = manifest["splits"][split]["shards"]
    return cls([os.path.join(path, s["file"]) for s in shards], [s["tokens"] for s in shards],
               manifest["dtype"])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def _shard(self, i: int) -> np.ndarray:
    if i not in self._maps:
      self._maps[i] = np.load(self.paths[i], mmap_mode="r")
    return self._maps[i]

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError(f"a token stream takes contiguous slices, not {index!r}")
    start, stop, _ = index.indices(len(self))
    if stop <= start:
      return np.zeros((0,), self.dtype)
    first = int(np.searchsorted(self.offsets, start, side="right")) - 1
    parts = []
    for i in range(first, len(self.paths)):
      lo = int(self.offsets[i])
      if lo >= stop:
        break
      parts.append(self._shard(i)[max(start - lo, 0):stop - lo])
    return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self[0:len(self)]
    return out if dtype is None else out.astype(dtype)

  def __getstate__(self):
    return {**self.__dict__, "_maps": {}}

  def __repr__(self) -> str:
    return f"Stream({len(self.paths)} shards, {len(self):,} tokens)"
