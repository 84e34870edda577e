"""Run directories at object-store URLs (`s3://bucket/run`, `gs://bucket/run`, any fsspec URL).

A URL workdir is worked on through a local copy that mirrors the store, and the store stays the
truth:
- `Mirror.pull` makes the local copy equal to the store: every file, and each checkpoint whose
  upload completed; files the store does not hold are removed locally.
- While a run goes, `Mirror.start` uploads in the background: each checkpoint once Orbax has
  committed it locally (Orbax renames a finished step's folder into place), and the run's other
  files (config.json, metrics.jsonl, the tokenizer, samples, eval results) as they change; the
  checkpoints the keep policy deleted locally are deleted from the store.
- `Mirror.close` uploads the rest.

Why a local copy: Orbax (0.12) writes arrays through TensorStore's `file` and `gcs` drivers only
(an `s3://` path is refused as "not absolute"), and appending to metrics.jsonl or renaming a folder
into place has no object-store equivalent. Training, checkpoints and evaluation therefore run
unchanged on local files, and only whole files move.

Atomicity comes from the store: S3 and GCS make each PUT (a multipart upload included) visible whole
or not at all, and give read-after-write consistency. So every file is one PUT, and a checkpoint
is complete when its marker object `<step>/gptjax-uploaded` exists: the marker is uploaded after
all of the step's files and deleted before any of them. A run killed mid-upload leaves a step
without a marker, which `pull` ignores and the next `close` deletes.

Each run directory is mirrored at `$GPTJAX_MIRROR/<scheme>/<bucket>/<path>` (default
`~/.cache/gptjax/mirror`). One process works on a URL workdir: a multi-process run needs a directory
that every process writes (`check_single_process`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from typing import Iterator

from absl import logging

from gptjax.errors import ConfigError

MARKER = "gptjax-uploaded"
RECORD = ".gptjax-synced.json"  # in the local copy: the files known to equal the store's
CHECKPOINTS = "checkpoints"
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


def is_url(path: str | os.PathLike | None) -> bool:
  """True for `scheme://...` paths other than `file://`."""
  text = os.fspath(path) if path else ""
  return "://" in text and not text.startswith("file://")


def local_path(url: str) -> str:
  """Where `url` is mirrored on this machine."""
  scheme, rest = url.rstrip("/").split("://", 1)
  base = os.environ.get("GPTJAX_MIRROR") or os.path.join("~", ".cache", "gptjax", "mirror")
  return os.path.abspath(os.path.join(os.path.expanduser(base), scheme, *rest.split("/")))


def filesystem(url: str, setting: str):
  """The fsspec filesystem of `url` and the path inside it; a clear error when the scheme's package
  is missing or the store cannot be reached."""
  import fsspec  # pylint: disable=import-outside-toplevel

  scheme = url.split("://", 1)[0]
  try:
    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)  # endpoint read now
  except ImportError as e:
    package = _PACKAGES.get(scheme, f"the fsspec package for {scheme}://")
    raise ConfigError(f"{setting}={url}: reading {scheme}:// needs {package}, which is not "
                      f"installed ({e}). Install it: pip install 'gptjax[cloud]'.") from e
  except ValueError as e:
    raise ConfigError(f"{setting}={url}: {e}. Use an fsspec URL such as s3://bucket/run or "
                      "gs://bucket/run.") from e
  bucket = root.strip("/").split("/")[0]
  try:
    fs.invalidate_cache()
    fs.ls(bucket)
  except FileNotFoundError as e:
    raise ConfigError(f"{setting}={url}: the bucket {bucket!r} does not exist ({e}). Create it, "
                      "or fix the URL.") from e
  except Exception as e:  # pylint: disable=broad-except  (any transport or auth failure)
    raise ConfigError(
        f"{setting}={url}: cannot reach the store ({type(e).__name__}: {e}). Check the URL, the "
        "credentials and the endpoint (AWS_ENDPOINT_URL for an S3-compatible server, "
        "STORAGE_EMULATOR_HOST for a GCS emulator).") from e
  return fs, root.rstrip("/")


def check_single_process(url: str, process_count: int) -> None:
  if process_count > 1:
    raise ConfigError(
        f"--workdir={url}: a run of {process_count} processes needs a directory every process "
        "writes (Orbax writes each process's shards of a checkpoint there), and a URL workdir is "
        "worked on through one machine's local copy. Mount the bucket on every host (gcsfuse, "
        "mountpoint-s3) and pass the mount's path, or use a shared filesystem.")


def _step_of(rel: str) -> int | None:
  """The checkpoint step a workdir-relative path belongs to, else None."""
  parts = rel.split("/")
  if len(parts) >= 3 and parts[0] == CHECKPOINTS and parts[1].isdigit():
    return int(parts[1])
  return None


def _is_temporary(rel: str) -> bool:
  """Files that are not the run's: Orbax's staging folders, `*.tmp-*` files being written, and the
  local copy's sync record."""
  return rel == RECORD or any(".orbax-checkpoint-tmp" in p or ".tmp-" in p for p in rel.split("/"))


class Mirror:
  """A local copy of the run directory at `url` (see the module docstring)."""

  def __init__(self, url: str, setting: str = "--workdir", local: str | None = None,
               files_every: float = 60.0):
    self.url = url.rstrip("/")
    self.setting = setting
    self.fs, self.root = filesystem(self.url, setting)
    self.local = local or local_path(self.url)
    self.files_every = files_every  # seconds between uploads of changed non-checkpoint files
    self._sent: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) the store holds
    self._steps: set[int] = set()  # checkpoint steps complete in the store
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._files_sent_at = 0.0
    self.error: BaseException | None = None

  # -- the store -------------------------------------------------------------------------------

  def _remote(self, rel: str) -> str:
    return f"{self.root}/{rel}"

  def _listing(self) -> dict[str, int]:
    """Workdir-relative path -> size of every object under the run."""
    self.fs.invalidate_cache()
    try:
      found = self.fs.find(self.root, detail=True)
    except FileNotFoundError:
      return {}
    prefix = self.root + "/"
    return {p[len(prefix):]: int(info.get("size") or 0) for p, info in found.items()
            if p.startswith(prefix) and info.get("type", "file") != "directory"}

  def pull(self) -> None:
    """Makes the local copy equal to the store (complete checkpoints only).

    Local files that changed since they were last synced (work of a run that stopped before
    uploading it) are not overwritten: the old local copy is moved aside, with one line saying
    where, and the store's contents are downloaded afresh."""
    with self._lock:
      remote = self._listing()
      steps = {s for rel in remote if (s := _step_of(rel)) is not None
               and rel == f"{CHECKPOINTS}/{s}/{MARKER}"}
      wanted = {rel: size for rel, size in remote.items()
                if _step_of(rel) is None or _step_of(rel) in steps}
      synced = self._read_record()
      unsynced = sorted(rel for rel, stamp in self._local_files().items()
                        if synced.get(rel) != stamp)
      if unsynced:
        aside = f"{self.local}.unsynced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(self.local, aside)
        synced = {}
        print(f"gptjax: the local copy of {self.url} held {len(unsynced)} file(s) the store does "
              f"not (e.g. {unsynced[0]}, from a run that stopped before uploading them); moved "
              f"them to {aside} and continuing from the store", flush=True)
      if os.path.isdir(self.local):
        for top, dirs, _ in os.walk(self.local):  # Orbax staging folders of a stopped run
          for d in [d for d in dirs if _is_temporary(d)]:
            shutil.rmtree(os.path.join(top, d), ignore_errors=True)
      os.makedirs(self.local, exist_ok=True)
      self._sent = {}
      for rel in self._local_files():
        if rel not in wanted:  # deleted from the store since
          os.remove(os.path.join(self.local, rel))
      _remove_empty_dirs(self.local)
      for rel, size in sorted(wanted.items()):
        path = os.path.join(self.local, rel)
        if not (rel in synced and os.path.isfile(path) and synced[rel] == _stamp(path)
                and synced[rel][0] == size):
          os.makedirs(os.path.dirname(path), exist_ok=True)
          self.fs.get_file(self._remote(rel), path + ".tmp-pull")
          os.replace(path + ".tmp-pull", path)
        self._sent[rel] = _stamp(path)
      self._steps = steps
      self._write_record()
    logging.info("pulled %s into %s (%d files, checkpoints %s)", self.url, self.local,
                 len(wanted), sorted(steps))

  def _read_record(self) -> dict[str, tuple[int, int]]:
    try:
      with open(os.path.join(self.local, RECORD), encoding="utf-8") as f:
        return {rel: tuple(v) for rel, v in json.load(f).items()}
    except (FileNotFoundError, ValueError):
      return {}

  def _write_record(self) -> None:
    """Saves which local files equal the store's (what `pull` may keep without downloading)."""
    path = os.path.join(self.local, RECORD)
    with open(path + ".tmp-record", "w", encoding="utf-8") as f:
      json.dump(self._sent, f)
    os.replace(path + ".tmp-record", path)

  def push(self, delete_steps: bool = True, files: bool = True) -> None:
    """Uploads committed checkpoints not yet in the store, then (if `files`) every other changed
    file; with `delete_steps`, deletes the store's checkpoints that are gone locally."""
    with self._lock:
      local = self._local_files()
      committed = self._committed_steps()
      for step in sorted(committed - self._steps):
        self._upload_step(step, local)
      if files:
        for rel in sorted(local):
          if _step_of(rel) is None and self._sent.get(rel) != local[rel]:
            with contextlib.suppress(FileNotFoundError):  # gone since the listing: next time
              self._put(rel, local[rel])
        self._files_sent_at = time.monotonic()
      if delete_steps:
        for step in sorted(self._steps - committed):
          self._delete_step(step)
      self._write_record()

  def _upload_step(self, step: int, local: dict[str, tuple[int, int]]) -> None:
    prefix = f"{CHECKPOINTS}/{step}/"
    rels = [rel for rel in local if rel.startswith(prefix) and not rel.endswith(MARKER)]
    try:
      for rel in sorted(rels):
        self._put(rel, local[rel])
    except FileNotFoundError:  # the keep policy deleted the step while it uploaded: drop it
      logging.info("checkpoint %d was deleted locally while uploading; not uploaded", step)
      return
    with self.fs.open(self._remote(prefix + MARKER), "wb") as f:
      f.write(b"complete\n")
    self._steps.add(step)
    logging.info("uploaded checkpoint %d to %s", step, self.url)

  def _delete_step(self, step: int) -> None:
    prefix = self._remote(f"{CHECKPOINTS}/{step}")
    self.fs.rm_file(f"{prefix}/{MARKER}")  # first: from now on no reader takes it as complete
    self.fs.invalidate_cache()
    with contextlib.suppress(FileNotFoundError):
      self.fs.rm(prefix, recursive=True)
    self._steps.discard(step)
    for rel in [r for r in self._sent if _step_of(r) == step]:
      del self._sent[rel]

  def _put(self, rel: str, stamp: tuple[int, int]) -> None:
    self.fs.put_file(os.path.join(self.local, rel), self._remote(rel))
    self._sent[rel] = stamp

  # -- the local copy --------------------------------------------------------------------------

  def _local_files(self) -> dict[str, tuple[int, int]]:
    """Workdir-relative path -> (size, mtime_ns) of every finished local file."""
    out = {}
    for top, dirs, names in os.walk(self.local):
      rel_top = os.path.relpath(top, self.local).replace(os.sep, "/")
      dirs[:] = [d for d in dirs if not _is_temporary(d)]
      for name in names:
        rel = name if rel_top == "." else f"{rel_top}/{name}"
        if not _is_temporary(rel):
          with contextlib.suppress(FileNotFoundError):
            out[rel] = _stamp(os.path.join(self.local, rel))
    return out

  def _committed_steps(self) -> set[int]:
    folder = os.path.join(self.local, CHECKPOINTS)
    if not os.path.isdir(folder):
      return set()
    return {int(n) for n in os.listdir(folder) if n.isdigit()
            and os.path.isdir(os.path.join(folder, n))}

  # -- background uploads ----------------------------------------------------------------------

  def start(self, every: float = 1.0, delete_steps: bool = True) -> None:
    """Uploads in a background thread: checkpoints within `every` seconds of their commit, other
    files at most every `files_every` seconds (and along with each checkpoint)."""
    def loop():
      while not self._stop.wait(every):
        try:
          committed = self._committed_steps()  # a listdir: the whole tree is walked only when
          new_step = bool(committed - self._steps)  # there is something to upload or delete
          due = time.monotonic() - self._files_sent_at >= self.files_every
          dropped = delete_steps and bool(self._steps - committed)
          if new_step or due or dropped:
            self.push(delete_steps=delete_steps, files=new_step or due)
          self.error = None
        except Exception as e:  # pylint: disable=broad-except  (retried; close() raises it)
          if self.error is None:
            logging.warning("uploading to %s failed (%s); retrying", self.url, e)
            print(f"gptjax: WARNING: uploading to {self.url} failed ({type(e).__name__}: {e});"
                  " retrying, and the local copy keeps everything", flush=True)
          self.error = e

    self._thread = threading.Thread(target=loop, name="gptjax-upload", daemon=True)
    self._thread.start()

  def close(self, delete_steps: bool = True) -> None:
    """Stops the background uploads and uploads everything left."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      self.push(delete_steps=delete_steps)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"{self.setting}={self.url}: the last upload failed ({type(e).__name__}: "
                        f"{e}). Everything is in the local copy {self.local}; run the same "
                        "command again to resume, which uploads it.") from e


@contextlib.contextmanager
def mirrored(path: str, setting: str = "--workdir", background: bool = False,
             delete_steps: bool = True, upload: bool = True) -> Iterator[str]:
  """Yields a local directory for `path`: `path` itself unless it is a URL, else its pulled local
  copy, uploaded when the block ends (also when it raises: logs are never lost) and, with
  `background`, while it runs. `upload=False` only reads; `delete_steps=False` never deletes a
  checkpoint from the store (evaluation, conversion)."""
  if not is_url(path):
    yield path
    return
  mirror = Mirror(path, setting)
  mirror.pull()
  print(f"gptjax: {setting}={mirror.url} is worked on through its local copy {mirror.local}"
        + ("; files upload as they are written" if upload else ""), flush=True)
  if background and upload:
    mirror.start(delete_steps=delete_steps)
  try:
    yield mirror.local
  finally:
    if upload:
      mirror.close(delete_steps=delete_steps)


def readable(path: str, setting: str = "--workdir") -> str:
  """`path` itself, or for a URL its local copy, pulled now (for reading only: nothing is uploaded
  back)."""
  if not is_url(path):
    return path
  mirror = Mirror(path, setting)
  mirror.pull()
  print(f"gptjax: reading {setting}={mirror.url} from its local copy {mirror.local}", flush=True)
  return mirror.local


def pull_complete(url: str, local: str, marker: str, setting: str,
                  only: list[str] | None = None) -> bool:
  """Downloads the objects under `url` (or just the names `only`) into the folder `local`, if the
  object `url/marker` exists: a complete upload writes it last (`push_complete`). Locally too the
  marker lands last, so a reader that checks for it sees everything. False if it is absent."""
  fs, root = filesystem(url, setting)
  if not fs.exists(f"{root}/{marker}"):
    return False
  rels = only if only is not None else [p[len(root) + 1:] for p in fs.find(root)]
  for rel in sorted(rels, key=lambda r: r == marker):
    target = os.path.join(local, rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fs.get_file(f"{root}/{rel}", target + ".tmp-pull")
    os.replace(target + ".tmp-pull", target)
  return True


def push_complete(local: str, url: str, marker: str, setting: str,
                  only: list[str] | None = None) -> None:
  """Uploads the files of the folder `local` (or just the names `only`) to `url`, `marker` last."""
  fs, root = filesystem(url, setting)
  rels = only if only is not None else [
      os.path.relpath(os.path.join(d, n), local).replace(os.sep, "/")
      for d, _, names in os.walk(local) for n in names]
  for rel in sorted(rels, key=lambda r: r == marker):
    fs.put_file(os.path.join(local, rel), f"{root}/{rel}")


def fetch(url: str, setting: str) -> str:
  """A local copy of the file or folder at `url` (tokenizer files; downloaded on every call)."""
  fs, root = filesystem(url, setting)
  local = local_path(url)
  try:
    found = fs.find(root, detail=True, withdirs=False)
  except FileNotFoundError:
    found = {}
  if not found:
    raise ConfigError(f"{setting}={url}: no such file or folder in the store.")
  for path in found:
    rel = path[len(root):].lstrip("/")
    target = os.path.join(local, rel) if rel else local
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fs.get_file(path, target + ".tmp-pull")
    os.replace(target + ".tmp-pull", target)
  return local


def _stamp(path: str) -> tuple[int, int]:
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def _remove_empty_dirs(top: str) -> None:
  for folder, dirs, names in os.walk(top, topdown=False):
    if folder != top and not dirs and not names:
      with contextlib.suppress(OSError):
        os.rmdir(folder)


def remove_local(url: str) -> None:
  """Deletes the local copy of `url` (the store keeps everything)."""
  shutil.rmtree(local_path(url), ignore_errors=True)
