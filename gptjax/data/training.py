"""What a pre-training run reads: its train iterator, its validation sets, its stream's identity.

One source (`data.source`) or a mixture (`data.mixture`, see `mixture.py`): the loop asks the same
questions of both. A streamed source (`data.hf_streaming`, see `hf_source.py`) has no token cache:
its validation reads the first batches of its val split, and its fingerprint is the dataset's
identity (names, files, versions), not its content.

    stream = training.Stream(cfg.data, tokenizer, seq_len=256, micro_batch=16, seed=0,
                             sequences_before=lambda step: plan.tokens_before(step) // 256)
    it = stream.train(rows)                           # checkpointable Grain iterator
    for v in stream.validation(eval_batches=8, rows=rows, log=print):
      v.name, v.weight, v.batches, v.bytes_per_token  # one per source ('' for a single source)
    stream.fingerprint()                              # content identity, kept in checkpoints
"""

from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import json
from typing import Any

import grain
import ml_collections

from gptjax.data import cache, hf_source, mixture, pipeline, sources
from gptjax.data.errors import DataError
from gptjax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Validation:
  """The validation set of one source.

  Attributes:
    name: the source's name in `data.mixture` ('' for a run with one source).
    weight: its share of the run's `val_loss` (the base mixture weights, normalised; 1 alone).
    batches: the batches, the same on every pass.
    bytes_per_token: UTF-8 bytes per token of the val split (bits/byte = nats/token / ln 2 /
      bytes_per_token).
  """

  name: str
  weight: float
  batches: grain.IterDataset
  bytes_per_token: float


@dataclasses.dataclass
class Stream:
  """The data of a pre-training run. Arguments as `pipeline.make`'s (`micro_batch` is its
  `global_batch`: the sequences of one micro-batch over all hosts)."""

  d: ml_collections.ConfigDict
  tokenizer: Tokenizer
  seq_len: int
  micro_batch: int
  seed: int
  sequences_before: Callable[[int], int] | None = None
  _entries: dict[str, cache.TokenCache] | None = dataclasses.field(default=None, init=False,
                                                                   repr=False)

  def sources(self) -> list[tuple[str, float, ml_collections.ConfigDict]]:
    """(name, normalised base weight, data settings) of each source."""
    if not mixture.active(self.d):
      return [("", 1.0, self.d)]
    mixed = mixture.sources(self.d)
    total = sum(s.weight for s in mixed)
    return [(s.name, s.weight / total, s.data) for s in mixed]

  def entries(self) -> dict[str, cache.TokenCache]:
    """Each source's token cache (built on first use), by name; opened once per `Stream`."""
    if self._entries is not None:
      return self._entries
    out = {}
    for name, _, d in self.sources():
      hf_source.refuse_streaming(d, f"data.mixture.{name}" if name else "data")
      try:
        out[name] = cache.load_or_build(d, self.tokenizer)
      except DataError as e:
        raise mixture.renamed(e, f"data.mixture.{name}" if name else "data") from e
    self._entries = out
    return out

  def train(self, rows: Sequence[int]) -> grain.DatasetIterator:
    """This host's rows of every micro-batch, in order (see `pipeline.make`)."""
    return pipeline.make(self.d, self.tokenizer, sources.TRAIN, seq_len=self.seq_len,
                         global_batch=self.micro_batch, seed=self.seed, rows=rows,
                         sequences_before=self.sequences_before)

  def validation(self, eval_batches: int, rows: Sequence[int],
                 log: Callable[[str], None]) -> list[Validation]:
    """Each source's validation set: `eval_batches` micro-batches, or fewer when its val split
    holds fewer sequences (never repeated while it holds one micro-batch; `log` says so)."""
    if hf_source.streaming(self.d):
      return [self._streamed_validation(eval_batches, rows, log)]
    out, entries = [], self.entries()
    for name, weight, d in self.sources():
      split = entries[name].meta["splits"][sources.VAL]
      n = _batches(split["tokens"] // (self.seq_len + 1), eval_batches, self.micro_batch,
                   self.seq_len, f"the val split of {name}" if name else "the val split", log)
      batches = pipeline.make_eval(d, self.tokenizer, seq_len=self.seq_len,
                                   global_batch=self.micro_batch, num_batches=n, rows=rows)
      out.append(Validation(name, weight, batches, split["bytes"] / max(split["tokens"], 1)))
    return out

  def fingerprint(self) -> str:
    """The identity of the token stream, from its content: the tokenizer, each split's document,
    token and character counts, and the first and last MiB of each split's tokens (file names and
    times do not count: a copied or re-written corpus with the same text is the same). A mixture
    hashes each source's, by name. A streamed source: the tokenizer and the corpus fingerprint
    (names, config, files with sizes and times or the dataset's hash, splits, versions)."""
    if hf_source.streaming(self.d):
      identity = {"tokenizer": self.tokenizer.fingerprint, "streamed": True,
                  "corpus": sources.open_corpus(self.d).fingerprint}
      return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    parts = {name: _content(entry) for name, entry in self.entries().items()}
    return parts[""] if "" in parts else hashlib.sha256(
        json.dumps(parts, sort_keys=True).encode()).hexdigest()

  def _streamed_validation(self, eval_batches: int, rows: Sequence[int],
                           log: Callable[[str], None]) -> Validation:
    """A streamed source's validation set: the first batches of its val split; bytes per token
    measured on the documents that fill them."""
    available, bytes_per_token = hf_source.val_stats(
        self.d, self.tokenizer, seq_len=self.seq_len, windows=eval_batches * self.micro_batch)
    n = _batches(available, eval_batches, self.micro_batch, self.seq_len, "the val split", log)
    batches = pipeline.make_eval(self.d, self.tokenizer, seq_len=self.seq_len,
                                 global_batch=self.micro_batch, num_batches=n, rows=rows)
    return Validation("", 1.0, batches, bytes_per_token)


def _content(entry: cache.TokenCache) -> str:
  splits = {split: {k: s[k] for k in ("documents", "tokens", "chars")}  # as format 1 had them
            for split, s in entry.meta["splits"].items()}
  digest = hashlib.sha256(json.dumps({"tokenizer": entry.meta.get("tokenizer"),
                                      "splits": splits}, sort_keys=True, default=str).encode())
  for split in (sources.TRAIN, sources.VAL):
    digest.update(entry.npy_bytes(split, 1 << 20))
  return digest.hexdigest()


def _batches(available: int, asked: int, micro_batch: int, seq_len: int, what: str,
             log: Callable[[str], None]) -> int:
  if available >= asked * micro_batch:
    return asked
  fit = available // micro_batch
  if fit:
    log(f"validation: {what} holds {available} sequences of {seq_len + 1} tokens, fewer than "
        f"train.eval_batches x train.global_batch = {asked * micro_batch}; validating on "
        f"{fit * micro_batch} of them")
    return fit
  log(f"WARNING: validation: {what} holds {available} sequences of {seq_len + 1} tokens, less "
      f"than one batch of {micro_batch}; its sequences repeat within each validation pass. Raise "
      "data.val_fraction for a larger one.")
  return 1


def same_past(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict,
              step: int) -> str | None:
  """Why a run saved with data settings `old` cannot resume at `step` with `new` (None if it
  can): a mixture's sources and the weights of every stage that began by `step` must not change;
  later stages may."""
  if not (mixture.active(old) or mixture.active(new)):
    return None
  def effective(d: ml_collections.ConfigDict) -> Any:
    if not mixture.active(d):
      return None
    names = [s.name for s in mixture.sources(d)]
    past = [(first, w) for first, w in mixture.stages(d, names) if first <= step]
    return names, past
  if effective(old) != effective(new):
    return (f"the mixture read before step {step} would change (its sources, or the weights of "
            "a stage that has begun); only stages after the checkpoint's step may change")
  return None
