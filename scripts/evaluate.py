"""Evaluates a trained run's checkpoint on downstream tasks; prints a table and writes JSON.

  python scripts/evaluate.py --workdir=runs/tiny --tasks=qa:tests/data/mc.jsonl:mc
  python scripts/evaluate.py --workdir=runs/x --step=2000 --shots=3 --val_docs=100 \\
      --tasks=qa:data/qa.jsonl:mc:data/qa_pool.jsonl,lam:data/lambada.jsonl:lambada

Task specs and file schemas: gptjax/eval_tasks.py. Results go to <workdir>/eval/step_<N>.json.
--workdir may also be a quantized serving checkpoint from scripts/compress.py (<out>/serve/int8).
Multi-process as scripts/train.py: --coordinator_address/--num_processes/--process_id.
"""

from absl import app, flags, logging

from gptjax import cli, distributed, eval_tasks, evaluate, serving, storage

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by scripts/train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
_TASKS = flags.DEFINE_string("tasks", "", "Comma-separated name:path:kind[:fewshot_path]; kind is "
                             "mc, lambada or ppl.")
_VAL_DOCS = flags.DEFINE_integer("val_docs", 0, "Also score perplexity and bits per byte on this "
                                 "many validation documents of the run's data source (0 = none).")
_SHOTS = flags.DEFINE_integer("shots", 0, "Few-shot demonstrations before each example.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the few-shot draw.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Sequences per scoring batch (0 = the run's "
                              "micro-batch).")
distributed.define_flags()
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax warns about read-only restores: expected here
    logging.set_verbosity(logging.ERROR)
  distributed.initialize_from_flags()
  if _SHOTS.value < 0 or _SEED.value < 0:
    raise app.UsageError("--shots and --seed must be >= 0")
  tasks = eval_tasks.load_tasks(_TASKS.value, "--tasks", _SHOTS.value)  # every file checked first
  # A URL workdir (s3://, gs://) is read through a local copy; the results file is uploaded.
  with storage.mirrored(_WORKDIR.value, delete_steps=False) as workdir:
    _evaluate(workdir, tasks)


def _evaluate(workdir: str, tasks) -> None:
  served = serving.open_run(workdir, _STEP.value)  # float or quantized
  scorer = evaluate.Scorer(served.model, served.tokenizer, _BATCH.value or served.batch_size,
                           served.mesh, served.rules)
  if _VAL_DOCS.value:
    if any(t.name == "val" for t in tasks):
      raise app.UsageError("--val_docs adds a task named 'val'; rename the --tasks one")
    tasks.append(eval_tasks.validation_task(served.cfg.data, _VAL_DOCS.value))
  if not tasks:
    raise app.UsageError("nothing to evaluate: give --tasks and/or --val_docs")
  with served.routing():
    results = evaluate.run_tasks(scorer, served.params, tasks, _SHOTS.value, _SEED.value)
  step = served.step
  path = evaluate.write_results(workdir, step, {
      "workdir": _WORKDIR.value, "step": step, "shots": _SHOTS.value, "seed": _SEED.value,
      "tasks": results})
  print(f"step {step} of {_WORKDIR.value}, {_SHOTS.value}-shot")
  print(evaluate.format_table(results))
  if workdir != _WORKDIR.value:  # the local copy's file goes to the store when the block ends
    path = _WORKDIR.value.rstrip("/") + path[len(workdir):]
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
