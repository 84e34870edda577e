"""Files shared by the data caches and the tokenizers: where the cache lives, and atomic writes."""

import os
import uuid

import ml_collections


def root(d: ml_collections.ConfigDict) -> str:
  """The cache folder: `data.cache_dir`, else `$GPTJAX_CACHE`, else `~/.cache/gptjax`."""
  path = d.cache_dir or os.environ.get("GPTJAX_CACHE") or os.path.join("~", ".cache", "gptjax")
  return os.path.abspath(os.path.expanduser(path))


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
