"""Compresses a trained run every way gptjax knows and tabulates what each costs and saves.

  python scripts/compress.py --workdir=runs/tiny --out=runs/tiny-compress
  python scripts/compress.py --workdir=runs/tiny --out=runs/c --methods=int8,int4 --group_size=64

Methods, each measured against the float run in --workdir:
  baseline       the trained float model
  int8           Qwix PTQ: Linear kernels int8 per output channel, embeddings int8 per row
  int4           Qwix PTQ: int4, groups of --group_size along the contraction axis (embeddings too)
  float+ft       the baseline trained --finetune_steps more (the reference for the next three)
  qat            --finetune_steps of int8 QAT from the baseline's weights, then int8 PTQ
  pruned50       --finetune_steps with magnitude pruning ramping to 50% (75% of the way)
  pruned24       --finetune_steps with 2:4 pruning from the first step
  student        a student half as deep and wide, --student_steps from scratch, no teacher
  distilled      the same student with the baseline as its teacher (compress.distill)

Columns: validation nats/token and bits per byte (gptjax.evaluate on the first --val_docs
held-out documents of the run's data); the serving checkpoint's size on disk (Orbax, parameters
only); peak memory of scoring one [--eval_batch, ctx] batch (XLA's memory analysis of the compiled
function: arguments + outputs + temporaries); greedy KV-cache decoding speed (--decode_batch rows x
--decode_tokens new tokens, median of 3, after compiling). Fine-tuned and distilled runs go to
<out>/<method>/, serving checkpoints to <out>/serve/<method>/ (quantized ones load with
gptjax.quantize.load), the table to <out>/results.md and <out>/results.json.
"""

import copy
import json
import os
import statistics
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from configs import base
from gptjax import checkpoint, cli, config, evaluate, generate, loop, quantize
from gptjax.data import tokenizer as tokenizer_lib

METHODS = ("baseline", "int8", "int4", "float+ft", "qat", "pruned50", "pruned24", "student",
           "distilled")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (scripts/train.py's workdir).")
_OUT = flags.DEFINE_string("out", None, "Where the compressed runs and the table go.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Subset of {', '.join(METHODS)}.")
_GROUP = flags.DEFINE_integer("group_size", 64, "int4: weights per scale along the contraction.")
_FT_STEPS = flags.DEFINE_integer("finetune_steps", 50, "Steps of QAT / pruning fine-tuning.")
_FT_LR = flags.DEFINE_float("finetune_lr_scale", 0.25, "Fine-tuning peak lr / the run's peak lr.")
_STUDENT_STEPS = flags.DEFINE_integer("student_steps", 0, "Student steps (0 = the run's steps).")
_VAL_DOCS = flags.DEFINE_integer("val_docs", 200, "Held-out documents scored.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 8, "Rows per scoring batch.")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 8, "Rows decoded together.")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 64, "New tokens per row.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices to use (0 = all).")
flags.mark_flags_as_required(["workdir", "out"])


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config on top of today's defaults (so every key exists)."""
  saved = checkpoint.read_config(workdir, "--workdir").to_dict()
  cfg = base.get_config()

  def merge(dst, src):
    for k, v in src.items():
      if isinstance(v, dict) and k in dst:
        merge(dst[k], v)
      else:
        dst[k] = v

  merge(cfg, saved)
  return cfg


def devices() -> list:
  return jax.devices()[:_NUM_DEVICES.value or None]


def train(cfg: ml_collections.ConfigDict, out: str) -> evaluate.Restored:
  """Runs the loop quietly (no progress bar, samples or intermediate evals); returns the run."""
  cfg.train.update(progress=False, sample_tokens=0, eval_every=0)
  cfg.checkpoint.update(save_every=0, keep_best=0)
  try:
    config.mesh_shape(cfg.mesh, len(devices()))
  except config.ConfigError:  # the run's mesh does not fit these devices: data parallel
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  loop.run(cfg, out, devices=devices())
  return evaluate.load_run(out, devices=devices())


def finetune(cfg: ml_collections.ConfigDict, workdir: str, out: str,
             **compress) -> evaluate.Restored:
  """--finetune_steps from the run's weights, with `compress` settings (section -> dict)."""
  cfg = copy.deepcopy(cfg)
  steps = _FT_STEPS.value
  cfg.train.update(steps=steps, tokens=0)
  cfg.optim.update(peak_lr=cfg.optim.peak_lr * _FT_LR.value, warmup_steps=max(1, steps // 10),
                   warmup_tokens=0, decay_steps=0, decay_tokens=0)
  cfg.checkpoint.restore_from = workdir
  for section, values in compress.items():
    cfg.compress[section].update(values)
  return train(cfg, out)


def student(cfg: ml_collections.ConfigDict, out: str, teacher: str = "") -> evaluate.Restored:
  """Half the layers, width and heads of the run's model, trained from scratch."""
  cfg = copy.deepcopy(cfg)
  m = cfg.model
  m.update(n_layers=max(1, m.n_layers // 2), d_model=m.d_model // 2, n_heads=max(1, m.n_heads // 2),
           d_head=0, d_ff=0)
  if _STUDENT_STEPS.value:
    cfg.train.update(steps=_STUDENT_STEPS.value, tokens=0)
  cfg.compress.distill.teacher = teacher
  return train(cfg, out)


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def measure(model, params, tokenizer, docs, serve_dir: str) -> dict:
  """Validation nats/token and bits/byte, checkpoint MiB, scoring peak MiB, decode tokens/s."""
  with quantize.routing():  # gptjax.evaluate applies GPT.hidden/logits by function
    scorer = evaluate.Scorer(model, tokenizer, batch_size=_EVAL_BATCH.value)
    ppl = evaluate.perplexity(scorer, params, docs)
    ctx = model.args.ctx
    batch = {"inputs": np.zeros((_EVAL_BATCH.value, ctx), np.int32),
             "targets": np.zeros((_EVAL_BATCH.value, ctx), np.int32),
             "weights": np.ones((_EVAL_BATCH.value, ctx), np.float32)}
    compiled = jax.jit(lambda p, b: evaluate.score_batch(p, b, model=model)).lower(
        params, batch).compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(1, model.args.vocab_size, 16)) for _ in range(_DECODE_BATCH.value)]
  times = []
  for _ in range(4):  # the first call compiles
    start = time.perf_counter()
    new = generate.generate(model, params, prompts, _DECODE_TOKENS.value, temperature=0.0)
    times.append(time.perf_counter() - start)
  assert all(len(row) == _DECODE_TOKENS.value for row in new)
  return {"val_nll": ppl["nll"], "bits_per_byte": ppl["bits_per_byte"],
          "checkpoint_mib": _dir_bytes(os.path.join(serve_dir, "checkpoints")) / 2**20,
          "peak_mib": peak / 2**20,
          "decode_tok_s": _DECODE_BATCH.value * _DECODE_TOKENS.value / statistics.median(times[1:]),
          "params": int(sum(x.size for x in jax.tree.leaves(params)))}


def save_float(out: str, params, cfg, source: str) -> str:
  """A float params-only serving checkpoint with the run's config and tokenizer."""
  checkpoint.save_params(out, 0, params, {"step": 0, "config": checkpoint.config_json(cfg)})
  tokenizer_lib.copy_saved(source, out)
  return out


def table(rows: dict[str, dict]) -> str:
  ref = rows.get("baseline")
  lines = ["| method | how | val nats/token | vs baseline | bits/byte | checkpoint MiB | smaller "
           "| peak MiB | decode tok/s |", "|" + "---|" * 9]
  for name, r in rows.items():
    rel = f"{r['val_nll'] / ref['val_nll'] - 1:+.2%}" if ref else ""
    smaller = f"{ref['checkpoint_mib'] / r['checkpoint_mib']:.2f}x" if ref else ""
    lines.append(f"| {name} | {r['how']} | {r['val_nll']:.4f} | {rel} | {r['bits_per_byte']:.4f} "
                 f"| {r['checkpoint_mib']:.2f} | {smaller} | {r['peak_mib']:.1f} "
                 f"| {r['decode_tok_s']:,.0f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  unknown = sorted(set(_METHODS.value) - set(METHODS))
  if unknown:
    raise app.UsageError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
  workdir, out = _WORKDIR.value, _OUT.value
  cfg = run_config(workdir)
  run = evaluate.load_run(workdir, devices=devices())
  docs = evaluate.validation_task(run.cfg.data, _VAL_DOCS.value).examples
  model, params, tok = run.trainer.model, run.params, run.tokenizer
  serve = os.path.join(out, "serve")
  int4 = quantize.Spec(4, _GROUP.value, embeddings=True)
  int8 = quantize.Spec(8, embeddings=True)
  rows = {}

  def ptq(name, spec, model, params, how):
    qmodel, qparams = quantize.quantize(model, params, spec)
    quantize.save(os.path.join(serve, name), qparams, spec, cfg, source=workdir)
    rows[name] = {"how": how, **measure(qmodel, qparams, tok, docs, os.path.join(serve, name))}

  def dense(name, r: evaluate.Restored, how):
    path = save_float(os.path.join(serve, name), r.params, r.cfg, workdir)
    rows[name] = {"how": how, **measure(r.trainer.model, r.params, tok, docs, path)}

  ft = f"+{_FT_STEPS.value} steps"
  for name in [m for m in METHODS if m in _METHODS.value]:
    print(f"compress: {name}", flush=True)
    if name == "baseline":
      dense(name, run, f"float32, {run.step} steps")
    elif name == "int8":
      ptq(name, int8, model, params, quantize.describe(int8))
    elif name == "int4":
      ptq(name, int4, model, params, quantize.describe(int4))
    elif name == "float+ft":
      dense(name, finetune(cfg, workdir, os.path.join(out, name)), f"float32 {ft}")
    elif name == "qat":
      r = finetune(cfg, workdir, os.path.join(out, name), qat={"enabled": True, "bits": 8})
      ptq(name, int8, r.trainer.model, r.params, f"QAT int8 {ft}, then {quantize.describe(int8)}")
    elif name == "pruned50":
      r = finetune(cfg, workdir, os.path.join(out, name), prune={
          "method": "magnitude", "sparsity": 0.5, "end_step": max(1, _FT_STEPS.value * 3 // 4)})
      dense(name, r, f"magnitude 50% {ft}")
    elif name == "pruned24":
      r = finetune(cfg, workdir, os.path.join(out, name), prune={"method": "2:4"})
      dense(name, r, f"2:4 {ft}")
    elif name in ("student", "distilled"):
      teacher = workdir if name == "distilled" else ""
      r = student(cfg, os.path.join(out, name), teacher)
      m, kd = r.cfg.model, r.cfg.compress.distill
      how = f"{m.n_layers}x{m.d_model}, {r.step} steps" + (
          f", KD alpha={kd.alpha} T={kd.temperature}" if teacher else "")
      dense(name, r, how)
  text = table(rows)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)
  print(text)
  print(f"wrote {os.path.join(out, 'results.md')} and results.json; runs and serving checkpoints "
        f"in {out}")


if __name__ == "__main__":
  cli.run(main)
