"""Evaluation: perplexity and bits per byte, multiple choice by log-likelihood, LAMBADA last word.

Every task reduces to scoring (context, continuation) token pairs: the summed log-probability of the
continuation given the context, and whether greedy decoding reproduces it. `Scorer` packs any
number of pairs into fixed-shape [B, L] batches for one jitted function, `score_batch`.

    tasks = evaluate.load_tasks("mc:tests/data/mc.jsonl:mc,lam:tests/data/lambada.jsonl:lambada")
    scorer = evaluate.Scorer(model, tokenizer, batch_size=8)
    results = evaluate.run_tasks(scorer, params, tasks, shots=0, seed=0)  # {name: {metric: value}}

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

Conventions (those of GPT-3's evaluation):
- The scored text is `context + continuation` exactly as written, so a continuation carries its
  own leading space (" Paris"). The two are tokenized apart, and the context starts with EOS, the
  token that precedes every document in training.
- k shots: k demonstrations (context + right answer) drawn without replacement by a generator
  seeded with (seed, example index), so the draw is fixed and never holds the example itself, are
  joined with the example's context by SEPARATOR ("\\n\\n").
- Contexts longer than the model window lose their beginning (the first demonstrations go first);
  a continuation longer than the window is an error.
- Multiple choice: `acc` takes the argmax of the summed log-probabilities; `acc_per_token` of the
  sum divided by the choice's token count (GPT-3's normalisation); `acc_per_byte` of the sum
  divided by its UTF-8 bytes (comparable across tokenizers). Ties go to the first choice.
- LAMBADA: an example is right iff at every target position the most likely next token, given the
  true tokens before it, is the target token. `target_ppl` = exp(mean nll of the target tokens).
- Perplexity: each document, after an EOS, is cut into non-overlapping windows of ctx tokens (a
  token sees the earlier tokens of its window), as the validation loss is. `ppl` = exp(nats per
  token); `bits_per_byte` = nats / (ln 2 · UTF-8 bytes of the documents), comparable across
  tokenizers. The closing EOS is not scored (it has no bytes).
"""

from collections.abc import Sequence
import dataclasses
import functools
import itertools
import json
import math
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gptjax import checkpoint, feed, sharding
from gptjax.errors import ConfigError
from gptjax.data import sources, tokenizer as tokenizer_lib
from gptjax.model import GPT
from gptjax.train import Trainer

KINDS = ("mc", "lambada", "ppl")
SEPARATOR = "\n\n"
LOGITS_BUDGET = 1 << 28  # logits (float32) formed at once by the scorer, over the batch: 1 GiB
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
                    "schema in gptjax/evaluate.py.")
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


# ---- scoring ------------------------------------------------------------------------------------
def score_batch(params, batch: dict[str, jax.Array], *, model: GPT) -> dict[str, jax.Array]:
  """Per-row sums over the weighted target tokens of one batch.

  The logits are formed for a slice of positions at a time, at most LOGITS_BUDGET of them
  ([B, slice, V] float32) over the batch, so a large batch or vocabulary never holds them whole.

  Args:
    params: the model's parameters.
    batch: `inputs` and `targets` int32 [B, L] (targets = inputs shifted by one), `weights`
      float32 [B, L]: 1 on the continuation's tokens, 0 elsewhere (context, padding).
    model: the GPT module.

  Returns:
    `logprob` [B]: sum of weight * log p(target); `tokens` [B]: sum of weights; `greedy` [B]: the
    argmax token equals the target at every weighted position.
  """
  x_BxLxD = model.apply({"params": params}, batch["inputs"], method=GPT.hidden)
  b, length, _ = x_BxLxD.shape
  step = length
  while step % 2 == 0 and b * step * model.args.padded_vocab > LOGITS_BUDGET:
    step //= 2

  def positions(xs):
    x_BxSxD, targets_BxS, weights_BxS = xs
    logits_BxSxV = model.apply({"params": params}, x_BxSxD, method=GPT.logits)
    log_z_BxS = jax.nn.logsumexp(logits_BxSxV, axis=-1)
    target_BxS = jnp.take_along_axis(logits_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
    miss_BxS = (jnp.argmax(logits_BxSxV, axis=-1) != targets_BxS) & (weights_BxS > 0)
    return ((target_BxS - log_z_BxS) * weights_BxS).sum(-1), miss_BxS.sum(-1)

  xs = (x_BxLxD, batch["targets"], batch["weights"])
  if step == length:
    logprob_B, misses_B = positions(xs)
  else:  # slices of `step` positions, one after another: [L / step, B, step, ...]
    xs = jax.tree.map(lambda a: jnp.moveaxis(a.reshape(b, length // step, step, *a.shape[2:]), 1,
                                             0), xs)
    logprob_B, misses_B = jax.tree.map(lambda a: a.sum(0), jax.lax.map(positions, xs))
  return {"logprob": logprob_B, "tokens": batch["weights"].sum(-1), "greedy": misses_B == 0}


class Scorer:
  """Scores requests with one jitted `score_batch`, in batches of fixed shape.

  A batch is [B, L]: B is `batch_size` (or fewer when the call has fewer requests), L the
  smallest power of two (at least 16) that holds the longest request of the call, capped at the
  model context; so a task compiles once. Requests are cut on the left to ctx + 1 tokens and padded
  on the right with weight 0. With a mesh, rows are split over its batch axes (B is rounded up to a
  multiple) and the parameters are used as they are sharded.
  """

  def __init__(self, model: GPT, tokenizer, batch_size: int = 8, mesh=None, rules=()):
    self.model, self.tokenizer, self.ctx = model, tokenizer, model.args.ctx
    self.mesh, self.rules, self.batch_size = mesh, tuple(rules), batch_size
    fn = functools.partial(score_batch, model=model)
    self._shards = 1
    if mesh is None:
      self._fn = jax.jit(fn)
      return
    self._rows = sharding.batch_sharding(mesh, self.rules)
    self._shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(self._rows.spec[0]))
    self._fn = jax.jit(fn, out_shardings=sharding.replicated(mesh))

  def score(self, params, requests: Sequence[Request]) -> dict[str, np.ndarray]:
    """`logprob`, `tokens` and `greedy` (see `score_batch`) of each request, as numpy [N]."""
    ctx = self.ctx
    seqs, spans = [], []
    for context, continuation in requests:
      if not context or not 1 <= len(continuation) <= ctx:
        raise ValueError(f"a request needs a context and 1 to {ctx} continuation tokens, got "
                         f"{len(context)} and {len(continuation)}")
      seqs.append((list(context) + list(continuation))[-(ctx + 1):])
      spans.append(len(continuation))
    if not seqs:
      return {"logprob": np.zeros(0), "tokens": np.zeros(0), "greedy": np.zeros(0, bool)}
    length = min(ctx, max(16, 1 << (max(len(s) for s in seqs) - 2).bit_length()))
    b = -(-min(self.batch_size, len(seqs)) // self._shards) * self._shards
    outs = []
    for start in range(0, len(seqs), b):
      batch = {k: np.zeros((b, length), dtype) for k, dtype in
               (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}
      for row, (seq, n) in enumerate(zip(seqs[start:start + b], spans[start:start + b])):
        m = len(seq) - 1
        batch["inputs"][row, :m], batch["targets"][row, :m] = seq[:-1], seq[1:]
        batch["weights"][row, m - n:m] = 1.0
      outs.append(self._call(params, batch))
    outs = jax.device_get(outs)
    return {k: np.concatenate([o[k] for o in outs])[:len(seqs)] for k in outs[0]}

  def _call(self, params, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    if self.mesh is None:
      return self._fn(params, batch)
    rows = feed.HostRows.of(self.mesh, sharding.batch_axes(self.rules), len(batch["inputs"]))
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._fn(params, rows.to_global(rows.select(batch)))


# ---- tasks --------------------------------------------------------------------------------------
def multiple_choice(scorer: Scorer, params, task: Task, shots: int = 0,
                    seed: int = 0) -> dict[str, Any]:
  """Accuracy of an 'mc' task: unnormalised, per token and per byte (see the module docstring)."""
  scores = scorer.score(params, example_requests(task, scorer.tokenizer, scorer.ctx, shots, seed))
  hits, start = {"acc": [], "acc_per_token": [], "acc_per_byte": []}, 0
  for ex in task.examples:
    stop = start + len(ex.choices)
    logprob, tokens = scores["logprob"][start:stop], scores["tokens"][start:stop]
    n_bytes = np.array([len(c.encode("utf-8")) for c in ex.choices])
    for key, score in (("acc", logprob), ("acc_per_token", logprob / tokens),
                       ("acc_per_byte", logprob / n_bytes)):
      hits[key].append(int(np.argmax(score)) == ex.label)
    start = stop
  return {"kind": "mc", "examples": len(task.examples), "shots": shots,
          **{k: float(np.mean(v)) for k, v in hits.items()}}


def lambada(scorer: Scorer, params, task: Task, shots: int = 0, seed: int = 0) -> dict[str, Any]:
  """Last-word accuracy (greedy, teacher-forced) and the perplexity of the target tokens."""
  scores = scorer.score(params, example_requests(task, scorer.tokenizer, scorer.ctx, shots, seed))
  nll = -float(scores["logprob"].sum()) / float(scores["tokens"].sum())
  return {"kind": "lambada", "examples": len(task.examples), "shots": shots,
          "acc": float(np.mean(scores["greedy"])), "target_ppl": math.exp(nll),
          "target_nll": nll}


def perplexity(scorer: Scorer, params, docs: Sequence[str]) -> dict[str, Any]:
  """Perplexity (per token) and bits per byte of documents (see the module docstring)."""
  scores = scorer.score(params, document_requests(docs, scorer.tokenizer, scorer.ctx))
  nats, tokens = -float(scores["logprob"].sum()), float(scores["tokens"].sum())
  n_bytes = sum(len(d.encode("utf-8")) for d in docs)
  return {"kind": "ppl", "documents": len(docs), "tokens": int(tokens), "bytes": n_bytes,
          "nll": nats / tokens, "ppl": math.exp(nats / tokens),
          "bits_per_byte": nats / (math.log(2) * n_bytes)}


def run_tasks(scorer: Scorer, params, tasks: Sequence[Task], shots: int = 0,
              seed: int = 0) -> dict[str, dict[str, Any]]:
  """Runs every task; returns {task name: its results, with 'kind' and 'path'}."""
  results = {}
  for t in tasks:
    if t.kind == "ppl":
      r = perplexity(scorer, params, t.examples)
    else:
      r = (multiple_choice if t.kind == "mc" else lambada)(scorer, params, t, shots, seed)
    results[t.name] = {**r, "path": t.path}
  return results


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
  """`eval/<task>/<metric>` for the METRICS of each task's kind."""
  return {f"eval/{name}/{m}": r[m] for name, r in results.items() for m in METRICS[r["kind"]]}


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A plain-text table of the results, one task a line."""
  lines = [f"{'task':<16} {'kind':<8} {'n':>6}  metrics"]
  for name, r in results.items():
    n = r.get("examples", r.get("documents"))
    lines.append(f"{name:<16} {r['kind']:<8} {n:>6}  "
                 + "  ".join(f"{m} {r[m]:.4f}" for m in METRICS[r["kind"]]))
  return "\n".join(lines)


@dataclasses.dataclass
class Suite:
  """The tasks of `cfg.eval`, run by the training loop at each validation point."""

  tasks: list[Task]
  scorer: Scorer | None
  shots: int
  seed: int

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, trainer: Trainer, tokenizer) -> "Suite":
    """Reads and checks the task files now, before training starts."""
    e = cfg.eval
    tasks = load_tasks(e.tasks, "config.eval.tasks", e.shots)
    scorer = (Scorer(trainer.model, tokenizer, trainer.run.micro_batch, trainer.mesh,
                     trainer.rules) if tasks else None)
    return cls(tasks, scorer, e.shots, e.seed)

  def metrics(self, params) -> dict[str, float]:
    """`eval/<task>/<metric>` of every task ({} when there are none)."""
    if not self.tasks:
      return {}
    return flat_metrics(run_tasks(self.scorer, params, self.tasks, self.shots, self.seed))


# ---- a trained run ------------------------------------------------------------------------------
@dataclasses.dataclass
class Restored:
  """A run restored for evaluation: its config, tokenizer, model (in `trainer`) and parameters."""

  cfg: ml_collections.ConfigDict
  tokenizer: Any
  trainer: Trainer
  params: Any
  step: int


def load_run(workdir: str, step: int | None = None, devices=None) -> Restored:
  """Restores the parameters of a run's checkpoint (the latest, or `step`) with its config and
  tokenizer. The run's mesh is kept if it fits `devices` (default all), else all of them serve as
  the data axis."""
  try:
    cfg = checkpoint.read_config(workdir, "--workdir")
  except ConfigError as e:
    raise EvalError(str(e)) from e
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = steps = None
  if os.path.isdir(directory):
    manager = ocp.CheckpointManager(
        directory, item_handlers={"params": ocp.StandardCheckpointHandler(),
                                  "opt_state": ocp.StandardCheckpointHandler(),
                                  "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(manager.all_steps())
  if not steps:
    raise EvalError(f"workdir {workdir!r} holds no checkpoint (nothing in {directory}). Train "
                    "first, or point --workdir at a run that saved one.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise EvalError(f"workdir {workdir!r} has no checkpoint at step {step}; it has {steps}. "
                    "Pass one of these as --step, or leave it out for the latest.")
  if not any(os.path.exists(os.path.join(workdir, n))
             for n in (tokenizer_lib.WORKDIR_SPM, tokenizer_lib.WORKDIR_GPT2)):
    raise EvalError(f"workdir {workdir!r} has no saved tokenizer ({tokenizer_lib.WORKDIR_SPM} or "
                    f"{tokenizer_lib.WORKDIR_GPT2}/), so text cannot be encoded as in training.")
  tokenizer = tokenizer_lib.load_or_train(cfg.data, workdir)
  devices = jax.devices() if devices is None else devices
  try:
    sharding.mesh_shape(cfg.mesh, len(devices))
  except ConfigError:
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  trainer = Trainer.build(cfg, sharding.make_mesh(cfg.mesh, devices))
  abstract = trainer.abstract_state.params
  stored = manager.item_metadata(step)["params"]
  checkpoint.check_shapes(getattr(stored, "tree", stored), abstract,
                          f"the checkpoint at {directory} (step {step})")
  params = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract))).params
  manager.close()
  return Restored(cfg, tokenizer, trainer, params, step)


def write_results(workdir: str, step: int, results: dict[str, Any]) -> str:
  """Writes `results` as `<workdir>/eval/step_<step>.json` (process 0); returns the path."""
  path = os.path.join(workdir, "eval", f"step_{step}.json")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
  return path
