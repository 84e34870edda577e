"""Weighted mixtures of sources: deterministic in (seed, step), with weights that change at steps.

A mixture is named sources under `data.mixture`, each a weight plus the `data.*` settings where it
differs from the rest of `data` (its source, paths, text key, ...); all share the run's tokenizer:

    d.mixture.web = ml_collections.ConfigDict({"weight": 0.7, "source": "files",
                                               "paths": "web/*.jsonl"})
    d.mixture.code = ml_collections.ConfigDict({"weight": 0.3, "source": "embedded"})
    d.mixture_stages = "20000:web=0.5,code=0.5; 40000:web=0.2,code=0.8"  # from those steps on

Each source has its own token cache, packed into windows and shuffled anew every epoch with its own
seed. The mixed stream is interleaved by exact counts, not by sampling: among the first n sequences
of a stage, source i gives `counts(n, weights)[i]` of them, within (i + 1) / 2 of n * w_i (half
the number of sources at most, whatever n), and the k-th
sequence of the stream comes from the source whose count grows at k. So sequence k, and with it
every batch, is a pure function of (seed, k): a resumed run reads exactly what it would have, and
no host needs to know what the others read. At a stage boundary each source continues where it
stopped.
"""

import bisect
import dataclasses
import re
import sys
import zlib
from collections.abc import Callable, Sequence

import grain
import ml_collections
import numpy as np

from gptjax.data.errors import DataError, fail

SCALE = 1 << 30  # weights are made integers of this scale, so the interleave is exact
_NOT_PER_SOURCE = ("mixture", "mixture_stages", "tokenizer", "cache_dir", "document_mask",
                   "worker_count", "prefetch")


@dataclasses.dataclass(frozen=True)
class Source:
  """One source of a mixture: its name, base weight and complete `data` settings."""

  name: str
  weight: float
  data: ml_collections.ConfigDict


def active(d: ml_collections.ConfigDict) -> bool:
  """Whether `data.mixture` names any source (else the run reads the one source of `data`)."""
  return bool(d.get("mixture"))


def sources(d: ml_collections.ConfigDict) -> list[Source]:
  """The sources of `data.mixture`, sorted by name, each with its settings over `data`'s.

  Raises:
    DataError: a weight that is not a number >= 0, all weights zero, or a per-source setting that
      is not a `data.*` key or must be shared (the tokenizer, the cache folder, ...).
  """
  out = []
  for name in sorted(d.mixture):
    entry = dict(d.mixture[name])
    setting = f"data.mixture.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
      raise fail(setting, f"the name {name!r} is not a plain word",
                 "Name sources with letters, digits, '_' or '-' (they become metric names).")
    weight = entry.pop("weight", None)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
      raise fail(f"{setting}.weight", f"must be a number >= 0, got {weight!r}",
                 "Give every source a non-negative weight (they are normalised to sum to 1).")
    for key in entry:
      if key in _NOT_PER_SOURCE or key not in d:
        raise fail(f"{setting}.{key}", "is not a per-source setting",
                   f"Per source set `weight` and any of data.* except {_NOT_PER_SOURCE}.")
    data = ml_collections.ConfigDict(d.to_dict())
    data.mixture, data.mixture_stages = ml_collections.ConfigDict(), ""
    data.update(entry)
    out.append(Source(name, float(weight), data))
  if not sum(s.weight for s in out):
    raise fail("data.mixture", "every weight is zero", "Give at least one source a weight > 0.")
  return out


def stages(d: ml_collections.ConfigDict,
           names: Sequence[str]) -> list[tuple[int, tuple[float, ...]]]:
  """`[(first_step, weights), ...]`: the base weights from step 0, then `data.mixture_stages`.

  `data.mixture_stages` reads 'STEP:NAME=W,NAME=W; STEP:...'; a source left out of a stage keeps
  its weight from the stage before.

  Raises:
    DataError: a malformed stage, an unknown name, steps not increasing, or a bad weight.
  """
  base = {s.name: s.weight for s in sources(d)}
  out = [(0, tuple(base[n] for n in names))]
  spec = d.get("mixture_stages", "")
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    match = re.fullmatch(r"(\d+)\s*:\s*(.+)", part)
    if not match:
      raise fail("data.mixture_stages", f"cannot read the stage {part!r}",
                 "Write stages as 'STEP:NAME=WEIGHT,NAME=WEIGHT; STEP:...'.")
    step, weights = int(match.group(1)), dict(zip(names, out[-1][1]))
    for item in match.group(2).split(","):
      name, _, value = (x.strip() for x in item.partition("="))
      if name not in weights:
        raise fail("data.mixture_stages", f"stage {step} names {name!r}, which data.mixture lacks",
                   f"Use the names of data.mixture: {sorted(weights)}.")
      try:
        weights[name] = float(value)
      except ValueError:
        weights[name] = -1.0
      if not weights[name] >= 0:
        raise fail("data.mixture_stages", f"stage {step} gives {name!r} the weight {value!r}",
                   "Weights are numbers >= 0.")
    if step <= out[-1][0]:
      raise fail("data.mixture_stages", f"stage {step} does not come after step {out[-1][0]}",
                 "List stages in increasing step order, after step 0.")
    if not sum(weights.values()):
      raise fail("data.mixture_stages", f"every weight of stage {step} is zero",
                 "Give at least one source a weight > 0.")
    out.append((step, tuple(weights[n] for n in names)))
  return out


def source_seed(seed: int, name: str) -> int:
  """The shuffle seed of source `name`: its own, so sources of equal size are not read in step."""
  return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def integer_weights(weights: Sequence[float]) -> tuple[int, ...]:
  """Weights as integers summing to about SCALE, so counts are exact integer arithmetic; a
  positive weight never rounds to zero."""
  total = sum(weights)
  return tuple(max(1, round(w / total * SCALE)) if w > 0 else 0 for w in weights)


def counts(n: int, weights: Sequence[int]) -> list[int]:
  """How many of the first `n` sequences of a stage each source gives.

  The others' share of n, n * (W - w_0) / W rounded, leaves source 0 its count; the others share
  that rest the same way in turn. Rounding is monotone, so no count ever decreases as n grows; the
  counts sum to n; and source i's count is within (i + 1) / 2 of n * w_i / W (each level rounds
  by at most a half).
  """
  out, remaining = [], sum(weights)
  for w in weights:
    if not remaining:
      out.append(0)
      continue
    rest = (2 * n * (remaining - w) + remaining) // (2 * remaining)  # round half up
    out.append(n - rest)
    n, remaining = rest, remaining - w
  return out


def pick(k: int, weights: Sequence[int]) -> tuple[int, int]:
  """(source, index in that source) of sequence k of a stage: the source whose count grows."""
  before, after = counts(k, weights), counts(k + 1, weights)
  for i, (a, b) in enumerate(zip(before, after)):
    if b > a:
      return i, a
  raise AssertionError(f"no source grows at {k} for weights {weights}")


class Mixture(grain.MapDataset):
  """Element k = element `pick(k)` of the parents, with staged weights.

  Args:
    parents: one endless MapDataset per source (its shuffled, repeated windows).
    stage_starts: the first element (sequence) index of each stage, ascending, starting at 0.
    stage_weights: the float weights of each stage.
  """

  def __init__(self, parents: Sequence[grain.MapDataset], stage_starts: Sequence[int],
               stage_weights: Sequence[Sequence[float]]):
    super().__init__(list(parents))
    self._starts = [int(s) for s in stage_starts]
    self._weights = [integer_weights(w) for w in stage_weights]
    # Where each source stands at the start of each stage: it continues from there.
    self._offsets = [np.zeros(len(parents), np.int64)]
    for s in range(1, len(self._starts)):
      done = counts(self._starts[s] - self._starts[s - 1], self._weights[s - 1])
      self._offsets.append(self._offsets[-1] + np.asarray(done, np.int64))

  def __len__(self) -> int:
    return sys.maxsize

  def source_of(self, k: int) -> tuple[int, int]:
    """(source, index in that source's stream) of element k."""
    s = bisect.bisect_right(self._starts, k) - 1
    i, n = pick(k - self._starts[s], self._weights[s])
    return i, int(self._offsets[s][i]) + n

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    i, n = self.source_of(int(index))
    return self._parents[i][n]

  def __str__(self) -> str:
    return f"Mixture({len(self._parents)} sources, {len(self._starts)} stages)"


def stage_starts(d: ml_collections.ConfigDict, names: Sequence[str],
                 sequences_before: Callable[[int], int]) -> tuple[list[int], list[tuple]]:
  """Stage starts in sequences (via `sequences_before(step)`) and their weights."""
  staged = stages(d, names)
  return [sequences_before(step) for step, _ in staged], [w for _, w in staged]


def renamed(error: DataError, source: str) -> DataError:
  """`error` naming `source`'s settings ('data.mixture.web.paths' for 'data.paths')."""
  if source == "data":
    return error
  return DataError(str(error).replace("config.data.", f"config.{source}.", 1))
