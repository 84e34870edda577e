"""Where documents come from: the embedded corpus, local files, a prepared TFDS dataset, or
Hugging Face `datasets` (`hf_source.py`).

`open_corpus(cfg.data)` checks the settings up front (paths exist, globs match, the TFDS dataset is
prepared) and returns a `Corpus`. `Corpus.documents()` then yields `(split, text)` pairs in a fixed
order, with validation documents held out whole: a document is never split between train and val.

    corpus = sources.open_corpus(cfg.data)
    for split, text in corpus.documents():  # split is sources.TRAIN or sources.VAL
      ...
"""

from collections.abc import Callable, Iterable, Iterator
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import re
import sys
import sysconfig
from typing import Any

import ml_collections
import numpy as np

from gptjax.data.errors import fail

TRAIN, VAL = "train", "val"
SOURCES = ("embedded", "files", "tfds", "hf")
FILE_TYPES = (".txt", ".jsonl", ".parquet")
TXT_SPLITS = ("file", "blank_line")
# Bump when the embedded recipe changes, so caches keyed on it are rebuilt.
EMBEDDED_VERSION = 1
# Directories of the standard library that are not its own source, or duplicate other documents.
_EMBEDDED_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "pydoc_data"})
_BLANK_LINE = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # one or more blank lines


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A source of documents with its train/val split.

  Attributes:
    setting: the config key naming this source, used in error messages (e.g. 'data.paths').
    fingerprint: JSON-serialisable identity of the documents (source and split settings, file
      sizes and times, Python or dataset version); caches are keyed on it.
    approx_chars: rough size in characters where known cheaply (for progress and sampling), else 0.
  """

  setting: str
  fingerprint: dict[str, Any]
  approx_chars: int
  _documents: Callable[[], Iterator[tuple[str, str]]]
  # Reads one split alone, where a source can (its val split without the train split first).
  _split_texts: Callable[[str], Iterator[str]] | None = None

  def documents(self) -> Iterator[tuple[str, str]]:
    """Yields `(split, text)` for every non-empty document, in a fixed order."""
    return self._documents()

  def texts(self, split: str) -> Iterator[str]:
    """Yields the texts of one split (`TRAIN` or `VAL`) in order."""
    if self._split_texts is not None:
      return self._split_texts(split)
    return (text for s, text in self.documents() if s == split)


def embedded_files() -> list[tuple[str, int]]:
  """The embedded corpus's items: pydoc topic names and standard-library `.py` paths, with sizes.

  Every Python install has both (`pydoc_data.topics` and the sources under
  `sysconfig.get_paths()['stdlib']`), so the corpus needs no download. Files are listed in sorted
  path order (site-packages and caches skipped), then interleaved by a fixed permutation so that any
  prefix (such as the tokenizer's training sample) mixes prose and code from the whole library.

  Returns:
    `(item, size)` pairs in corpus order: `item` is 'topic:<name>' or a file path.
  """
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel

  items = [(f"topic:{k}", len(topics.topics[k])) for k in sorted(topics.topics)]
  for root, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
    dirs[:] = sorted(d for d in dirs if d not in _EMBEDDED_SKIP_DIRS)
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        items.append((path, os.path.getsize(path)))
  order = np.random.default_rng(0).permutation(len(items))
  return [items[i] for i in order]


def embedded_documents() -> Iterator[str]:
  """The texts of `embedded_files()`, skipping the few test files deliberately not in UTF-8."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel

  for item, _ in embedded_files():
    if item.startswith("topic:"):
      yield topics.topics[item.removeprefix("topic:")]
      continue
    try:
      with open(item, encoding="utf-8") as f:
        yield f.read()
    except UnicodeDecodeError:
      continue


def open_corpus(d: ml_collections.ConfigDict) -> Corpus:
  """Checks the source settings of `cfg.data` and returns its corpus.

  Args:
    d: the `data` section of the config.

  Returns:
    The corpus; nothing is read beyond what the checks need.

  Raises:
    DataError: a setting is invalid (unknown source, missing path, glob matching nothing, unknown or
      unprepared TFDS dataset, Hugging Face dataset that cannot be loaded, ...); the message names
      the setting and how to fix it.
  """
  if d.source not in SOURCES:
    raise fail("data.source", f"unknown source {d.source!r}", f"Use one of {SOURCES}.")
  if not 0.0 <= d.val_fraction < 1.0:
    raise fail("data.val_fraction", f"must be in [0, 1), got {d.val_fraction}",
               "Hold out e.g. 0.01 of the documents.")
  if d.max_docs < 0:
    raise fail("data.max_docs", f"must be >= 0, got {d.max_docs}", "Use 0 for all documents.")
  # Read settings now: the documents must match the fingerprint even if `d` changes later.
  max_docs, val_fraction, text_key = d.max_docs, d.val_fraction, d.text_key
  held_out = {"val_fraction": val_fraction, "max_docs": max_docs}

  if d.source == "hf":
    from gptjax.data import hf_source  # pylint: disable=import-outside-toplevel  (datasets if used)
    hf = hf_source.open_source(d)
    read = lambda split: _limit(hf.texts(split), max_docs)
    if hf.spec.val_split:
      documents = lambda: itertools.chain(((TRAIN, t) for t in read(TRAIN)),
                                          ((VAL, t) for t in read(VAL)))
      return Corpus(hf.spec.setting, hf.fingerprint, hf.approx_chars, documents, read)
    return Corpus(hf.spec.setting, hf.fingerprint, hf.approx_chars,
                  lambda: _hold_out(read(TRAIN), val_fraction))

  if d.source == "embedded":
    items = embedded_files()
    listing = hashlib.sha256(json.dumps(items).encode()).hexdigest()
    fingerprint = {"source": "embedded", "recipe": EMBEDDED_VERSION, "python": sys.version,
                   "files": listing, **held_out}
    return Corpus("data.source", fingerprint, sum(size for _, size in items),
                  lambda: _hold_out(_limit(embedded_documents(), max_docs), val_fraction))

  if d.source == "files":
    files = expand_paths(d.paths)
    if d.txt_split not in TXT_SPLITS:
      raise fail("data.txt_split", f"unknown value {d.txt_split!r}", f"Use one of {TXT_SPLITS}.")
    if any(f.endswith(".parquet") for f in files):
      _require_pyarrow(files)
    sizes = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    txt_split = d.txt_split
    fingerprint = {"source": "files", "files": sizes, "text_key": text_key,
                   "txt_split": txt_split, **held_out}
    read = lambda: _limit(_file_documents(files, text_key, txt_split), max_docs)
    return Corpus("data.paths", fingerprint, sum(size for _, size, _ in sizes),
                  lambda: _hold_out(read(), val_fraction))

  builder = _tfds_builder(d)
  fingerprint = {"source": "tfds", "name": d.tfds_name, "version": str(builder.info.version),
                 "data_dir": d.tfds_data_dir, "train": d.tfds_train_split,
                 "val": d.tfds_val_split, "text_key": text_key, **held_out}
  splits = {s: _tfds_split(builder, d, key) for s, key in
            ((TRAIN, "tfds_train_split"), (VAL, "tfds_val_split")) if d[key]}
  read = lambda split: _limit(_tfds_texts(splits[split], text_key), max_docs)
  if VAL in splits:
    documents = lambda: itertools.chain(((TRAIN, t) for t in read(TRAIN)),
                                        ((VAL, t) for t in read(VAL)))
  else:
    documents = lambda: _hold_out(read(TRAIN), val_fraction)
  return Corpus("data.tfds_name", fingerprint, 0, documents)


def _limit(docs: Iterable[str], max_docs: int) -> Iterator[str]:
  """The first `max_docs` non-empty documents (all if 0)."""
  docs = (t for t in docs if t.strip())
  return itertools.islice(docs, max_docs) if max_docs else iter(docs)


def _hold_out(docs: Iterable[str], val_fraction: float) -> Iterator[tuple[str, str]]:
  """Tags documents train or val by systematic sampling: floor(n * f) val documents, evenly spread.

  Document i is val when the running total i * f crosses an integer, so the split is deterministic,
  streaming, and never depends on anything but the document's position.
  """
  for i, text in enumerate(docs):
    yield (VAL if int((i + 1) * val_fraction) > int(i * val_fraction) else TRAIN), text


# ---- local files --------------------------------------------------------------------------------
def expand_paths(paths: str) -> list[str]:
  """Expands the comma-separated globs of `data.paths` into sorted, de-duplicated files.

  Raises:
    DataError: the setting is empty, a plain path does not exist or is a directory, a glob matches
      no files, or a file has an unsupported extension.
  """
  patterns = [p.strip() for p in paths.split(",") if p.strip()]
  if not patterns:
    raise fail("data.paths", "is empty but data.source='files'",
               "Set it to comma-separated globs, e.g. "
               "--config.data.paths='corpus/*.txt,web/**/*.jsonl'.")
  files = []
  for pattern in patterns:
    path = os.path.expanduser(pattern)
    if any(c in path for c in "*?["):
      matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
      if not matches:
        raise fail("data.paths", f"the glob {pattern!r} matches no files (cwd: {os.getcwd()})",
                   "Fix the pattern; relative globs are relative to the working directory.")
    elif not os.path.exists(path):
      raise fail("data.paths", f"{pattern!r} does not exist (cwd: {os.getcwd()})",
                 "Name existing files or globs, separated by commas.")
    elif os.path.isdir(path):
      raise fail("data.paths", f"{pattern!r} is a directory",
                 f"Name its files with a glob, e.g. '{os.path.join(pattern, '*.txt')}'.")
    else:
      matches = [path]
    for m in matches:
      if os.path.splitext(m)[1] not in FILE_TYPES:
        raise fail("data.paths", f"{m!r} is not a {'/'.join(FILE_TYPES)} file",
                   "Narrow the glob to supported files, e.g. '*.jsonl'.")
    files.extend(matches)
  return list(dict.fromkeys(files))


def _require_pyarrow(files: list[str]) -> None:
  try:
    # pylint: disable-next=import-outside-toplevel,unused-import
    import pyarrow.parquet  # noqa: F401 (only checks that Parquet support is installed)
  except ImportError as e:
    first = next(f for f in files if f.endswith(".parquet"))
    raise fail("data.paths", f"{first!r} is a Parquet file but pyarrow is not installed",
               "pip install pyarrow, or convert the data to .jsonl.") from e


def _file_documents(files: list[str], text_key: str, txt_split: str) -> Iterator[str]:
  for path in files:
    ext = os.path.splitext(path)[1]
    if ext == ".txt":
      yield from _txt_documents(path, txt_split)
    elif ext == ".jsonl":
      yield from _jsonl_documents(path, text_key)
    else:
      yield from _parquet_documents(path, text_key)


def _txt_documents(path: str, txt_split: str) -> Iterator[str]:
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise fail("data.paths", f"{path!r} is not UTF-8 text ({e.reason} at byte {e.start})",
               "Re-encode it as UTF-8 or leave it out of the globs.") from e
  if txt_split == "file":
    yield text
  else:
    yield from _BLANK_LINE.split(text)


def _jsonl_documents(path: str, text_key: str) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise fail("data.paths", f"{path}:{lineno} is not valid JSON ({e.msg})",
                   "Each line of a .jsonl file must be one JSON object.") from e
      if not isinstance(record, dict) or text_key not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise fail("data.text_key", f"{path}:{lineno} has no field {text_key!r} (it has {fields})",
                   "Set data.text_key to the field holding the text, or fix the record.")
      text = record[text_key]
      if not isinstance(text, str):
        raise fail("data.text_key", f"{path}:{lineno} field {text_key!r} is a "
                   f"{type(text).__name__}, not a string", "Point data.text_key at a text field.")
      yield text


def _parquet_documents(path: str, text_key: str) -> Iterator[str]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  parquet = pq.ParquetFile(path)
  columns = parquet.schema_arrow.names
  if text_key not in columns:
    raise fail("data.text_key", f"{path!r} has no column {text_key!r} (it has {columns})",
               "Set data.text_key to the column holding the text.")
  for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
    yield from (t for t in batch.column(0).to_pylist() if t is not None)


# ---- TFDS ---------------------------------------------------------------------------------------
def _tfds_builder(d: ml_collections.ConfigDict):
  """The prepared TFDS builder named by `data.tfds_name`; never downloads."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  if not d.tfds_name:
    raise fail("data.tfds_name", "is empty but data.source='tfds'",
               "Name a prepared dataset, e.g. --config.data.tfds_name=lm1b.")
  where = d.tfds_data_dir or "the TFDS default data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  try:
    builder = tfds.builder(d.tfds_name, data_dir=d.tfds_data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise fail("data.tfds_name", f"TFDS knows no dataset {d.tfds_name!r} (looked in {where})",
               "Check the name (e.g. 'lm1b', 'c4/en:3.1.0') and data.tfds_data_dir.") from e
  if not builder.is_prepared():
    raise fail("data.tfds_name", f"dataset {d.tfds_name!r} is not prepared in {where}",
               f"Prepare it once with `tfds build {d.tfds_name} --file_format=array_record` "
               "(set data.tfds_data_dir to its --data_dir); training never downloads.")
  if builder.info.file_format.value not in ("array_record", "parquet"):
    raise fail("data.tfds_name", f"dataset {d.tfds_name!r} is stored as "
               f"{builder.info.file_format.value}, which has no random access",
               "Rebuild it with `tfds build ... --file_format=array_record`.")
  return builder


def _tfds_split(builder, d: ml_collections.ConfigDict, key: str):
  """The random-access source of the split named by `data.<key>`."""
  name = d[key].split("[")[0]
  splits = sorted(builder.info.splits)
  if name not in splits:
    fix = "Choose one of these." + (" Set data.tfds_val_split='' to hold out val_fraction of the "
                                    "train split instead." if key == "tfds_val_split" else "")
    raise fail(f"data.{key}", f"dataset {d.tfds_name!r} has no split {name!r} (it has {splits})",
               fix)
  source = builder.as_data_source(split=d[key])
  features = builder.info.features
  if d.text_key not in features:
    raise fail("data.text_key", f"dataset {d.tfds_name!r} has no feature {d.text_key!r} "
               f"(it has {sorted(features)})", "Set data.text_key to the text feature.")
  return source


def _tfds_texts(source, text_key: str, chunk: int = 1024) -> Iterator[str]:
  for start in range(0, len(source), chunk):
    for record in source.__getitems__(range(start, min(start + chunk, len(source)))):
      text = record[text_key]
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
