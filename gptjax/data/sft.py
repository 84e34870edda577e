"""Supervised fine-tuning data: JSON Lines records -> fixed-shape numpy arrays -> batches.

One record per line; the fields are named in `cfg.finetune`:

- classify: {"text": "...", "label": "pos"} with text_fields='text', classes='neg,pos'.
- entail, similarity: {"premise": "...", "hypothesis": "...", "label": 1} with
  text_fields='premise,hypothesis'.
- multiple_choice: {"context": "...", "choices": ["...", ...], "label": 2}; the label is the right
  choice's index (or its text).
- token_classify: {"tokens": ["w1", ...], "tags": ["O", ...]} with text_fields='tokens',
  label_field='tags': one label per word.
- sft: {"prompt": "...", "completion": "..."}: the prompt is `template` str.format-ted with the
  record's fields, the completion is `completion_field`.

Labels are compared as strings with `finetune.classes` (an int label 1 matches class '1'). GPT-1's
start token is the tokenizer's BOS, its extract token the EOS, and `finetune.delimiter` (text)
separates the two parts of a pair. A dataset's sequences are right-padded to its longest one
(rounded up to a multiple of 8, at most `seq_len`); one that does not fit `seq_len` loses tokens
from the front of its first part (then from the end of its last).

SFT: [BOS] prompt completion [EOS] with loss weight 1 on the completion and the EOS only. With
`finetune.pack` several examples share a row, each its own segment (attention never crosses
segments) with positions restarting at 0, so a packed example trains exactly as it would alone.
"""

from collections.abc import Sequence
import dataclasses
import json
import os

import grain
import ml_collections
import numpy as np

from gptjax.data import pipeline
from gptjax.data.errors import fail
from gptjax.data.tokenizer import Tokenizer
from gptjax.heads import PAIR_TASKS, TASKS


@dataclasses.dataclass(frozen=True)
class Format:
  """How records become sequences (from `cfg.finetune`, see configs/base.py)."""

  task: str
  seq_len: int
  text_fields: tuple[str, ...] = ("text",)
  label_field: str = "label"
  choices_field: str = "choices"
  classes: tuple[str, ...] = ("0", "1")
  template: str = "{prompt}"
  completion_field: str = "completion"
  delimiter: str = "\n"
  pack: bool = True
  lm: bool = False  # also build `targets`/`weights` for the auxiliary LM loss

  @classmethod
  def from_config(cls, f: ml_collections.ConfigDict, seq_len: int) -> "Format":
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())
    return cls(task=f.task, seq_len=seq_len, text_fields=split(f.text_fields),
               label_field=f.label_field, choices_field=f.choices_field, classes=split(f.classes),
               template=f.template, completion_field=f.completion_field, delimiter=f.delimiter,
               pack=f.pack, lm=f.aux_lm_weight > 0)


@dataclasses.dataclass
class Encoded:
  """A dataset's arrays, how many sequences were truncated, and (SFT) the raw pairs."""

  rows: "Rows"
  truncated: int
  pairs: list[tuple[list[int], list[int]]]  # sft: (BOS + prompt, completion + EOS) token ids


class Rows:
  """Equally long numpy arrays; item i is {key: array[i]} (a Grain data source)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[int(i)] for k, v in self.arrays.items()}


def read_jsonl(path: str, setting: str) -> list[tuple[str, dict]]:
  """(where, record) for each non-blank line of a JSON Lines file; `where` is 'path:line'."""
  if not os.path.isfile(path):
    raise fail(setting, f"{path!r} is not a file", "Point it at a JSON Lines file.")
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise fail(setting, f"{path}:{i} is not valid JSON ({e.msg})", "Write one object per line.")
      if not isinstance(record, dict):
        raise fail(setting, f"{path}:{i} is not a JSON object", "Write one object per line.")
      out.append((f"{path}:{i}", record))
  if not out:
    raise fail(setting, f"{path!r} holds no records", "Give it at least one example.")
  return out


def _get(record: dict, key: str, kind, where: str, setting: str):
  if key not in record:
    raise fail(setting, f"{where}: the record has no field {key!r} (it has {sorted(record)})",
               "Name the record's field in this setting, or fix the file.")
  value = record[key]
  if not isinstance(value, kind):
    names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise fail(setting, f"{where}: field {key!r} must be a {names}, got {type(value).__name__}",
               "Fix the record.")
  return value


def _label(value, fmt: Format, where: str) -> int:
  if str(value) not in fmt.classes:
    raise fail("finetune.classes", f"{where}: label {value!r} is not one of the classes "
               f"{list(fmt.classes)}", "Add it to finetune.classes (comma-separated), or fix the "
               "record.")
  return fmt.classes.index(str(value))


def _fit(parts: list[list[int]], budget: int) -> tuple[list[list[int]], bool]:
  """Trims the parts to `budget` tokens: the front of the first part, then the end of the last."""
  excess = sum(map(len, parts)) - budget
  if excess <= 0:
    return parts, False
  first = parts[0][min(excess, len(parts[0])):]
  excess -= len(parts[0]) - len(first)
  parts = [first] + parts[1:]
  if excess > 0:
    parts[-1] = parts[-1][:max(len(parts[-1]) - excess, 0)]
  return parts, True


_PER_TOKEN = ("inputs", "targets", "weights", "segment_ids", "positions")  # [..., L] arrays


class _Builder:
  """Accumulates padded rows of one dataset."""

  def __init__(self, fmt: Format, tok: Tokenizer):
    self.fmt, self.tok, self.truncated, self.used = fmt, tok, 0, 1
    self.delim = tok.encode(fmt.delimiter) if fmt.delimiter else []
    self.rows: dict[str, list[np.ndarray]] = {}

  def add(self, **arrays: np.ndarray) -> None:
    for k, v in arrays.items():
      self.rows.setdefault(k, []).append(v)

  def sequence(self, parts: list[list[int]]) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """[BOS] part (delim part)* [EOS], padded: (inputs, extract index, LM targets, LM weights)."""
    t, length = self.tok, self.fmt.seq_len
    budget = length - 2 - len(self.delim) * (len(parts) - 1)
    parts, cut = _fit(parts, budget)
    self.truncated += cut
    ids = [t.bos_id] + parts[0]
    for part in parts[1:]:
      ids += self.delim + part
    ids.append(t.eos_id)
    self.used = max(self.used, len(ids))
    inputs = np.full(length, t.pad_id, np.int32)
    inputs[:len(ids)] = ids
    targets, weights = np.full(length, t.pad_id, np.int32), np.zeros(length, np.float32)
    targets[:len(ids) - 1], weights[:len(ids) - 1] = ids[1:], 1.0
    return inputs, len(ids) - 1, targets, weights

  def arrays(self) -> dict[str, np.ndarray]:
    """The rows, cut to the longest sequence (rounded up to a multiple of 8, at most seq_len)."""
    length = min(self.fmt.seq_len, -(-self.used // 8) * 8)
    per_token = _PER_TOKEN + (("labels", "label_weights") if self.fmt.task == "token_classify"
                              else ())
    return {k: np.stack(v)[..., :length] if k in per_token else np.stack(v)
            for k, v in self.rows.items()}


def _sequences(b: _Builder, parts_list: list[list[list[int]]], label: int) -> None:
  seqs = [b.sequence(parts) for parts in parts_list]
  lm = {"targets": np.stack([s[2] for s in seqs]), "weights": np.stack([s[3] for s in seqs])}
  if len(seqs) == 1:  # one sequence per example: [L] arrays, extract [1]
    lm = {k: v[0] for k, v in lm.items()}
  b.add(inputs=np.stack([s[0] for s in seqs]) if len(seqs) > 1 else seqs[0][0],
        extract=np.array([s[1] for s in seqs], np.int32), labels=np.array([label], np.int32),
        label_weights=np.ones(1, np.float32), **(lm if b.fmt.lm else {}))


def _tokens(b: _Builder, record: dict, where: str) -> None:
  fmt, tok = b.fmt, b.tok
  words = _get(record, fmt.text_fields[0], list, where, "finetune.text_fields")
  tags = _get(record, fmt.label_field, list, where, "finetune.label_field")
  if len(words) != len(tags):
    raise fail("finetune.label_field", f"{where}: {len(words)} tokens but {len(tags)} labels",
               "Give one label per token.")
  ids, labels, weights = [tok.bos_id], [0], [0.0]
  for i, (word, tag) in enumerate(zip(words, tags)):
    pieces = tok.encode(str(word) if i == 0 else " " + str(word))
    ids += pieces  # the word's label goes on its first piece
    labels += [_label(tag, fmt, where)] + [0] * (len(pieces) - 1)
    weights += [1.0] + [0.0] * (len(pieces) - 1)
  b.truncated += len(ids) > fmt.seq_len
  b.used = max(b.used, min(len(ids), fmt.seq_len))
  pad = lambda x, v, dt: np.array((x + [v] * fmt.seq_len)[:fmt.seq_len], dt)
  lm = {"targets": pad(ids[1:], tok.pad_id, np.int32),
        "weights": pad([1.0] * (len(ids) - 1), 0.0, np.float32)} if fmt.lm else {}
  b.add(inputs=pad(ids, tok.pad_id, np.int32), labels=pad(labels, 0, np.int32),
        label_weights=pad(weights, 0.0, np.float32), **lm)


def _sft_pair(b: _Builder, record: dict, where: str) -> tuple[list[int], list[int]]:
  fmt, tok = b.fmt, b.tok
  try:
    prompt = fmt.template.format_map(record)
  except KeyError as e:
    raise fail("finetune.template", f"{where}: the template names field {e} that the record lacks "
               f"(it has {sorted(record)})", "Use only the record's fields in {braces}.") from e
  completion = _get(record, fmt.completion_field, str, where, "finetune.completion_field")
  return [tok.bos_id] + tok.encode(prompt), tok.encode(completion) + [tok.eos_id]


def _pack_sft(b: _Builder, pairs: list[tuple[list[int], list[int]]]) -> None:
  """Rows of [BOS] prompt completion [EOS] examples, next-fit packed (or one per row)."""
  length, rows = b.fmt.seq_len, []
  fill = length
  for prompt, completion in pairs:
    if len(prompt) + len(completion) > length + 1:  # keep the completion, then the prompt's end
      b.truncated += 1
      completion = completion[:length]
      keep = length - len(completion)  # prompt tokens after the BOS that still fit
      prompt = prompt[:1] + (prompt[len(prompt) - keep:] if keep else [])
    ids = prompt + completion
    n = len(ids) - 1
    if not b.fmt.pack or fill + n > length:
      rows.append([])
      fill = 0
    rows[-1].append((ids, len(prompt) - 1))
    fill += n
  for row in rows:
    arrays = {"inputs": np.full(length, b.tok.pad_id, np.int32),
              "targets": np.full(length, b.tok.pad_id, np.int32),
              "weights": np.zeros(length, np.float32), "segment_ids": np.zeros(length, np.int32),
              "positions": np.zeros(length, np.int32)}
    at = 0
    for seg, (ids, n_prompt) in enumerate(row, 1):
      n = len(ids) - 1
      arrays["inputs"][at:at + n], arrays["targets"][at:at + n] = ids[:-1], ids[1:]
      arrays["weights"][at + n_prompt:at + n] = 1.0
      arrays["segment_ids"][at:at + n], arrays["positions"][at:at + n] = seg, np.arange(n)
      at += n
    b.used = max(b.used, at)
    b.add(**arrays)


def encode(records: list[tuple[str, dict]], fmt: Format, tok: Tokenizer) -> Encoded:
  """The arrays of a task's examples (see `gptjax.heads` for their layout).

  Raises:
    DataError: a record lacks a field, has a wrong type, or a label outside `finetune.classes`;
      the message names the setting and the file line.
  """
  if fmt.task not in TASKS:
    raise fail("finetune.task", f"unknown task {fmt.task!r}", f"Use one of {TASKS}.")
  b, pairs = _Builder(fmt, tok), []
  n_text = 2 if fmt.task in PAIR_TASKS else 1
  if fmt.task != "sft" and len(fmt.text_fields) != n_text:
    raise fail("finetune.text_fields", f"task {fmt.task!r} reads {n_text} text field(s), got "
               f"{list(fmt.text_fields)}", "Name them comma-separated, e.g. 'premise,hypothesis'.")
  n_choices = None
  for where, record in records:
    if fmt.task == "sft":
      pairs.append(_sft_pair(b, record, where))
      continue
    if fmt.task == "token_classify":
      _tokens(b, record, where)
      continue
    texts = [tok.encode(_get(record, k, str, where, "finetune.text_fields"))
             for k in fmt.text_fields]
    if fmt.task == "multiple_choice":
      choices = _get(record, fmt.choices_field, list, where, "finetune.choices_field")
      if n_choices not in (None, len(choices)) or len(choices) < 2:
        raise fail("finetune.choices_field", f"{where}: {len(choices)} choices where the other "
                   f"examples have {n_choices}", "Give every example the same number (>= 2).")
      n_choices = len(choices)
      value = _get(record, fmt.label_field, (int, str), where, "finetune.label_field")
      label = choices.index(value) if isinstance(value, str) and value in choices else value
      if not isinstance(label, int) or not 0 <= label < len(choices):
        raise fail("finetune.label_field", f"{where}: label {value!r} is neither a choice index in"
                   f" [0, {len(choices)}) nor one of the choices", "Fix the record.")
      _sequences(b, [[texts[0], tok.encode(str(c))] for c in choices], label)
      continue
    label = _label(_get(record, fmt.label_field, (int, str), where, "finetune.label_field"),
                   fmt, where)
    orders = [texts, texts[::-1]] if fmt.task == "similarity" else [texts]
    _sequences(b, orders, label)
  if fmt.task == "sft":
    _pack_sft(b, pairs)
  return Encoded(Rows(b.arrays()), b.truncated, pairs)


def load(path: str, setting: str, fmt: Format, tok: Tokenizer) -> Encoded:
  """`encode(read_jsonl(path))`."""
  return encode(read_jsonl(path, setting), fmt, tok)


def train_batches(rows: Rows, *, micro_batch: int, seed: int,
                  rows_of_batch: Sequence[int] | None = None) -> grain.MapDataset:
  """Element k is this host's rows of micro-batch k of an endless stream, reshuffled every epoch.

  The order depends only on (seed, k), so a run resumes exactly from its step count.

  Args:
    rows: the encoded examples.
    micro_batch: rows of a micro-batch over all hosts.
    seed: the shuffle seed.
    rows_of_batch: the rows of each micro-batch this host loads (`HostRows.rows`); default all.
  """
  ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat(None)
  take = np.arange(micro_batch) if rows_of_batch is None else rows_of_batch
  return pipeline.RowsOfBatches(ds, micro_batch, take)


def eval_batches(rows: Rows, batch: int) -> list[dict[str, np.ndarray]]:
  """All rows in order, in batches of `batch`; the last is filled up with zero-weight rows."""
  n, out = len(rows), []
  for start in range(0, n, batch):
    idx = np.arange(start, start + batch)
    part = {k: v[np.minimum(idx, n - 1)] for k, v in rows.arrays.items()}
    for k in ("label_weights", "weights"):
      if k in part:
        part[k] = np.where((idx < n).reshape((-1,) + (1,) * (part[k].ndim - 1)), part[k], 0)
    out.append(part)
  return out
