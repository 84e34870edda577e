"""EleutherAI's lm-evaluation-harness on gptjax models: the `gptjax` model backend.

`GptjaxLM` is registered with lm-eval as `gptjax` when this module is imported. It opens a run
(latest or a given step; float, quantized and serving checkpoints) or a local Hugging Face GPT-2
folder through `gptjax.serving`, and answers lm-eval's three request types:

- `loglikelihood(context, continuation)`: the summed log-probability of the continuation and
  whether greedy decoding reproduces it, from `gptjax.evaluate.Scorer` (batched, sharded over the
  run's mesh). Text is tokenized as `gptjax.evaluate` does: [EOS] + context, then the continuation
  on its own, so both give the same numbers on the same examples.
- `loglikelihood_rolling(text)`: the document's log-likelihood, [EOS] first, in non-overlapping
  windows of the model context (as `gptjax.evaluate`'s perplexity and the validation loss).
- `generate_until(context, {until, max_gen_toks, do_sample, temperature, top_k, top_p})`: KV-cache
  decoding (`gptjax.generate`), batched, cut at the first stop sequence; other generation
  settings are refused, naming the task.

From the shell (`pip install 'gptjax[eval]'`): `python scripts/harness.py run --model gptjax
--model_args workdir=runs/tiny --tasks <task> [--include_path <folder of task YAML>]`, which is
lm-eval's own CLI with this backend registered. In training: `eval.harness_tasks` runs tasks at
every `train.eval_every` and logs `eval/harness/<task>/<metric>` (`HarnessSuite`).
"""

from collections.abc import Sequence
import functools
import logging
import os
from typing import Any

import lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
import numpy as np
import yaml

from gptjax import evaluate, generate, serving
from gptjax.errors import ConfigError
from gptjax.eval_tasks import document_requests

NAME = "gptjax"
# Keys an lm-eval task YAML may not lack (a group file lists tasks instead; `include` inherits).
_TASK_KEYS = ("task", "output_type", "doc_to_text")
_OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")


def _arg(value, kind, name):
  if value is None or value == "":
    return None
  try:
    return kind(value)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--model_args {name}: expected {kind.__name__}, got {value!r}") from e


@register_model(NAME)
class GptjaxLM(LM):
  """A gptjax model behind lm-eval's `LM` interface.

  Args (lm-eval's `--model_args`, or keywords):
    workdir: a gptjax run (its latest checkpoint, or `step`); float or quantized.
    step: the checkpoint step (default: the latest).
    hf_dir: a local Hugging Face GPT-2 folder, instead of `workdir`.
    batch_size: rows per scoring / decoding batch (default: the run's micro-batch; 8 for HF).
    max_gen_toks: generate_until's default new-token limit when a task gives none.
    served: an opened model (`gptjax.serving.Served`), instead of the above (the training loop).
  lm-eval's `device` and `max_batch_size` are accepted and unused: the model runs on the JAX
  devices of the run's mesh.
  """

  def __init__(self, workdir: str | None = None, step: int | str | None = None,
               hf_dir: str | None = None, batch_size: int | str | None = None,
               max_gen_toks: int | str = 256, served: serving.Served | None = None,
               device: str | None = None, max_batch_size: int | None = None, **unknown):
    super().__init__()
    del device, max_batch_size
    if unknown:
      raise ConfigError(f"--model_args: unknown {sorted(unknown)}; gptjax takes workdir, step, "
                        "hf_dir, batch_size and max_gen_toks.")
    if served is None:
      if bool(workdir) == bool(hf_dir):
        raise ConfigError("--model_args: give workdir=<gptjax run> or hf_dir=<Hugging Face GPT-2 "
                          "folder>, one of them.")
      served = (serving.open_run(workdir, _arg(step, int, "step"), setting="--model_args workdir")
                if workdir else serving.open_hf(hf_dir))
    self.served = served
    size = _arg(batch_size, int, "batch_size") if batch_size != "auto" else None
    self.batch = size or served.batch_size
    self.max_gen_toks = _arg(max_gen_toks, int, "max_gen_toks")
    self.tokenizer = served.tokenizer
    self.scorer = evaluate.Scorer(served.model, served.tokenizer, self.batch, served.mesh,
                                  served.rules)

  # ---- log-likelihoods ----------------------------------------------------------------------
  def _context(self, text: str) -> list[int]:
    return [self.tokenizer.eos_id] + self.tokenizer.encode(text)

  def _score(self, pairs) -> dict[str, np.ndarray]:
    with self.served.routing():
      return self.scorer.score(self.served.params, pairs)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = []
    for r in requests:
      context, continuation = r.args[0], r.args[1]
      ids = self.tokenizer.encode(continuation)
      if not 1 <= len(ids) <= self.served.model.args.ctx:
        raise ConfigError(f"task {r.task_name}: the continuation {continuation!r:.60} is "
                          f"{len(ids)} tokens; gptjax scores 1 to {self.served.model.args.ctx} "
                          "(the model context).")
      pairs.append((self._context(context), ids))
    out = self._score(pairs)
    return [(float(lp), bool(g)) for lp, g in zip(out["logprob"], out["greedy"])]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, r in enumerate(requests):
      doc = document_requests([r.args[0]], self.tokenizer, self.served.model.args.ctx)
      windows += doc
      owner += [i] * len(doc)
    logprob = self._score(windows)["logprob"] if windows else np.zeros(0)
    totals = np.zeros(len(requests))
    np.add.at(totals, np.asarray(owner, int), logprob)
    return [float(t) for t in totals]

  # ---- generation ---------------------------------------------------------------------------
  @functools.cached_property
  def _decoder(self) -> serving.Served:
    return serving.unrolled(self.served)  # faster KV-cache decoding

  def check_stops(self, until: Sequence[str], task: str | None) -> None:
    """Raises ConfigError for a stop sequence this tokenizer cannot write: one that does not decode
    back to itself, so the model's output could never contain it."""
    for stop in until:
      back = self.tokenizer.decode(self.tokenizer.encode(stop)) if stop else ""
      if back != stop:
        raise ConfigError(
            f"task {task}: generate_until's stop sequence {stop!r} cannot be encoded by this "
            f"run's tokenizer (it comes back as {back!r}), so generation could never stop on it. "
            "Set the task's generation_kwargs.until to text the tokenizer keeps, e.g. '\\n'.")

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
      kwargs = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
      until = kwargs.pop("until", None)
      until = tuple([until] if isinstance(until, str) else until or ())
      max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      sample = kwargs.pop("do_sample", False)
      temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
      top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
      if kwargs:
        raise ConfigError(
            f"task {r.task_name}: generation_kwargs {sorted(kwargs)} are not supported by the "
            "gptjax backend (it takes until, max_gen_toks, do_sample, temperature, top_k, top_p).")
      key = (until, max_new, temperature, top_k, top_p)
      if key not in groups:
        self.check_stops(until, r.task_name)
      groups.setdefault(key, []).append(i)
    out: list[str] = [""] * len(requests)
    d = self._decoder
    for (until, max_new, temperature, top_k, top_p), members in groups.items():
      max_new = max(1, min(max_new, d.model.args.ctx - 1))
      for start in range(0, len(members), self.batch):
        chunk = members[start:start + self.batch]
        prompts = [self._context(requests[i].args[0]) for i in chunk]
        with d.routing():
          new = generate.generate(d.model, d.params, prompts, max_new, temperature=temperature,
                                  top_k=top_k, top_p=top_p, eos_id=self.tokenizer.eos_id)
        for i, tokens in zip(chunk, new):
          if tokens and tokens[-1] == self.tokenizer.eos_id:
            tokens = tokens[:-1]
          text = self.tokenizer.decode(tokens)
          cuts = [text.find(s) for s in until if s and s in text]
          out[i] = text[:min(cuts)] if cuts else text
    return out


# ---- tasks ------------------------------------------------------------------------------------
def check_task_files(folder: str, setting: str = "config.eval.harness_include") -> None:
  """Raises ConfigError naming the file for a task YAML in `folder` that lm-eval cannot read: not
  YAML, not a mapping, or a task without `task`, `output_type` or `doc_to_text`."""
  if not os.path.isdir(folder):
    raise ConfigError(f"{setting}: {folder!r} is not a folder of lm-eval task YAML files.")
  for root, _, files in os.walk(folder):
    for name in sorted(files):
      if not name.endswith((".yaml", ".yml")):
        continue
      path = os.path.join(root, name)
      try:
        with open(path, encoding="utf-8") as f:
          spec = yaml.load(f, Loader=_Lenient)
      except yaml.YAMLError as e:
        raise ConfigError(f"{setting}: {path} is not valid YAML ({str(e).splitlines()[0]}); an "
                          "lm-eval task file is a YAML mapping.") from e
      if not isinstance(spec, dict):
        raise ConfigError(f"{setting}: {path} is not an lm-eval task: a task file is a YAML "
                          f"mapping, this one holds a {type(spec).__name__}.")
      if "group" in spec or "include" in spec:
        continue  # groups list tasks; an include inherits the keys
      missing = [k for k in _TASK_KEYS if k not in spec]
      if missing:
        raise ConfigError(f"{setting}: {path} is not a valid lm-eval task: it lacks {missing} "
                          f"(a task needs {list(_TASK_KEYS)}).")
      if spec["output_type"] not in _OUTPUT_TYPES:
        raise ConfigError(f"{setting}: {path}: output_type {spec['output_type']!r} is not one of "
                          f"lm-eval's {_OUTPUT_TYPES}.")


class _Lenient(yaml.SafeLoader):
  """SafeLoader that reads lm-eval's `!function module.name` tags as plain strings."""


_Lenient.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def task_manager(include: str = "", setting: str = "config.eval.harness_include"):
  """lm-eval's TaskManager over its own tasks and the YAML files of `include` (checked first)."""
  if include:
    check_task_files(include, setting)
  logging.getLogger("lm_eval").setLevel(logging.WARNING)
  return TaskManager(include_path=include or None)


def check_tasks(names: Sequence[str], manager, setting: str = "config.eval.harness_tasks") -> None:
  """Raises ConfigError naming every task lm-eval does not know."""
  unknown = [n for n in names if n not in manager.all_tasks]
  if unknown:
    raise ConfigError(
        f"{setting}: unknown lm-eval task(s) {unknown}. Use names from `lm-eval ls tasks`, or the "
        "`task:` of a YAML file in eval.harness_include (--include_path from the shell).")


def parse(spec: str) -> list[str]:
  return [t.strip() for t in spec.split(",") if t.strip()]


def evaluate_tasks(lm: GptjaxLM, names: Sequence[str], manager, limit: int | None = None,
                   shots: int | None = None) -> dict[str, dict[str, Any]]:
  """lm-eval's results for `names`: {task: {metric: value}} (stderr and aliases left out)."""
  out = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager,
                                limit=limit or None, num_fewshot=shots or None,
                                bootstrap_iters=0, log_samples=False, verbosity="WARNING")
  results = {}
  for task, metrics in out["results"].items():
    results[task] = {key.split(",")[0]: float(v) for key, v in metrics.items()
                     if isinstance(v, (int, float)) and "_stderr" not in key and key != "alias"}
  return results


class HarnessSuite:
  """`eval.harness_tasks` in the training loop: run at each validation point, logged as
  `eval/harness/<task>/<metric>`. Task names and files are checked when it is built."""

  def __init__(self, cfg, trainer, tokenizer):
    e = cfg.eval
    self.names = parse(e.harness_tasks)
    self.manager = task_manager(e.harness_include)
    check_tasks(self.names, self.manager)
    self.limit, self.shots = e.harness_limit, e.shots
    self.trainer, self.tokenizer = trainer, tokenizer

  def metrics(self, params) -> dict[str, float]:
    t = self.trainer
    served = serving.Served(t.model, params, self.tokenizer, t.cfg, mesh=t.mesh, rules=t.rules,
                            batch_size=t.run.micro_batch)
    results = evaluate_tasks(GptjaxLM(served=served), self.names, self.manager, self.limit,
                             self.shots)
    return {f"eval/harness/{task}/{m}": v for task, r in results.items() for m, v in r.items()}
