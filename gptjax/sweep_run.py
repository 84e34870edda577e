"""Running an expanded sweep: its plan and status, launch commands, Slurm script, local runs.

`gptjax.sweep` says what a sweep is (its runs, each a name and a checked config); this module says
how it runs. Each run lives in `<workdir>/<run name>/`, a normal gptjax workdir, so `run_local`
skips finished runs and resumes unfinished ones, and refuses a folder left by other settings;
`commands` and `slurm_script` emit the same runs as `scripts/train.py` launches; `table` lists each
run's size, cost and status; `write_manifest` records the sweep in `<workdir>/sweep.json`.

    sw = sweep.expand("configs/sweeps/lr_tiny.py")
    print(sweep_run.table(sw.runs, "runs/sweeps/lr_tiny"))
    sweep_run.run_local(sw, "runs/sweeps/lr_tiny")
"""

import copy
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from gptjax import accounting, metrics as metrics_lib, optim
from gptjax import run as run_lib
from gptjax.model import ModelArgs
from gptjax.sweep import SWEEP_JSON, Run, Sweep, SweepError, model_counts


def plan_row(run: Run, flops_per_s: float) -> dict[str, Any]:
  """Size and cost of a run: params, tokens, training FLOPs (PaLM count), est. seconds."""
  args = ModelArgs.from_config(run.config.model)
  counts, run_plan = model_counts(args), optim.plan(run.config)
  tokens = run_plan.tokens_before(run_plan.total_steps)
  flops = accounting.flops_per_token(args, run_plan.seq_len) * tokens
  return {"name": run.name, "params": counts.total, "non_embedding": counts.non_embedding,
          "steps": run_plan.total_steps, "tokens": tokens, "flops": flops,
          "est_s": flops / flops_per_s}


def status(run: Run, workdir: str) -> tuple[str, int]:
  """('done' | 'partial' | 'new', last logged step) of the run in `<workdir>/<run.name>`."""
  path = os.path.join(workdir, run.name)
  if not os.path.exists(os.path.join(path, "metrics.jsonl")):
    return "new", 0
  last = max((r["step"] for r in metrics_lib.read(path)), default=0)
  return ("done" if last >= optim.plan(run.config).total_steps else "partial"), last


# Settings a run may change between its start and a resume: set from the tokenizer, or cosmetic.
_MAY_DIFFER = ("model.vocab_size", "train.progress")


def changed_settings(run: Run, workdir: str) -> list[str]:
  """Settings whose value in `<workdir>/<run.name>/config.json` differs from the run's now."""
  saved = run_lib.saved_config(os.path.join(workdir, run.name))
  if saved is None:
    return []
  old = _flatten(saved)
  new = _flatten(json.loads(run.config.to_json_best_effort()))
  return [f"{k}: {old[k]!r} there, {v!r} now" for k, v in new.items()
          if k in old and k not in _MAY_DIFFER and old[k] != v]  # keys new in configs/base.py pass


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def table(runs: Sequence[Run], workdir: str | None = None, flops_per_s: float = 5e10) -> str:
  """The runs as a text table: name, params, tokens, FLOPs, est. time (status, given a workdir)."""
  rows = [plan_row(r, flops_per_s) for r in runs]
  width = max(len("name"), *(len(r["name"]) for r in rows))
  head = f"{'name':<{width}} {'params':>12} {'non-emb':>12} {'steps':>7} {'tokens':>12} " \
         f"{'FLOPs':>9} {'est. time':>10}" + ("  status" if workdir else "")
  lines = [head, "-" * len(head)]
  for run, r in zip(runs, rows):
    state = ""
    if workdir:
      s, step = status(run, workdir)
      state = f"  {s}" + (f" (step {step})" if s == "partial" else "")
    lines.append(f"{r['name']:<{width}} {r['params']:>12,} {r['non_embedding']:>12,} "
                 f"{r['steps']:>7,} {r['tokens']:>12,} {r['flops']:>9.2e} "
                 f"{_duration(r['est_s']):>10}{state}")
  total_f, total_s = sum(r["flops"] for r in rows), sum(r["est_s"] for r in rows)
  lines.append(f"{len(rows)} runs, {total_f:.2e} FLOPs, about {_duration(total_s)} at "
               f"{flops_per_s:.3g} model FLOP/s")
  return "\n".join(lines)


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f}s"
  if seconds < 7200:
    return f"{seconds / 60:.0f}min"
  return f"{seconds / 3600:.1f}h" if seconds < 172800 else f"{seconds / 86400:.1f}d"


def write_manifest(sweep: Sweep, workdir: str) -> str:
  """Writes `<workdir>/sweep.json`: the sweep's name, file and each run's name, overrides, meta."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, SWEEP_JSON)
  with open(path, "w", encoding="utf-8") as f:
    runs = [{"name": r.name, "overrides": r.overrides, "meta": r.meta} for r in sweep.runs]
    json.dump({"sweep": sweep.name, "spec": sweep.spec, "runs": runs}, f, indent=1)
  return path


def command(sweep: Sweep, run: Run, workdir: str, python: str = "python",
            script: str = "scripts/train.py") -> list[str]:
  """The `scripts/train.py` command line of one run, as an argv list."""
  argv = [python, script, f"--config={sweep.spec}", f"--workdir={os.path.join(workdir, run.name)}"]
  for key, value in run.overrides.items():
    argv.append(f"--config.{key}={repr(value) if isinstance(value, float) else value}")
  t = run.config.train  # the tracked run's name and group (`sweep.expand`)
  argv += [f"--config.train.run_name={t.run_name}", f"--config.train.run_group={t.run_group}"]
  return argv


def commands(sweep: Sweep, workdir: str, python: str = "python") -> list[str]:
  """One shell line per run."""
  return [shlex.join(command(sweep, r, workdir, python)) for r in sweep.runs]


def slurm_script(sweep: Sweep, workdir: str, python: str = "python", sbatch: Sequence[str] = (),
                 max_parallel: int = 0) -> str:
  """An sbatch file that runs the sweep as a job array, one task per run (submit: `sbatch FILE`).

  Args:
    sweep: the expanded sweep.
    workdir: the sweep's folder (task logs go to `<workdir>/slurm/`).
    python: the interpreter on the cluster.
    sbatch: extra `#SBATCH` options, e.g. ['--partition=gpu', '--gres=gpu:8', '--time=04:00:00'].
    max_parallel: at most this many tasks at once (0 = no limit).
  """
  limit = f"%{max_parallel}" if max_parallel else ""
  logs = os.path.join(workdir, "slurm")
  lines = ["#!/bin/bash", f"#SBATCH --job-name={sweep.name}",
           f"#SBATCH --array=0-{len(sweep.runs) - 1}{limit}",
           f"#SBATCH --output={os.path.join(logs, '%A_%a.out')}"]
  lines += [f"#SBATCH {opt}" for opt in sbatch]
  lines += ["# Submit from the repository root. Slurm opens the log before this script runs, so",
            f"# create its folder first: mkdir -p {shlex.quote(logs)}",
            "# A task whose run finished trains no further; an unfinished one resumes.",
            "set -euo pipefail", 'case "$SLURM_ARRAY_TASK_ID" in']
  lines += [f"  {i}) exec {line} ;;" for i, line in enumerate(commands(sweep, workdir, python))]
  lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac", ""]
  return "\n".join(lines)


def check_resumable(sweep: Sweep, workdir: str) -> None:
  """Refuses a run folder left by another version of the sweep: it is neither resumed nor
  skipped."""
  for run in sweep.runs:
    changes = changed_settings(run, workdir)
    if changes:
      raise SweepError(f"{os.path.join(workdir, run.name)} holds a run of other settings ("
                       f"{'; '.join(changes[:5])}), so it cannot be resumed or skipped. Use a new "
                       "--workdir for the changed sweep, or delete that run's folder.")


def run_local(sweep: Sweep, workdir: str, in_process: bool = True, devices=None,
              log=print) -> dict[str, str]:
  """Runs the sweep here, one run after another; finished runs are skipped, unfinished resumed.

  Args:
    sweep: the expanded sweep.
    workdir: the sweep's folder; run `r` trains in `<workdir>/<r.name>`.
    in_process: call `gptjax.loop.run` here (default), or `scripts/train.py` in a subprocess.
    devices: the devices of in-process runs (default: all).
    log: where progress lines go.

  Returns:
    run name -> 'skipped' (finished before), 'trained', or 'stopped' (interrupted or failed; the
    runs after it are not started).
  """
  from gptjax import loop  # pylint: disable=import-outside-toplevel  (the data stack: only here)

  check_resumable(sweep, workdir)
  write_manifest(sweep, workdir)
  outcome, repo = {}, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for i, run in enumerate(sweep.runs):
    state, step = status(run, workdir)
    where = f"sweep {sweep.name}: [{i + 1}/{len(sweep.runs)}] {run.name}"
    if state == "done":
      log(f"{where}: finished already, skipped")
      outcome[run.name] = "skipped"
      continue
    log(f"{where}: " + ("starting" if state == "new" else
                        f"unfinished (logged to step {step}), resuming from its last checkpoint"))
    if in_process:
      summary = loop.run(copy.deepcopy(run.config), os.path.join(workdir, run.name), devices)
      stopped = summary["preempted"]
    else:
      absolute = dataclasses.replace(sweep, path=os.path.abspath(sweep.path))
      argv = command(absolute, run, os.path.abspath(workdir), sys.executable,
                     os.path.join(repo, "scripts", "train.py"))
      stopped = subprocess.run(argv, check=False).returncode != 0
    outcome[run.name] = "stopped" if stopped else "trained"
    if stopped:
      log(f"{where}: stopped before its end; run the same command again to resume")
      break
  return outcome
