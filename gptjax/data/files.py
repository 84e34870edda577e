"""Files shared by the data caches and the tokenizers: where the cache lives, and atomic writes."""

import os
import uuid

import ml_collections

from gptjax import storage


def _setting(d: ml_collections.ConfigDict) -> tuple[str, str]:
  if d.cache_dir:
    return "data.cache_dir", d.cache_dir
  path = os.environ.get("GPTJAX_CACHE")
  return ("$GPTJAX_CACHE", path) if path else ("data.cache_dir", os.path.join("~", ".cache",
                                                                               "gptjax"))


def root(d: ml_collections.ConfigDict) -> str:
  """The cache folder: `data.cache_dir`, else `$GPTJAX_CACHE`, else `~/.cache/gptjax`. For a URL
  (s3://, gs://) it is the local copy that `pull` fills and `push` uploads."""
  _, path = _setting(d)
  if storage.is_url(path):
    return storage.local_path(path)
  return os.path.abspath(os.path.expanduser(path))


def remote(d: ml_collections.ConfigDict, local: str) -> tuple[str, str] | None:
  """(setting, URL) of the cache folder's `local` path when the cache is at a URL, else None."""
  setting, path = _setting(d)
  if not storage.is_url(path):
    return None
  rel = os.path.relpath(local, storage.local_path(path)).replace(os.sep, "/")
  return setting, f"{path.rstrip('/')}/{rel}"


def pull(d: ml_collections.ConfigDict, local: str, marker: str,
         only: list[str] | None = None) -> bool:
  """For a cache at a URL: downloads the complete copy of `local`'s folder (its `marker` is
  uploaded last) if the store has one. False if it has none, or the cache is local."""
  where = remote(d, local)
  return bool(where) and storage.pull_complete(where[1], local, marker, where[0], only)


def push(d: ml_collections.ConfigDict, local: str, marker: str,
         only: list[str] | None = None) -> None:
  """For a cache at a URL: uploads `local`'s folder (or the names `only`), `marker` last, so other
  machines take it as complete only once it is."""
  where = remote(d, local)
  if where:
    storage.push_complete(local, where[1], marker, where[0], only)


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and `os.replace`, so readers never see half."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
