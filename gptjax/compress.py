"""The compression study: compresses a trained run every way gptjax knows and tabulates what each
method costs and saves. `scripts/compress.py` is a thin command line over `study`.

    rows = compress.study("runs/tiny", "runs/tiny-compress", compress.Options(methods=("int8",)))
    print(compress.table(rows))

Methods, each measured against the float run:
  baseline       the trained float model
  int8           Qwix PTQ: Linear kernels int8 per output channel, embeddings int8 per row
  int4           Qwix PTQ: int4, groups of `group_size` along the contraction axis (embeddings too)
  float+ft       the baseline trained `finetune_steps` more (the reference for the next three)
  qat            `finetune_steps` of int8 QAT from the baseline's weights, then int8 PTQ
  pruned50       `finetune_steps` with magnitude pruning ramping to 50% (75% of the way)
  pruned24       `finetune_steps` with 2:4 pruning from the first step
  student        a student half as deep and wide, `student_steps` from scratch, no teacher
  distilled      the same student with the baseline as its teacher (compress.distill)

Columns: validation nats/token and bits per byte (gptjax.evaluate on the first `val_docs`
held-out documents of the run's data); the serving checkpoint's size on disk (Orbax, parameters
only); peak memory of scoring one [eval_batch, ctx] batch (XLA's memory analysis of the compiled
function: arguments + outputs + temporaries); greedy KV-cache decoding speed (`decode_batch` rows x
`decode_tokens` new tokens, median of 3, after compiling). Fine-tuned and distilled runs go to
<out>/<method>/, serving checkpoints to <out>/serve/<method>/ (quantized ones load with
gptjax.quantize.load), the table to <out>/results.md and <out>/results.json. Needs the `compress`
extra (Qwix).
"""

import copy
import dataclasses
import json
import os
import statistics
import time

import jax
import ml_collections
import numpy as np

from configs import base
from gptjax import checkpoint, eval_tasks, evaluate, generate, loop, quantize, run as run_lib
from gptjax.data import tokenizer as tokenizer_lib
from gptjax.errors import ConfigError

METHODS = ("baseline", "int8", "int4", "float+ft", "qat", "pruned50", "pruned24", "student",
           "distilled")


@dataclasses.dataclass(frozen=True)
class Options:
  """What the study runs and how it measures (see the module docstring)."""

  methods: tuple[str, ...] = METHODS
  group_size: int = 64  # int4: weights per scale along the contraction
  finetune_steps: int = 50  # steps of QAT / pruning fine-tuning
  finetune_lr_scale: float = 0.25  # fine-tuning peak lr / the run's peak lr
  student_steps: int = 0  # 0 = the run's steps
  val_docs: int = 200  # held-out documents scored
  eval_batch: int = 8  # rows per scoring batch
  decode_batch: int = 8  # rows decoded together
  decode_tokens: int = 64  # new tokens per row
  num_devices: int = 0  # devices to use (0 = all)

  def check(self) -> None:
    unknown = sorted(set(self.methods) - set(METHODS))
    if unknown:
      raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")

  @property
  def devices(self) -> list:
    return jax.devices()[:self.num_devices or None]


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config on top of today's defaults (so every key exists)."""
  saved = run_lib.read_config(workdir, "--workdir").to_dict()
  cfg = base.get_config()

  def merge(dst, src):
    for k, v in src.items():
      if isinstance(v, dict) and k in dst:
        merge(dst[k], v)
      else:
        dst[k] = v

  merge(cfg, saved)
  return cfg


def train(cfg: ml_collections.ConfigDict, out: str, opts: Options) -> run_lib.Restored:
  """Runs the loop quietly (no progress bar, samples or intermediate evals); returns the run."""
  cfg.train.update(progress=False, sample_tokens=0, eval_every=0)
  cfg.checkpoint.update(save_every=0, keep_best=0)
  run_lib.fit_mesh(cfg, len(opts.devices))
  loop.run(cfg, out, devices=opts.devices)
  return run_lib.restore(out, devices=opts.devices)


def finetune(cfg: ml_collections.ConfigDict, workdir: str, out: str, opts: Options,
             **compress) -> run_lib.Restored:
  """`finetune_steps` from the run's weights, with `compress` settings (section -> dict)."""
  cfg = copy.deepcopy(cfg)
  steps = opts.finetune_steps
  cfg.train.update(steps=steps, tokens=0)
  cfg.optim.update(peak_lr=cfg.optim.peak_lr * opts.finetune_lr_scale,
                   warmup_steps=max(1, steps // 10), warmup_tokens=0, decay_steps=0,
                   decay_tokens=0)
  cfg.checkpoint.restore_from = workdir
  for section, values in compress.items():
    cfg.compress[section].update(values)
  return train(cfg, out, opts)


def student(cfg: ml_collections.ConfigDict, out: str, opts: Options,
            teacher: str = "") -> run_lib.Restored:
  """Half the layers, width and heads of the run's model, trained from scratch."""
  cfg = copy.deepcopy(cfg)
  m = cfg.model
  m.update(n_layers=max(1, m.n_layers // 2), d_model=m.d_model // 2, n_heads=max(1, m.n_heads // 2),
           d_head=0, d_ff=0)
  if opts.student_steps:
    cfg.train.update(steps=opts.student_steps, tokens=0)
  cfg.compress.distill.teacher = teacher
  return train(cfg, out, opts)


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def measure(model, params, tokenizer, docs, serve_dir: str, opts: Options) -> dict:
  """Validation nats/token and bits/byte, checkpoint MiB, scoring peak MiB, decode tokens/s."""
  with quantize.routing():  # gptjax.evaluate applies GPT.hidden/logits by function
    scorer = evaluate.Scorer(model, tokenizer, batch_size=opts.eval_batch)
    ppl = evaluate.perplexity(scorer, params, docs)
    ctx = model.args.ctx
    batch = {"inputs": np.zeros((opts.eval_batch, ctx), np.int32),
             "targets": np.zeros((opts.eval_batch, ctx), np.int32),
             "weights": np.ones((opts.eval_batch, ctx), np.float32)}
    compiled = jax.jit(lambda p, b: evaluate.score_batch(p, b, model=model)).lower(
        params, batch).compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(1, model.args.vocab_size, 16)) for _ in range(opts.decode_batch)]
  times = []
  for _ in range(4):  # the first call compiles
    start = time.perf_counter()
    new = generate.generate(model, params, prompts, opts.decode_tokens, temperature=0.0)
    times.append(time.perf_counter() - start)
  if not all(len(row) == opts.decode_tokens for row in new):
    raise RuntimeError(f"greedy decoding stopped early: rows of {[len(r) for r in new]} tokens, "
                       f"asked for {opts.decode_tokens}")
  return {"val_nll": ppl["nll"], "bits_per_byte": ppl["bits_per_byte"],
          "checkpoint_mib": _dir_bytes(os.path.join(serve_dir, "checkpoints")) / 2**20,
          "peak_mib": peak / 2**20,
          "decode_tok_s": opts.decode_batch * opts.decode_tokens / statistics.median(times[1:]),
          "params": int(sum(x.size for x in jax.tree.leaves(params)))}


def save_float(out: str, params, cfg, source: str) -> str:
  """A float params-only serving checkpoint with the run's config and tokenizer."""
  run_lib.save_params(out, 0, params, {"step": 0, "config": checkpoint.config_json(cfg)})
  tokenizer_lib.copy_saved(source, out)
  return out


def table(rows: dict[str, dict]) -> str:
  """The study's rows as a Markdown table, each method against the baseline."""
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


def study(workdir: str, out: str, opts: Options = Options(),
          log=lambda msg: print(msg, flush=True)) -> dict[str, dict]:
  """Runs `opts.methods` on the run in `workdir`; writes everything under `out` (see the module
  docstring) and returns {method: its row}."""
  opts.check()
  cfg = run_config(workdir)
  run = run_lib.restore(workdir, devices=opts.devices)
  docs = eval_tasks.validation_task(run.cfg.data, opts.val_docs).examples
  model, params, tok = run.trainer.model, run.params, run.tokenizer
  serve = os.path.join(out, "serve")
  int4 = quantize.Spec(4, opts.group_size, embeddings=True)
  int8 = quantize.Spec(8, embeddings=True)
  rows = {}

  def ptq(name, spec, model, params, how):
    qmodel, qparams = quantize.quantize(model, params, spec)
    quantize.save(os.path.join(serve, name), qparams, spec, cfg, source=workdir)
    rows[name] = {"how": how, **measure(qmodel, qparams, tok, docs, os.path.join(serve, name),
                                        opts)}

  def dense(name, r: run_lib.Restored, how):
    path = save_float(os.path.join(serve, name), r.params, r.cfg, workdir)
    rows[name] = {"how": how, **measure(r.trainer.model, r.params, tok, docs, path, opts)}

  ft = f"+{opts.finetune_steps} steps"
  for name in [m for m in METHODS if m in opts.methods]:
    log(f"compress: {name}")
    if name == "baseline":
      dense(name, run, f"float32, {run.step} steps")
    elif name == "int8":
      ptq(name, int8, model, params, quantize.describe(int8))
    elif name == "int4":
      ptq(name, int4, model, params, quantize.describe(int4))
    elif name == "float+ft":
      dense(name, finetune(cfg, workdir, os.path.join(out, name), opts), f"float32 {ft}")
    elif name == "qat":
      r = finetune(cfg, workdir, os.path.join(out, name), opts, qat={"enabled": True, "bits": 8})
      ptq(name, int8, r.trainer.model, r.params, f"QAT int8 {ft}, then {quantize.describe(int8)}")
    elif name == "pruned50":
      r = finetune(cfg, workdir, os.path.join(out, name), opts, prune={
          "method": "magnitude", "sparsity": 0.5, "end_step": max(1, opts.finetune_steps * 3 // 4)})
      dense(name, r, f"magnitude 50% {ft}")
    elif name == "pruned24":
      r = finetune(cfg, workdir, os.path.join(out, name), opts, prune={"method": "2:4"})
      dense(name, r, f"2:4 {ft}")
    elif name in ("student", "distilled"):
      teacher = workdir if name == "distilled" else ""
      r = student(cfg, os.path.join(out, name), opts, teacher)
      m, kd = r.cfg.model, r.cfg.compress.distill
      how = f"{m.n_layers}x{m.d_model}, {r.step} steps" + (
          f", KD alpha={kd.alpha} T={kd.temperature}" if teacher else "")
      dense(name, r, how)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
    f.write(table(rows) + "\n")
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)
  return rows
