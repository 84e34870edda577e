"""The training loop: config -> tokenizer, data, mesh, sharded state -> steps, evals, metrics, samples.

    summary = loop.run(cfg, workdir="runs/x")

Writes to the workdir: `config.json` (resolved), `tokenizer.model`, `metrics.jsonl`, TensorBoard
events under `tb/`, `samples.txt`. Metrics leave the device every `train.log_every` steps only.
"""

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from gptjax import accounting, config as config_lib, generate, metrics as metrics_lib, sharding
from gptjax.data import pipeline, tokenizer as tokenizer_lib
from gptjax.train import Trainer


def device_peak_flops() -> float | None:
  """Peak bf16 FLOP/s of this process's device kind, if it is a known accelerator."""
  kind = jax.devices()[0].device_kind.lower().replace(" ", "")
  for name, peak in accounting.PEAK_FLOPS.items():
    if name.replace("-", "") in kind.replace("-", ""):
      return peak
  return None


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def prepare(cfg: ml_collections.ConfigDict, workdir: str, devices=None):
  """Validates the config, makes the workdir, resolves the tokenizer. Returns (tokenizer, mesh)."""
  devices = jax.devices() if devices is None else devices
  config_lib.validate(cfg, n_devices=len(devices))
  os.makedirs(workdir, exist_ok=True)
  tokenizer = tokenizer_lib.load_or_train(cfg.data, workdir)
  cfg.model.vocab_size = tokenizer.vocab_size
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
  return tokenizer, sharding.make_mesh(cfg.mesh, devices)


def evaluate(trainer: Trainer, params, eval_ds) -> float:
  """Mean validation loss (nats/token) over the fixed validation batches."""
  totals = [trainer.eval(params, pipeline.to_global(b, trainer.batch_sharding(leading=0)))
            for b in eval_ds]
  totals = jax.device_get(totals)
  return float(sum(t["loss_sum"] for t in totals) / max(sum(t["tokens"] for t in totals), 1.0))


def run(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
  """Trains as the config says. Returns a summary (final train/val loss, tokens/s, steps)."""
  tokenizer, mesh = prepare(cfg, workdir, devices)
  trainer = Trainer.build(cfg, mesh)
  plan, t = trainer.run, cfg.train
  args = trainer.model.args
  counts = accounting.param_counts(args)
  flops_token = accounting.flops_per_token(args, plan.seq_len)
  peak = device_peak_flops()
  _log(f"gptjax: {cfg.name}, {counts.total:,} params, mesh {dict(mesh.shape)}, "
       f"{plan.total_steps} steps of {plan.max_accum * plan.micro_batch} x {plan.seq_len} tokens")

  state = trainer.init_state()
  train_it = pipeline.make(cfg.data, tokenizer, "train", seq_len=plan.seq_len,
                           global_batch=plan.micro_batch, seed=cfg.seed)
  eval_ds = pipeline.make_eval(cfg.data, tokenizer, seq_len=plan.seq_len,
                               global_batch=plan.micro_batch, num_batches=t.eval_batches)
  writer = metrics_lib.MetricsWriter(workdir)
  batch_sh = trainer.batch_sharding(leading=1)

  pending, summary = [], {}
  tokens_seen = plan.tokens_before(int(state.step))
  last_time, last_tokens, compile_s = time.perf_counter(), tokens_seen, None
  steps = range(int(state.step), plan.total_steps)
  bar = tqdm(steps, disable=not (t.progress and jax.process_index() == 0), unit="step",
             dynamic_ncols=True)
  for step in bar:
    micro = [next(train_it) for _ in range(plan.accum(step))]
    host = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
    state, step_metrics = trainer.step(state, pipeline.to_global(host, batch_sh))
    pending.append(step_metrics)
    if compile_s is None:  # the first step compiles; time it apart from throughput
      jax.block_until_ready(step_metrics)
      compile_s = time.perf_counter() - last_time
      last_time = time.perf_counter()
      last_tokens = tokens_seen + len(micro) * plan.micro_batch * plan.seq_len
    tokens_seen += len(micro) * plan.micro_batch * plan.seq_len
    done = step + 1
    is_last = done == plan.total_steps
    row = {}
    if t.eval_every and done % t.eval_every == 0 or is_last:
      row["val_loss"] = summary["val_loss"] = evaluate(trainer, state.params, eval_ds)
    if done % t.log_every == 0 or is_last or row:
      fetched = jax.device_get(pending)
      pending = []
      now = time.perf_counter()
      tok_s = (tokens_seen - last_tokens) / max(now - last_time, 1e-9)
      last_time, last_tokens = now, tokens_seen
      row.update(loss=float(fetched[-1]["loss"]),
                 loss_avg=float(np.mean([f["loss"] for f in fetched])),
                 lr=float(fetched[-1]["lr"]), grad_norm=float(fetched[-1]["grad_norm"]),
                 tokens=tokens_seen, tokens_per_s=tok_s,
                 step_time_s=plan.accum(step) * plan.micro_batch * plan.seq_len / max(tok_s, 1e-9),
                 mfu=accounting.mfu(tok_s, flops_token, peak, jax.device_count()) if peak else None)
      if compile_s is not None and "compile_s" not in summary:
        row["compile_s"] = summary["compile_s"] = compile_s
      writer.write(done, row)
      summary.update(loss=row["loss"], tokens_per_s=tok_s)
      bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}",
                      **({"val": f"{row['val_loss']:.3f}"} if "val_loss" in row else {}))
  bar.close()
  writer.close()
  summary.update(steps=plan.total_steps, tokens=tokens_seen, params=counts.total)
  if t.sample_tokens:
    summary["samples"] = write_samples(trainer, state.params, tokenizer, workdir, t.sample_tokens,
                                       cfg.seed)
  _log(f"gptjax: done. val loss {summary.get('val_loss', float('nan')):.4f}; outputs in {workdir}"
       f" (metrics.jsonl, tb/, config.json, tokenizer.model, samples.txt)")
  return summary


def write_samples(trainer: Trainer, params, tokenizer, workdir: str, n_tokens: int,
                  seed: int) -> list[str]:
  """Samples a continuation of a few fixed prompts; prints them and writes `samples.txt`."""
  prompts = ["The ", "def "]
  texts = []
  for i, prompt in enumerate(prompts):
    ids = tokenizer.encode(prompt)
    new = generate.sample(trainer.model, jax.device_get(params), [ids], n_tokens, seed=seed + i)[0]
    texts.append(tokenizer.decode(list(ids) + list(new)))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "samples.txt"), "w", encoding="utf-8") as f:
      f.write("\n\n-----\n\n".join(texts) + "\n")
    for text in texts:
      print(f"--- sample ---\n{text}\n", flush=True)
  return texts

