"""Evaluation tasks: their specs and files, few-shot prompts, and the (context, continuation)
token requests every task reduces to. `gptjax.evaluate` scores them.

Tasks are given as `name:path:kind[:fewshot_path]`, comma-separated (`eval.tasks` in the config,
`--tasks` of scripts/evaluate.py). Task files are JSON Lines, one example per line:

  mc       {"context": "Question: What is the capital of France?\\nAnswer:",
            "choices": [" Paris", " Rome", " Berlin"], "label": 0}
           `choices`: at least 2 non-empty strings; `label`: the 0-based index of the right one.
  lambada  {"text": "<passage>"}: the target is the passage's last word with the whitespace before
           it (" word", any punctuation attached to the word included), the context all before;
           or {"context": "...", "target": " word"}.
  ppl      a .txt file (one document) or a .jsonl file of {"text": "..."} (one document a line).

A few-shot pool file has its task's schema; without one, shots are drawn from the other examples.

Prompt conventions (those of GPT-3's evaluation):
- The scored text is `context + continuation` exactly as written, so a continuation carries its
  own leading space (" Paris"). The two are tokenized apart, and the context starts with EOS, the
  token that precedes every document in training.
- k shots: k demonstrations (context + right answer) drawn without replacement by a generator
  seeded with (seed, example index), so the draw is fixed and never holds the example itself, are
  joined with the example's context by SEPARATOR ("\\n\\n").
- Contexts longer than the model window lose their beginning (the first demonstrations go first);
  a continuation longer than the window is an error.
"""

from collections.abc import Sequence
import dataclasses
import itertools
import json
import os
import re
from typing import Any

import ml_collections
import numpy as np

from gptjax.data import sources

KINDS = ("mc", "lambada", "ppl")
SEPARATOR = "\n\n"
METRICS = {"mc": ("acc", "acc_per_token", "acc_per_byte"), "lambada": ("acc", "target_ppl"),
           "ppl": ("ppl", "bits_per_byte")}  # what goes to the metrics log, per kind
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LAST_WORD = re.compile(r"(.*\S)(\s+\S+)\s*", re.DOTALL)

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


class EvalError(ValueError):
  """An evaluation input is unusable (task spec, task file, workdir); the message says where."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One multiple-choice or LAMBADA example (LAMBADA: `choices` = (target,), `label` = 0)."""

  context: str
  choices: tuple[str, ...]
  label: int
  where: str  # 'path:line', for messages

  @property
  def demo(self) -> str:
    """The example as a few-shot demonstration: its context and its right answer."""
    return self.context + self.choices[self.label]


@dataclasses.dataclass(frozen=True)
class Task:
  """A named task and, once loaded (`load_tasks`), its examples."""

  name: str
  kind: str  # one of KINDS
  path: str
  fewshot: str = ""  # few-shot pool file ('' = the other examples)
  examples: tuple = ()  # Examples; for 'ppl' the documents (str)
  pool: tuple = ()  # Examples of the few-shot pool file


# ---- task specs and files -----------------------------------------------------------------------
def parse_tasks(spec: str, setting: str = "config.eval.tasks") -> list[Task]:
  """Parses 'name:path:kind[:fewshot_path],...' (nothing is read); `setting` names it in errors."""
  tasks = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    parts = item.split(":")
    if len(parts) not in (3, 4) or not all(parts):
      raise EvalError(f"{setting}: {item!r} is not name:path:kind[:fewshot_path]. Write e.g. "
                      "'qa:tests/data/mc.jsonl:mc', several separated by commas.")
    name, path, kind, fewshot = (*parts, "")[:4]
    if kind not in KINDS:
      raise EvalError(f"{setting}: unknown task kind {kind!r} in {item!r}. Use one of {KINDS}.")
    if not _NAME.fullmatch(name) or name in [t.name for t in tasks]:
      raise EvalError(f"{setting}: task name {name!r} is repeated or not made of letters, digits "
                      "and _.- only. Give each task its own plain name (it names the metrics).")
    if fewshot and kind == "ppl":
      raise EvalError(f"{setting}: {item!r}: a 'ppl' task takes no few-shot pool. Drop the "
                      "fourth field.")
    tasks.append(Task(name, kind, path, fewshot))
  return tasks


def load_tasks(spec: str, setting: str = "config.eval.tasks", shots: int = 0) -> list[Task]:
  """Parses `spec` and reads and checks every task file, so bad input fails before any work."""
  tasks = []
  for t in parse_tasks(spec, setting):
    if t.kind == "ppl":
      tasks.append(dataclasses.replace(t, examples=tuple(read_documents(t.path))))
      continue
    examples, pool = read_examples(t.path, t.kind), ()
    if t.fewshot:
      pool = read_examples(t.fewshot, t.kind)
    available = len(pool) if t.fewshot else len(examples) - 1
    if shots > available:
      raise EvalError(f"{setting}: task {t.name!r} has {available} few-shot examples "
                      f"({t.fewshot or 'the other examples of ' + t.path}), fewer than the "
                      f"{shots} shots asked. Ask for fewer shots or give a larger pool.")
    tasks.append(dataclasses.replace(t, examples=tuple(examples), pool=tuple(pool)))
  return tasks


def _records(path: str):
  if not os.path.isfile(path):
    raise EvalError(f"{path}: no such file (cwd: {os.getcwd()}). Fix the task's path.")
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalError(f"{where}: not valid JSON ({e.msg}). Each line must be one JSON "
                        "object.") from e
      if not isinstance(record, dict):
        raise EvalError(f"{where}: a JSON {type(record).__name__}, not an object. Each line must "
                        "be one JSON object.")
      yield where, record


def _field(record: dict, where: str, key: str, kind: type) -> Any:
  if key not in record:
    raise EvalError(f"{where}: missing field {key!r} (the line has {sorted(record)}). See the "
                    "schema in gptjax/eval_tasks.py.")
  value = record[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    wanted = {str: "a string", list: "a list", int: "an integer"}[kind]
    raise EvalError(f"{where}: field {key!r} must be {wanted}, got {type(value).__name__} "
                    f"{value!r:.40}.")
  return value


def _mc_example(record: dict, where: str) -> Example:
  context, choices = _field(record, where, "context", str), _field(record, where, "choices", list)
  if len(choices) < 2:
    raise EvalError(f"{where}: field 'choices' holds {len(choices)} choice(s); a multiple-choice "
                    "example needs at least 2.")
  for i, choice in enumerate(choices):
    if not isinstance(choice, str) or not choice:
      raise EvalError(f"{where}: field 'choices' item {i} must be a non-empty string, got "
                      f"{choice!r}.")
  label = _field(record, where, "label", int)
  if not 0 <= label < len(choices):
    raise EvalError(f"{where}: field 'label' is {label}, out of range for {len(choices)} choices. "
                    f"It is the 0-based index of the right choice (0 to {len(choices) - 1}).")
  return Example(context, tuple(choices), label, where)


def _lambada_example(record: dict, where: str) -> Example:
  if "text" in record:
    if "context" in record or "target" in record:
      raise EvalError(f"{where}: has field 'text' and also 'context'/'target'. Give either the "
                      "passage or its context and target.")
    text = _field(record, where, "text", str)
    match = _LAST_WORD.fullmatch(text)
    if not match:
      raise EvalError(f"{where}: field 'text' needs at least two words (the last is the target), "
                      f"got {text!r:.60}.")
    return Example(match.group(1), (match.group(2),), 0, where)
  if "context" not in record and "target" not in record:
    raise EvalError(f"{where}: missing field 'text' (or 'context' and 'target'; the line has "
                    f"{sorted(record)}).")
  context, target = _field(record, where, "context", str), _field(record, where, "target", str)
  if not target.strip():
    raise EvalError(f"{where}: field 'target' is empty. Give the word to predict, e.g. ' word'.")
  return Example(context, (target,), 0, where)


def read_examples(path: str, kind: str) -> list[Example]:
  """The examples of an 'mc' or 'lambada' file; EvalError names the file, line and field."""
  parse = _mc_example if kind == "mc" else _lambada_example
  examples = [parse(record, where) for where, record in _records(path)]
  if not examples:
    raise EvalError(f"{path}: holds no examples. Write one JSON object per line.")
  return examples


def read_documents(path: str) -> list[str]:
  """The documents of a 'ppl' task: a .txt file whole, or the 'text' field of each .jsonl line."""
  if path.endswith(".jsonl"):
    docs = [_field(record, where, "text", str) for where, record in _records(path)]
  elif path.endswith(".txt") and os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      docs = [f.read()]
  elif path.endswith(".txt"):
    raise EvalError(f"{path}: no such file (cwd: {os.getcwd()}). Fix the task's path.")
  else:
    raise EvalError(f"{path}: a 'ppl' task reads a .txt or .jsonl file. Convert it to one.")
  docs = [d for d in docs if d]
  if not docs:
    raise EvalError(f"{path}: holds no text to score.")
  return docs


def validation_task(d: ml_collections.ConfigDict, num_docs: int, name: str = "val") -> Task:
  """A 'ppl' task of the first `num_docs` validation documents of a data config's source."""
  docs = tuple(itertools.islice(sources.open_corpus(d).texts(sources.VAL), num_docs))
  if not docs:
    raise EvalError(f"the data source ({d.source}) has no validation documents. Raise "
                    "data.val_fraction or use a 'ppl' task file instead.")
  return Task(name, "ppl", f"validation split of data.source={d.source!r}", examples=docs)


# ---- prompts and requests -----------------------------------------------------------------------
def fewshot_indices(n: int, k: int, seed: int, index: int, exclude_index: bool) -> list[int]:
  """k distinct indices into a pool of n for example `index`, drawn with (seed, index).

  With `exclude_index` (the pool is the task's own examples) `index` itself is never drawn.
  """
  rng = np.random.default_rng([seed, index])
  picks = rng.choice(n - exclude_index, size=k, replace=False)
  return [int(j) + int(exclude_index and j >= index) for j in picks]


def fewshot_prompt(task: Task, index: int, shots: int, seed: int,
                   separator: str = SEPARATOR) -> str:
  """The context of example `index` preceded by `shots` demonstrations."""
  context = task.examples[index].context
  if not shots:
    return context
  pool = task.pool or task.examples
  picks = fewshot_indices(len(pool), shots, seed, index, exclude_index=not task.pool)
  return separator.join([pool[j].demo for j in picks] + [context])


def example_requests(task: Task, tokenizer, ctx: int, shots: int = 0,
                     seed: int = 0) -> list[Request]:
  """One request per (example, choice) of an 'mc' or 'lambada' task, in order."""
  requests = []
  for i, ex in enumerate(task.examples):
    context = [tokenizer.eos_id] + tokenizer.encode(fewshot_prompt(task, i, shots, seed))
    for choice in ex.choices:
      ids = tokenizer.encode(choice)
      if not 1 <= len(ids) <= ctx:
        raise EvalError(f"{ex.where}: {choice!r:.40} is {len(ids)} tokens; a choice or target must "
                        f"be 1 to {ctx} (the model context) tokens.")
      requests.append((context, ids))
  return requests


def document_requests(docs: Sequence[str], tokenizer, ctx: int) -> list[Request]:
  """Each document, EOS first, as non-overlapping windows: (first token, the next <= ctx)."""
  requests = []
  for doc in docs:
    ids = [tokenizer.eos_id] + tokenizer.encode(doc)
    requests += [(ids[s:s + 1], ids[s + 1:s + ctx + 1]) for s in range(0, len(ids) - 1, ctx)]
  return requests
