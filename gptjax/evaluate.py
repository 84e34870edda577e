"""Evaluation: perplexity and bits per byte, multiple choice by log-likelihood, LAMBADA last word.

Every task reduces to scoring (context, continuation) token pairs: the summed log-probability of the
continuation given the context, and whether greedy decoding reproduces it. `Scorer` packs any
number of pairs into fixed-shape [B, L] batches for one jitted function, `score_batch`.

    tasks = eval_tasks.load_tasks("mc:tests/data/mc.jsonl:mc,lam:tests/data/lambada.jsonl:lambada")
    scorer = evaluate.Scorer(model, tokenizer, batch_size=8)
    results = evaluate.run_tasks(scorer, params, tasks, shots=0, seed=0)  # {name: {metric: value}}

Tasks, their files and the prompt conventions: `gptjax.eval_tasks`. Metrics:
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
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gptjax import feed, sharding
from gptjax.eval_tasks import (METRICS, Request, Task, document_requests, example_requests,
                               load_tasks)
from gptjax.model import GPT
from gptjax.train import Trainer

LOGITS_BUDGET = 1 << 28  # logits (float32) formed at once by the scorer, over the batch: 1 GiB


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
    with sharding.context(self.mesh, self.rules):
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


def write_results(workdir: str, step: int, results: dict[str, Any]) -> str:
  """Writes `results` as `<workdir>/eval/step_<step>.json` (process 0); returns the path."""
  path = os.path.join(workdir, "eval", f"step_{step}.json")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
  return path
