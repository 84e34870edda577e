"""Test files that several processes may write at once."""

import os
import tempfile


def write_text(path, text):
  """Writes `text` to `path` atomically: concurrent runs of one test share their data files, and a
  reader must never see another writer's half-written file."""
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
