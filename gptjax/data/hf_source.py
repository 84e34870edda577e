"""Hugging Face `datasets` as a source (`data.source='hf'`), read whole or streamed.

Documents come from `datasets.load_dataset`: local files (`data.hf_files`, comma-separated globs of
.parquet, .json/.jsonl or .arrow files; the builder is picked by extension) or a dataset name
(`data.hf_name`, `data.hf_config`) resolved by `datasets` itself (offline only from its cache).
Training reads `data.hf_train_split`; validation reads `data.hf_val_split` (files:
`data.hf_val_files`) or, when that is empty, holds out `data.val_fraction` of the train documents.

- Read whole (the default), `sources.open_corpus(d)` makes a `Corpus` of `open_source(d)`: the
  token cache, mixtures and everything downstream work as for the other sources.
- Streamed (`data.hf_streaming`), for corpora larger than the disk, there is no token cache:
  `StreamedBatches` reads the split as an `IterableDataset`, tokenizes it on the fly and packs it
  into windows of seq_len + 1 tokens exactly as the cache path does (each document followed by
  EOS, concatenated, cut into consecutive windows; the tail shorter than a window is dropped), in
  stream order or shuffled in seeded blocks of `data.hf_shuffle_buffer` windows. Global batch k is
  windows [k * B, (k + 1) * B) of that sequence, and every host reads the whole stream and keeps its
  `rows` of each batch, so a host's batches are those rows of a single-host run's.

Exact resume. A position in the stream is (the `IterableDataset.state_dict()` after the record
before document j, j, a token offset t into document j's tokens). `datasets` records its state
after every record it yields (shard, record in the shard and, for Arrow-backed builders, the chunk
of the table) and `load_state_dict` restarts at the record after it, so the state before each
document is captured as it is read (a copy of a few small dicts). Resuming loads that state,
re-reads and re-tokenizes document j (tokenization is deterministic) and drops its first t tokens:
the iterator state is a small JSON dict however long the documents, and no token is stored. The
shuffle is a block shuffle, not a reservoir: windows are permuted within consecutive blocks of S
windows by a permutation drawn from (seed, epoch, block), so the state is the position of the
current block's start plus how many of its windows were used; resuming re-reads that one block. A
reservoir buffer's state would be its contents (S windows of tokens in every checkpoint), and
counting documents to skip them again would re-read the stream from its start on every resume.
"""

from collections.abc import Callable, Iterator, Sequence
import collections
import copy
import dataclasses
import glob
import os
from typing import Any, Protocol

import grain
import ml_collections
import numpy as np

from gptjax.data.errors import fail

# The splits as `sources.TRAIN` / `sources.VAL` name them (`sources` imports this module).
TRAIN, VAL = "train", "val"
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
_FILE_SPLITS = ("train", "validation")  # what `data_files` calls the splits of hf_files
_CHUNK_DOCS, _CHUNK_CHARS = 256, 1 << 20  # documents read ahead and tokenized in one call
STATE_VERSION = 1


class Encoder(Protocol):
  """What streaming needs of a tokenizer (any `gptjax.data.tokenizer.Tokenizer`)."""

  eos_id: int

  def encode(self, text: str) -> list[int]: ...
  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


@dataclasses.dataclass(frozen=True)
class Spec:
  """The checked settings of an 'hf' source.

  Attributes:
    name: the dataset name (`data.hf_name`), or the builder of `files` ('parquet', 'json', ...).
    config: the dataset's config ('' = its default).
    files: the train files (`data.hf_files` expanded); empty when reading a named dataset.
    val_files: the val files (`data.hf_val_files` expanded).
    train_split, val_split: the splits read ('' val = hold out `val_fraction` of train).
    text_key, max_docs, val_fraction: as in `data`.
    cache_dir: `datasets`' cache folder ('' = its default).
    streaming: read as an `IterableDataset`, without a token cache.
    shuffle_buffer: streamed train windows are shuffled in blocks of this many (0 = in order).
  """

  name: str
  config: str
  files: tuple[str, ...]
  val_files: tuple[str, ...]
  train_split: str
  val_split: str
  text_key: str
  max_docs: int
  val_fraction: float
  cache_dir: str
  streaming: bool
  shuffle_buffer: int

  @property
  def setting(self) -> str:
    """The setting that names the data, for errors about loading it."""
    return "data.hf_files" if self.files else "data.hf_name"

  @property
  def what(self) -> str:
    if self.files:
      return f"the {self.name} files of data.hf_files"
    return f"the dataset {self.name!r}" + (f" (config {self.config!r})" if self.config else "")

  def split(self, split: str) -> str:
    """The `datasets` split read for `TRAIN` or `VAL`."""
    return self.train_split if split == TRAIN else self.val_split


def streaming(d: ml_collections.ConfigDict) -> bool:
  """Whether `d` reads one streamed source (`data.source='hf'` with `data.hf_streaming`, and no
  `data.mixture`, whose sources are read at random: `refuse_streaming` checks them)."""
  return (d.get("source") == "hf" and bool(d.get("hf_streaming", False))
          and not d.get("mixture"))


def refuse_streaming(d: ml_collections.ConfigDict, setting: str = "data") -> None:
  """Raises a DataError when `d` is streamed: it has no token cache to read at random.

  Args:
    d: the settings of one source.
    setting: what names them in errors ('data', or 'data.mixture.<name>').
  """
  if streaming(d):
    why = ("a mixture reads its sources at random" if setting.startswith("data.mixture.")
           else "this reads a token cache, which a streamed source does not have")
    raise fail(f"{setting}.hf_streaming", f"is True but {why}",
               "Set hf_streaming=False to tokenize the source into the cache, or read the stream "
               "alone (no data.mixture) with pipeline.make / make_eval.")


def resolve(d: ml_collections.ConfigDict) -> Spec:
  """Checks the 'hf' settings of `d` (names, globs, splits, extensions); loads nothing.

  Raises:
    DataError: a setting is missing, contradicts another, or names files that do not exist or
      have no `datasets` builder; the message names the setting.
  """
  if d.hf_files and d.hf_name:
    raise fail("data.hf_files", "and data.hf_name are both set",
               "Set one: local files (hf_files) or a dataset name (hf_name).")
  if not (d.hf_files or d.hf_name):
    raise fail("data.hf_name", "is empty and so is data.hf_files, but data.source='hf'",
               "Name a dataset (e.g. --config.data.hf_name=wikitext --config.data.hf_config="
               "wikitext-103-raw-v1) or local files (--config.data.hf_files='data/*.parquet').")
  if d.hf_shuffle_buffer < 0:
    raise fail("data.hf_shuffle_buffer", f"must be >= 0, got {d.hf_shuffle_buffer}",
               "Use 0 for stream order.")
  if d.hf_files:
    for key, default in (("hf_config", ""), ("hf_val_split", ""), ("hf_train_split", "train")):
      if d[key] != default:
        raise fail(f"data.{key}", f"is {d[key]!r} but applies to data.hf_name, not data.hf_files",
                   f"Set it to {default!r}" + (", and give the val files in data.hf_val_files."
                                                if key == "hf_val_split" else "."))
    files = _expand(d.hf_files, "data.hf_files")
    val_files = _expand(d.hf_val_files, "data.hf_val_files") if d.hf_val_files else []
    kinds = sorted({BUILDERS[os.path.splitext(f)[1]] for f in files + val_files})
    if len(kinds) > 1:
      raise fail("data.hf_val_files" if d.hf_val_files else "data.hf_files",
                 f"mixes {' and '.join(kinds)} files", "Use one format per source (or a "
                 "data.mixture with one source per format).")
    name, train, val = kinds[0], _FILE_SPLITS[0], _FILE_SPLITS[1] if val_files else ""
  else:
    if d.hf_val_files:
      raise fail("data.hf_val_files", "applies to data.hf_files, not data.hf_name",
                 "Name the dataset's val split in data.hf_val_split instead.")
    if not d.hf_train_split:
      raise fail("data.hf_train_split", "is empty", "Name the split to train on, e.g. 'train'.")
    files, val_files, name, train, val = [], [], d.hf_name, d.hf_train_split, d.hf_val_split
  if d.hf_streaming and not val:
    raise fail("data.hf_val_files" if d.hf_files else "data.hf_val_split",
               "is empty but data.hf_streaming=True: held-out documents sampled from a stream "
               "would be read again as training data",
               "Give the val files in data.hf_val_files." if d.hf_files else
               "Name the dataset's val split, e.g. 'validation'.")
  return Spec(name=name, config=d.hf_config, files=tuple(files), val_files=tuple(val_files),
              train_split=train, val_split=val, text_key=d.text_key, max_docs=int(d.max_docs),
              val_fraction=float(d.val_fraction), cache_dir=d.hf_cache_dir,
              streaming=bool(d.hf_streaming), shuffle_buffer=int(d.hf_shuffle_buffer))


def _expand(globs: str, setting: str) -> list[str]:
  """Comma-separated globs -> sorted, de-duplicated files with a builder for their extension."""
  out = []
  for pattern in (p.strip() for p in globs.split(",") if p.strip()):
    path = os.path.expanduser(pattern)
    if any(c in path for c in "*?["):
      matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
      if not matches:
        raise fail(setting, f"the glob {pattern!r} matches no files (cwd: {os.getcwd()})",
                   "Fix the pattern; relative globs are relative to the working directory.")
    elif not os.path.isfile(path):
      raise fail(setting, f"{pattern!r} is not a file (cwd: {os.getcwd()})",
                 "Name existing files or globs, separated by commas.")
    else:
      matches = [path]
    for m in matches:
      if os.path.splitext(m)[1] not in BUILDERS:
        raise fail(setting, f"{m!r} has no datasets builder for its extension",
                   f"Use {'/'.join(BUILDERS)} files (the builders {sorted(set(BUILDERS.values()))})"
                   ", or narrow the glob.")
    out.extend(matches)
  if not out:
    raise fail(setting, "names no files", "Set it to comma-separated globs, e.g. 'data/*.parquet'.")
  return list(dict.fromkeys(out))


def _datasets():
  """The `datasets` module, imported when first needed."""
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise fail("data.source", "'hf' reads with the datasets package, which is not installed",
               "pip install 'gptjax[hf]' (or 'datasets>=2.19').") from e
  return datasets


def _load(spec: Spec, streaming_: bool) -> dict[str, Any]:
  """The splits read, by `TRAIN` / `VAL`: `Dataset`s, or `IterableDataset`s when
  `streaming_` (opened, nothing read)."""
  datasets = _datasets()
  kwargs = {"streaming": streaming_, "cache_dir": spec.cache_dir or None}
  try:
    if spec.files:
      files = {_FILE_SPLITS[0]: list(spec.files)}
      if spec.val_files:
        files[_FILE_SPLITS[1]] = list(spec.val_files)
      loaded = datasets.load_dataset(spec.name, data_files=files, **kwargs)
    else:
      loaded = datasets.load_dataset(spec.name, spec.config or None, **kwargs)
  except Exception as e:  # missing, unreachable offline, unreadable: all a setting to fix
    raise fail(spec.setting, f"datasets cannot load {spec.what}: {type(e).__name__}: {e}",
               "Check the name, config and data.hf_cache_dir (offline, only datasets already in "
               "the local cache load)." if not spec.files else
               "Check that the files are readable and in the format their extension says.") from e
  out = {}
  for split, key in ((TRAIN, "hf_train_split"), (VAL, "hf_val_split")):
    name = spec.split(split)
    if not name:
      continue
    if name not in loaded:
      raise fail(f"data.{key}", f"{spec.what} has no split {name!r} (it has {sorted(loaded)})",
                 "Choose one of these." + (" Set data.hf_val_split='' to hold out val_fraction "
                                           "of the train split instead." if key ==
                                           "hf_val_split" and not spec.streaming else ""))
    out[split] = loaded[name]
  return out


def _missing_column(what: str, text_key: str, columns: Sequence[str]) -> Exception:
  return fail("data.text_key", f"{what} has no column {text_key!r} (it has {sorted(columns)})",
              "Set data.text_key to the column holding the text.")


def _text(value: Any, what: str, text_key: str) -> str | None:
  if value is None or isinstance(value, str):
    return value
  raise fail("data.text_key", f"{what}: column {text_key!r} holds a {type(value).__name__}, not "
             "text", "Point data.text_key at a text column.")


# ---- read whole ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Opened:
  """An opened 'hf' source, which `sources.open_corpus` makes a `Corpus` of.

  Attributes:
    spec: its checked settings.
    fingerprint: JSON-serialisable identity of its documents: 'hf', the name or builder, config,
      files with sizes and times (else the dataset's `_fingerprint`, or streamed its builder's
      `hash`), splits, text key, held-out settings and `datasets.__version__`.
    approx_chars: the files' size in bytes (0 for a named dataset).
    texts: `texts(split)` yields the texts of `TRAIN` or of a named `VAL` split in order (null
      values left out; empty documents and `max_docs` are the `Corpus`'s to apply).
  """

  spec: Spec
  fingerprint: dict[str, Any]
  approx_chars: int
  texts: Callable[[str], Iterator[str]]


def open_source(d: ml_collections.ConfigDict) -> Opened:
  """Checks an 'hf' source's settings and opens it (`sources.open_corpus` calls this).

  Files are read when the documents are (their sizes and times identify them); a named dataset is
  loaded now (its `_fingerprint` identifies it) or, streamed, resolved by
  `datasets.load_dataset_builder` (its `hash`: the revision or files it reads).

  Raises:
    DataError: a bad setting (see `resolve`), or a named dataset that cannot be loaded.
  """
  spec = resolve(d)
  fingerprint: dict[str, Any] = {
      "source": "hf", "name": spec.name, "config": spec.config, "train": spec.train_split,
      "val": spec.val_split, "text_key": spec.text_key, "datasets": _datasets().__version__,
      "val_fraction": spec.val_fraction, "max_docs": spec.max_docs}
  approx_chars = 0
  if spec.files:
    stat = lambda fs: [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in fs]
    fingerprint.update(files=stat(spec.files), val_files=stat(spec.val_files))
    approx_chars = sum(os.path.getsize(f) for f in spec.files + spec.val_files)
  if spec.streaming:
    if not spec.files:
      fingerprint["hash"] = _builder_hash(spec)
    return Opened(spec, fingerprint, approx_chars, lambda split: _Reader(spec, split).documents())
  loaded = None if spec.files else _load(spec, streaming_=False)
  if loaded:
    # pylint: disable-next=protected-access
    fingerprint["fingerprints"] = {s: ds._fingerprint for s, ds in loaded.items()}
  opened = lambda: loaded or _load(spec, streaming_=False)
  return Opened(spec, fingerprint, approx_chars,
                lambda split: _dataset_texts(opened()[split], spec, split))


def _builder_hash(spec: Spec) -> str:
  try:
    builder = _datasets().load_dataset_builder(spec.name, spec.config or None,
                                               cache_dir=spec.cache_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise fail("data.hf_name", f"datasets cannot load {spec.what}: {type(e).__name__}: {e}",
               "Check the name, config and data.hf_cache_dir (offline, only datasets already in "
               "the local cache load).") from e
  return str(builder.hash)


def _dataset_texts(ds, spec: Spec, split: str, batch: int = 1024) -> Iterator[str]:
  what = f"the {spec.split(split)} split of {spec.what}"
  if spec.text_key not in ds.column_names:
    raise _missing_column(what, spec.text_key, ds.column_names)
  for rows in ds.select_columns([spec.text_key]).iter(batch_size=batch):
    for value in rows[spec.text_key]:
      text = _text(value, what, spec.text_key)
      if text is not None:
        yield text


# ---- streamed ---------------------------------------------------------------------------------
class _Reader:
  """The non-empty documents of one split of a stream (at most `max_docs`), each with the
  `datasets` state before it. `start(state, doc)` positions it after `state` (None: the start),
  where the next non-empty document is number `doc`."""

  def __init__(self, spec: Spec, split: str, template=None):
    self.spec = spec
    self._ds = copy.deepcopy(template) if template is not None else (
        _load(spec, streaming_=True)[split])
    self._what = f"the {spec.split(split)} split of {spec.what}"
    columns = self._ds.column_names  # None when the features are not known before reading
    if columns is not None and spec.text_key not in columns:
      raise _missing_column(self._what, spec.text_key, columns)
    self._it = None
    self.state: dict[str, Any] | None = None  # after the last record read
    self.doc = 0  # number of the next non-empty document
    self.start(None, 0)

  def start(self, state: dict[str, Any] | None, doc: int) -> None:
    self.close()
    self._ds.load_state_dict(copy.deepcopy(state))  # None: from the start
    self._it, self.state, self.doc = iter(self._ds), state, doc

  def close(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None

  def next(self) -> tuple[dict[str, Any] | None, int, str] | None:
    """`(state before it, its number, text)` of the next document; None at the end."""
    key, max_docs = self.spec.text_key, self.spec.max_docs
    while not (max_docs and self.doc >= max_docs):
      before = self.state
      try:
        record = next(self._it)
      except StopIteration:
        return None
      self.state = self._ds.state_dict()
      if key not in record:
        raise _missing_column(f"a record of {self._what}", key, list(record))
      text = _text(record[key], self._what, key)
      if text and text.strip():
        self.doc += 1
        return before, self.doc - 1, text
    return None

  def documents(self) -> Iterator[str]:
    """The texts from the current position to the end."""
    try:
      while (item := self.next()) is not None:
        yield item[2]
    finally:
      self.close()


class _Windows:
  """Consecutive windows of `size` tokens of one split: its documents, each followed by EOS,
  concatenated in stream order (as the token cache stores them and `PackedSequences` cuts them).

  A position (`position()`, `seek()`) is `{'hf': state before document j, 'doc': j, 'offset': t}`:
  the next token is token t of document j (its tokens and EOS).
  """

  def __init__(self, reader: _Reader, tokenizer: Encoder, size: int):
    self._reader, self._tokenizer, self._size = reader, tokenizer, size
    self._queue = collections.deque()  # (state before, number, tokens) read ahead, not begun
    self._current, self._used = None, 0
    self.tokens = 0  # tokens read since the last seek (for the error of a too short split)

  def seek(self, at: dict[str, Any]) -> None:
    self._reader.start(at["hf"], at["doc"])
    self._queue.clear()
    self._current, self._used, self.tokens = None, 0, 0
    if at["offset"]:
      if not self._read() or self._queue[0][1] != at["doc"]:
        raise fail(self._reader.spec.setting, f"the stream ends before document {at['doc']}, "
                   "where the saved data position is", "Resume with the data the run was "
                   "started with.")
      self._current, self._used = self._queue.popleft(), at["offset"]

  def position(self) -> dict[str, Any]:
    if self._current is not None and self._used < len(self._current[2]):
      state, doc, _ = self._current
      return {"hf": state, "doc": doc, "offset": self._used}
    if self._queue:
      state, doc, _ = self._queue[0]
      return {"hf": state, "doc": doc, "offset": 0}
    return {"hf": self._reader.state, "doc": self._reader.doc, "offset": 0}

  def next(self) -> np.ndarray | None:
    """The next window (int32 [size]); None at the end of the split (a shorter tail is dropped)."""
    parts, need = [], self._size
    while need:
      if self._current is None or self._used == len(self._current[2]):
        if not self._queue and not self._read():
          return None
        self._current, self._used = self._queue.popleft(), 0
      tokens = self._current[2]
      take = min(need, len(tokens) - self._used)
      parts.append(tokens[self._used:self._used + take])
      self._used += take
      need -= take
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()

  def _read(self) -> bool:
    """Reads and tokenizes the next few documents into the queue; False at the end."""
    docs, chars = [], 0
    while len(docs) < _CHUNK_DOCS and chars < _CHUNK_CHARS:
      item = self._reader.next()
      if item is None:
        break
      docs.append(item)
      chars += len(item[2])
    eos = np.asarray([self._tokenizer.eos_id], np.int32)
    for (state, doc, _), ids in zip(docs, self._tokenizer.encode_batch([t for *_, t in docs])):
      tokens = np.concatenate([np.asarray(ids, np.int32), eos])
      self._queue.append((state, doc, tokens))
      self.tokens += len(tokens)
    return bool(docs)


_START = {"hf": None, "doc": 0, "offset": 0}


class _Order:
  """The windows of a split, epoch after epoch (each epoch reads the split again from its start),
  in order or, with a `seed`, permuted within consecutive blocks of `block` windows by a
  permutation drawn from (seed, epoch, block number)."""

  def __init__(self, windows: _Windows, block: int, seed: int | None,
               short: Callable[[int], Exception]):
    self._windows, self._size, self._seed, self._short = windows, max(block, 1), seed, short
    self._epoch = self._window = 0  # windows used in this epoch
    self._block, self._perm, self._k = [], None, 0  # the block read, its order, windows used
    self._at = dict(_START)  # where the block starts

  def state(self) -> dict[str, Any]:
    if self._k < len(self._block):
      at, skip = self._at, self._k
    else:
      at, skip = self._windows.position(), 0
    return {"epoch": self._epoch, "window": self._window, "at": at, "skip": skip}

  def restore(self, state: dict[str, Any]) -> None:
    self._epoch, self._window = int(state["epoch"]), int(state["window"]) - int(state["skip"])
    self._windows.seek(state["at"])
    self._block, self._perm, self._k = [], None, 0
    if state["skip"]:
      self._fill()
      self._k = int(state["skip"])
      self._window += self._k

  def next(self) -> np.ndarray:
    if self._k == len(self._block):
      self._fill()
    i = self._perm[self._k] if self._perm is not None else self._k
    self._k += 1
    self._window += 1
    return self._block[i]

  def _fill(self) -> None:
    self._at = self._windows.position()
    block = []
    while len(block) < self._size and (w := self._windows.next()) is not None:
      block.append(w)
    if not block:  # the end of the epoch: the next one reads the split again
      if not self._window:
        raise self._short(self._windows.tokens)
      self._epoch, self._window = self._epoch + 1, 0
      self._windows.seek(_START)
      self._fill()
      return
    self._block, self._k = block, 0
    self._perm = None
    if self._seed is not None and len(block) > 1:
      rng = np.random.default_rng([self._seed % (1 << 32), self._epoch, self._window // self._size])
      self._perm = rng.permutation(len(block))


class _BatchIterator(grain.DatasetIterator):
  """This host's rows of each global batch of a `StreamedBatches` (see there)."""

  def __init__(self, owner: "StreamedBatches"):
    super().__init__()
    self._owner = owner
    self._reader = _Reader(owner.spec, owner.split, owner.template)
    windows = _Windows(self._reader, owner.tokenizer, owner.window)
    self._order = _Order(windows, owner.block, owner.seed, owner.short)
    self._batches = 0

  def __next__(self) -> np.ndarray:
    o = self._owner
    if o.num_batches is not None and self._batches >= o.num_batches:
      raise StopIteration
    windows = [self._order.next() for _ in range(o.global_batch)]
    self._batches += 1
    return np.stack([windows[r] for r in o.rows])

  def get_state(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, "window_size": self._owner.window,
            "shuffle_buffer": self._owner.block, "batches": self._batches,
            **copy.deepcopy(self._order.state())}

  def set_state(self, state: dict[str, Any]) -> None:
    o = self._owner
    if state.get("version") != STATE_VERSION or "at" not in state:
      raise fail(o.spec.setting, f"the saved data position {sorted(state)} is not one of a "
                 "streamed source", "Resume with the data settings the run was saved with.")
    for key, setting, now in (("window_size", "train.seq_len", o.window),
                              ("shuffle_buffer", "data.hf_shuffle_buffer", o.block)):
      if state[key] != now:
        raise fail(setting, f"the stream position was saved with {key}={state[key]}, this run "
                   f"reads {key}={now}", "Resume with the settings the run was saved with.")
    self._order.restore(state)
    self._batches = int(state["batches"])

  def close(self) -> None:
    if getattr(self, "_reader", None) is not None:
      self._reader.close()
    super().close()


class StreamedBatches(grain.IterDataset):
  """This host's rows of every global batch of a streamed split, as token windows.

  Element k is `rows` of global batch k: windows [k * B, (k + 1) * B) of the split's packed
  windows (`_Windows`), int32 [len(rows), seq_len + 1]. 'train' reads the split epoch after epoch,
  shuffled in blocks of `data.hf_shuffle_buffer` windows if > 0; 'val' reads it in order, from the
  start on every `iter()`, repeating it if short, and ends after `num_batches` batches if set.
  Iterators are checkpointable: `get_state()` is a small JSON-able dict (see the module doc) and
  `set_state` on a fresh iterator resumes at the same document and token.

  Raises:
    DataError: a bad setting (see `resolve`); when read, a split holding less than one window.
  """

  def __init__(self, d: ml_collections.ConfigDict, tokenizer: Encoder, split: str, *,
               seq_len: int, global_batch: int, seed: int = 0,
               rows: Sequence[int] | None = None, num_batches: int | None = None):
    super().__init__()
    if split not in (TRAIN, VAL):
      raise ValueError(f"split must be {TRAIN!r} or {VAL!r}, got {split!r}")
    if seq_len < 1 or global_batch < 1:
      raise fail("train.seq_len", f"seq_len={seq_len} and global_batch={global_batch} must be "
                 ">= 1", "Set positive sizes.")
    self.rows = np.arange(global_batch) if rows is None else np.asarray(rows, np.int64)
    if not len(self.rows) or self.rows.min() < 0 or self.rows.max() >= global_batch:
      raise ValueError(f"rows must be non-empty indices of a {global_batch}-row batch, got "
                       f"{self.rows}")
    self.spec = resolve(d)
    if not self.spec.streaming:
      raise fail("data.hf_streaming", "is False", "Read the source through its token cache "
                 "(pipeline.make does), or set hf_streaming=True.")
    self.tokenizer, self.split = tokenizer, split
    self.window, self.global_batch, self.num_batches = seq_len + 1, global_batch, num_batches
    train = split == TRAIN
    self.block = self.spec.shuffle_buffer if train else 0
    self.seed = seed if train and self.block else None
    self.template = _load(self.spec, streaming_=True)[split]  # opened once; copied per iterator

  def short(self, tokens: int) -> Exception:
    """The error for a split shorter than one window."""
    setting, fix = (("data.hf_val_files" if self.spec.files else "data.hf_val_split",
                     "Use a larger val split or a shorter train.seq_len.")
                    if self.split == VAL else
                    ("train.seq_len", "Use more training text or shorter sequences."))
    return fail(setting, f"the {self.split} split has {tokens} tokens, less than one sequence of "
                f"seq_len + 1 = {self.window}", fix)

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self)

  def __str__(self) -> str:
    return (f"StreamedBatches({self.spec.what}, {self.split}, {self.global_batch} x "
            f"{self.window}, rows={len(self.rows)}, shuffle_buffer={self.block})")


def val_stats(d: ml_collections.ConfigDict, tokenizer: Encoder, *, seq_len: int,
              windows: int) -> tuple[int, float]:
  """How many of the first `windows` windows the val split of a streamed source fills, and UTF-8
  bytes per token of the documents read to fill them (EOS counted, as the token cache does).

  Raises:
    DataError: a bad setting, or a val split holding less than one window.
  """
  spec = resolve(d)
  reader = _Reader(spec, VAL)
  size, tokens, size_bytes = seq_len + 1, 0, 0
  try:
    while tokens < windows * size and (item := reader.next()) is not None:
      tokens += len(tokenizer.encode(item[2])) + 1
      size_bytes += len(item[2].encode("utf-8", "surrogatepass"))
  finally:
    reader.close()
  if tokens < size:
    raise fail("data.hf_val_files" if spec.files else "data.hf_val_split",
               f"the val split has {tokens} tokens, less than one sequence of seq_len + 1 = "
               f"{size}", "Use a larger val split or a shorter train.seq_len.")
  return min(tokens // size, windows), size_bytes / tokens
