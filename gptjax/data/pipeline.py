"""The input pipeline on Grain: token stream -> packed sequences -> batches -> this host's slice.

A split's token stream (documents separated by EOS, from `cache.py`) is cut into consecutive,
non-overlapping windows of `seq_len + 1` tokens, so documents pack across sequence boundaries as in
GPT-3 and every token is used exactly once per epoch. Window i is random-access (a slice of a memory
map), so Grain shuffles indices, not data: epoch e is a fresh permutation of the windows drawn from
`seed`, and global batch k is elements [k * B, (k + 1) * B) of that endless shuffled sequence. The
order therefore depends only on (seed, step), never on the mesh, the number of hosts or workers;
each host reads only the rows of every global batch that its devices hold (`rows`, from
`gptjax.feed.HostRows`, which derives them from the mesh).

    it = pipeline.make(cfg.data, tok, "train", seq_len=256, global_batch=16, seed=cfg.seed,
                       rows=feed.rows)
    batch = next(it)  # {"inputs": int32[len(rows), L], "targets", ["segment_ids", "positions"]}
    state = it.get_state()  # JSON-serialisable; a new iterator's set_state(state) resumes exactly

A streamed source (`data.source='hf'` with `data.hf_streaming`, see `hf_source.py`) has no token
cache and no random access: `make` and `make_eval` read it in order instead
(`hf_source.StreamedBatches`), with the same batches (`to_example`), rows and checkpointable
iterators.
"""

from collections.abc import Callable, Sequence
import functools
import sys

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from gptjax.data import cache
from gptjax.data import hf_source
from gptjax.data import mixture
from gptjax.data import shards
from gptjax.data import sources
from gptjax.data.errors import DataError, fail
from gptjax.data.tokenizer import Tokenizer


class PackedSequences:
  """A Grain data source: window i = tokens[i * (L + 1) : (i + 1) * (L + 1)] of a split's stream.

  The stream is the split's shards read as one sequence (`shards.Stream`), so windows pack across
  shard boundaries as across documents. The tail shorter than one window is dropped. Shards are
  memory-mapped lazily in each process, so the source pickles cheaply to Grain's workers.
  """

  def __init__(self, stream: shards.Stream, seq_len: int):
    self.stream, self.window = stream, seq_len + 1
    self.num_tokens = len(stream)

  def __len__(self) -> int:
    return self.num_tokens // self.window

  def __getitem__(self, i: int) -> np.ndarray:
    i = int(i)
    return self.stream[i * self.window:(i + 1) * self.window]

  def __repr__(self) -> str:
    return f"PackedSequences({self.stream!r}, {len(self)} x {self.window})"


class RowsOfBatches(grain.MapDataset):
  """Element k = the `rows` of global batch k: parent elements k * B + r for r in rows, stacked.

  Only those rows are read, so a host loads its share of the data and nothing else.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, rows: np.ndarray):
    super().__init__(parent)
    self._global_batch, self._rows = global_batch, np.asarray(rows, np.int64)

  def __len__(self) -> int:
    if len(self._parent) < sys.maxsize:
      return len(self._parent) // self._global_batch
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    first = int(index) * self._global_batch
    values = [self._parent[first + int(r)] for r in self._rows]
    with self._stats.record_self_time():
      return jax.tree.map(lambda *xs: np.stack(xs), *values)

  def __str__(self) -> str:
    return f"RowsOfBatches(global_batch={self._global_batch}, rows={len(self._rows)})"


def to_example(windows_BxW: np.ndarray, *, eos_id: int, segment_ids: bool) -> dict[str, np.ndarray]:
  """Splits windows of L + 1 tokens into next-token inputs and targets.

  Args:
    windows_BxW: token windows, W = L + 1.
    eos_id: the end-of-document id.
    segment_ids: also return document numbers within each sequence.

  Returns:
    `inputs` = windows[:, :-1] and `targets` = windows[:, 1:], int32 [B, L]; with `segment_ids`,
    also int32 [B, L] `segment_ids` numbering the documents of each row from 1 (position t is in
    document 1 + (EOS tokens before t), so an EOS belongs to the document it ends) and `positions`,
    each token's place in its document, restarting at 0 after every EOS (Megatron's
    `reset_position_ids`): a packed document is seen exactly as it would be alone. The first
    document of a row usually began in an earlier window; its positions start at 0 there too.
  """
  w = windows_BxW.astype(np.int32)
  out = {"inputs": np.ascontiguousarray(w[:, :-1]), "targets": np.ascontiguousarray(w[:, 1:])}
  if segment_ids:
    is_eos = (out["inputs"] == eos_id).astype(np.int32)
    segments = 1 + np.cumsum(is_eos, axis=1, dtype=np.int32) - is_eos
    out["segment_ids"] = segments
    # Position = index - index of the segment's first token; segments are runs, so the first
    # index of each is where it starts, found with a running maximum over the starts.
    index = np.broadcast_to(np.arange(w.shape[1] - 1, dtype=np.int32), segments.shape)
    starts = np.concatenate([np.ones_like(segments[:, :1], bool),
                             segments[:, 1:] != segments[:, :-1]], axis=1)
    out["positions"] = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return out


def dataset(d: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *, seq_len: int,
            global_batch: int, seed: int = 0, num_batches: int | None = None,
            rows: Sequence[int] | None = None,
            sequences_before: Callable[[int], int] | None = None) -> grain.MapDataset:
  """This host's batches as a random-access Grain dataset: element k is its part of step k.

  Args:
    d: the `data` section of the config.
    tokenizer: the run's tokenizer (the token cache is built on first use).
    split: 'train' (shuffled, endless) or 'val' (in order, endless unless `num_batches`).
    seq_len: tokens per sequence (each window holds seq_len + 1).
    global_batch: sequences per step over all hosts.
    seed: shuffle seed ('train' only).
    num_batches: if set, the dataset ends after this many steps (repeating a short split).
    rows: the rows of every global batch this host loads (`HostRows.rows`); default all of them.
    sequences_before: for a mixture with `data.mixture_stages`, the sequences read before an
      optimizer step (with accumulation or a batch ramp, not step * global_batch, the default).

  Returns:
    A `grain.MapDataset` of dicts (see `to_example`) with len(rows) rows each. With
    `data.mixture`, the 'train' split mixes the sources' windows (`mixture.Mixture`); 'val' is
    read per source (`make_eval` on `mixture.sources(d)[i].data`).

  Raises:
    DataError: the split holds less than one sequence, or a mixture setting is invalid.
  """
  if split not in (sources.TRAIN, sources.VAL):
    raise ValueError(f"split must be {sources.TRAIN!r} or {sources.VAL!r}, got {split!r}")
  if seq_len < 1 or global_batch < 1:
    raise fail("train.seq_len", f"seq_len={seq_len} and global_batch={global_batch} must be >= 1",
               "Set positive sizes.")
  hf_source.refuse_streaming(d)  # read in order by `make`, never at random
  rows = np.arange(global_batch) if rows is None else np.asarray(rows, np.int64)
  if not len(rows) or rows.min() < 0 or rows.max() >= global_batch:
    raise ValueError(f"rows must be non-empty indices of a {global_batch}-row batch, got {rows}")
  if split == sources.TRAIN and mixture.active(d):
    mixed = mixture.sources(d)
    for s in mixed:
      hf_source.refuse_streaming(s.data, f"data.mixture.{s.name}")
    parents = [_shuffled(_windows(s.data, tokenizer, split, seq_len, f"data.mixture.{s.name}"),
                         split, mixture.source_seed(seed, s.name))
               for s in mixed]
    starts, weights = mixture.stage_starts(
        d, [s.name for s in mixed], sequences_before or (lambda step: step * global_batch))
    ds = mixture.Mixture(parents, starts, weights)
  else:
    ds = _shuffled(_windows(d, tokenizer, split, seq_len), split, seed)
  ds = RowsOfBatches(ds, global_batch, rows)
  if num_batches is not None:
    ds = ds.slice(slice(0, num_batches))
  return ds.map(functools.partial(to_example, eos_id=tokenizer.eos_id,
                                  segment_ids=d.document_mask))


def _windows(d: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, seq_len: int,
             source: str = "data") -> PackedSequences:
  """The packed windows of one source's split (its cache built on first use). `source` names it
  in errors: 'data', or 'data.mixture.<name>' for a source of a mixture."""
  try:
    windows = PackedSequences(cache.load_or_build(d, tokenizer).stream(split), seq_len)
  except DataError as e:
    raise mixture.renamed(e, source) from e
  if not windows:
    setting, fix = ((f"{source}.val_fraction",
                     "Hold out more documents or use a shorter train.seq_len.")
                    if split == sources.VAL else
                    ("train.seq_len", f"Use more training text ({source}) or shorter sequences."))
    raise fail(setting, f"the {split} split has {windows.num_tokens} tokens, less than one "
               f"sequence of seq_len + 1 = {seq_len + 1}", fix)
  return windows


def _shuffled(windows: PackedSequences, split: str, seed: int) -> grain.MapDataset:
  """Endless windows: 'train' in a fresh permutation each epoch (Grain reseeds the shuffle per
  epoch), 'val' in order."""
  ds = grain.MapDataset.source(windows)
  if split == sources.TRAIN:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(None)


def make(d: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str = sources.TRAIN, *,
         seq_len: int, global_batch: int, seed: int, rows: Sequence[int] | None = None,
         sequences_before: Callable[[int], int] | None = None) -> grain.DatasetIterator:
  """The checkpointable iterator over this host's batches, step after step.

  Arguments are those of `dataset`. Batches are prepared `data.prefetch` ahead, in
  `data.worker_count` Grain worker processes if > 0 (else in a thread of this process).

  Returns:
    A `grain.DatasetIterator`: `next(it)` gives the next batch; `it.get_state()` is a JSON-able
    dict and `it.set_state(state)` on a fresh iterator with the same arguments resumes exactly
    (without workers the state is `{'next_index': step}`; for a streamed source, its position in
    the stream: see `hf_source`).
  """
  if hf_source.streaming(d):
    return iter(_streamed(d, tokenizer, split, seq_len=seq_len, global_batch=global_batch,
                          seed=seed, rows=rows))
  ds = dataset(d, tokenizer, split, seq_len=seq_len, global_batch=global_batch, seed=seed,
               rows=rows, sequences_before=sequences_before)
  return iter(_prefetch(ds, d, workers=d.worker_count))


def make_eval(d: ml_collections.ConfigDict, tokenizer: Tokenizer, *, seq_len: int,
              global_batch: int, num_batches: int,
              rows: Sequence[int] | None = None) -> grain.IterDataset:
  """The validation batches: the val split in order, `num_batches` steps (repeating if short).

  Returns:
    A `grain.IterDataset`; every `iter()` of it yields the same `num_batches` batches.
  """
  if hf_source.streaming(d):
    return _streamed(d, tokenizer, sources.VAL, seq_len=seq_len, global_batch=global_batch,
                     rows=rows, num_batches=num_batches)
  ds = dataset(d, tokenizer, sources.VAL, seq_len=seq_len, global_batch=global_batch,
               num_batches=num_batches, rows=rows)
  return _prefetch(ds, d, workers=0)  # workers would start anew on every pass


def _prefetch(ds: grain.MapDataset, d: ml_collections.ConfigDict,
              workers: int) -> grain.IterDataset:
  """Reads `data.prefetch` batches ahead, in `workers` processes if > 0."""
  if d.prefetch < 0 or d.worker_count < 0:
    raise fail("data.prefetch", f"prefetch={d.prefetch} and worker_count={d.worker_count} must be"
               " >= 0", "Use 0 to turn either off.")
  # Windows are memory-mapped, so one reader thread keeps up; more would contend for the GIL.
  read = grain.ReadOptions(num_threads=1 if d.prefetch else 0, prefetch_buffer_size=d.prefetch)
  it = ds.to_iter_dataset(read)
  if workers:
    # Grain's workers read absl flags, which tests and notebooks never parse.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=max(d.prefetch, 1)))
  return it


def _streamed(d: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *, seq_len: int,
              global_batch: int, seed: int = 0, rows: Sequence[int] | None = None,
              num_batches: int | None = None) -> grain.IterDataset:
  """A streamed source's batches (`hf_source.StreamedBatches`) as `to_example` dicts, read
  `data.prefetch` batches ahead in a thread."""
  if d.prefetch < 0:
    raise fail("data.prefetch", f"must be >= 0, got {d.prefetch}", "Use 0 to turn it off.")
  if d.worker_count:
    raise fail("data.worker_count", f"is {d.worker_count} but a streamed source is read in order "
               "by one reader (each worker process would read the whole stream)",
               "Set data.worker_count=0; data.prefetch reads ahead in a thread.")
  ds = hf_source.StreamedBatches(d, tokenizer, split, seq_len=seq_len, global_batch=global_batch,
                                 seed=seed, rows=rows, num_batches=num_batches)
  ds = ds.map(functools.partial(to_example, eos_id=tokenizer.eos_id,
                                segment_ids=d.document_mask))
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=d.prefetch)
