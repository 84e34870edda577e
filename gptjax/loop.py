"""The training loop: config -> tokenizer, data, mesh, sharded state -> steps, evals, checkpoints.

    summary = loop.run(cfg, workdir="runs/x")

Writes to the workdir: `config.json` (resolved), `tokenizer.model`, `checkpoints/`, `metrics.jsonl`,
TensorBoard events under `tb/`, `samples.txt`. Started again on the same workdir it resumes from
the latest complete checkpoint, exactly: same parameters, optimizer state and data position.
Metrics leave the device every `train.log_every` steps only.
"""

from collections.abc import Callable, Sequence
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from gptjax import accounting, attention, checkpoint, compile_cache, config as config_lib
from gptjax import generate
from gptjax import metrics as metrics_lib
from gptjax import evaluate as evaluate_lib, feed, optim, sharding
from gptjax import distill, run as run_lib, storage, trackers as trackers_lib
from gptjax import train as train_lib
from gptjax.errors import ConfigError
from gptjax.data import tokenizer as tokenizer_lib, training
from gptjax.train import Trainer


class NonFiniteError(RuntimeError):
  """The loss or gradient norm became NaN/inf; checkpoints on disk were left as they were."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"gptjax: {msg}", flush=True)


def prepare(cfg: ml_collections.ConfigDict, workdir: str, devices=None):
  """Validates everything that can be checked early. Returns (tokenizer, mesh)."""
  devices = jax.devices() if devices is None else devices
  config_lib.validate(cfg, n_devices=len(devices))
  run_lib.check(cfg, workdir)
  compile_cache.setup(cfg)  # before anything compiles
  if cfg.checkpoint.restore_from and not os.path.isdir(cfg.checkpoint.restore_from):
    raise ConfigError(f"config.checkpoint.restore_from: {cfg.checkpoint.restore_from!r} does not "
                      "exist. Point it at a gptjax run's workdir.")
  tokenizer = tokenizer_lib.load_or_train(cfg.data, workdir)
  _check_same_on_all_hosts(tokenizer.fingerprint, "tokenizer",
                           "Give them the same data.tokenizer.path, or train it once and copy it "
                           "to every host.")
  if cfg.checkpoint.restore_from:
    _check_same_tokenizer(cfg, cfg.checkpoint.restore_from, tokenizer)
  if cfg.model.vocab_size != tokenizer.vocab_size:
    _log(f"model.vocab_size: the config says {cfg.model.vocab_size:,}, the run's tokenizer "
         f"({getattr(tokenizer, 'origin', '') or cfg.data.tokenizer.kind}) has "
         f"{tokenizer.vocab_size:,} tokens; the model is built with "
         f"{tokenizer.vocab_size:,}. For another vocabulary set data.tokenizer.vocab_size, or "
         "data.tokenizer.kind='gpt2_bpe' with GPT-2's vocab.json + merges.txt.")
  cfg.model.vocab_size = tokenizer.vocab_size
  return tokenizer, sharding.make_mesh(cfg.mesh, devices)


def _check_same_tokenizer(cfg: ml_collections.ConfigDict, other: str, tokenizer) -> None:
  """Refuses weights trained with another tokenizer: their embedding rows mean other tokens."""
  run_dir = os.path.dirname(os.path.abspath(other)) if os.path.basename(
      os.path.normpath(other)) == "checkpoints" else other
  if not run_lib.has_tokenizer(run_dir):
    _log(f"WARNING: {other} holds no tokenizer, so checkpoint.restore_from cannot check that its "
         "embeddings match this run's tokenizer")
    return
  theirs = run_lib.load_tokenizer(run_lib.read_config(run_dir, "checkpoint.restore_from"),
                                  run_dir, "checkpoint.restore_from")
  if theirs.fingerprint != tokenizer.fingerprint:
    raise ConfigError(
        f"config.checkpoint.restore_from: {other} was trained with another tokenizer "
        f"({theirs.vocab_size} tokens, fingerprint {theirs.fingerprint[:12]}; this run: "
        f"{tokenizer.vocab_size}, {tokenizer.fingerprint[:12]}), so its embedding rows stand for "
        "other tokens. Use its tokenizer: --config.data.tokenizer.path pointing at the one in "
        f"{run_dir}.")


def _check_same_on_all_hosts(sha256_hex: str, what: str, fix: str) -> None:
  """Refuses a multi-process run whose processes hold different `what`s (by their sha256)."""
  if jax.process_count() == 1:
    return
  mine = np.frombuffer(bytes.fromhex(sha256_hex)[:8], np.uint8).astype(np.int32)
  every = multihost_utils.process_allgather(mine)
  if not (every == every[0]).all():
    raise ConfigError(f"the processes of this run have different {what}s (fingerprints differ "
                      f"between hosts). {fix}")


def evaluate(trainer: Trainer, params, eval_ds, rows: feed.HostRows) -> float:
  """Mean validation loss (nats/token) over the fixed validation batches (this host's `rows`)."""
  totals = [trainer.eval(params, rows.to_global(b)) for b in eval_ds]
  totals = jax.device_get(totals)
  return float(sum(t["loss_sum"] for t in totals) / max(sum(t["tokens"] for t in totals), 1.0))


def validation_metrics(trainer: Trainer, params, validation: Sequence[training.Validation],
                       rows: feed.HostRows) -> dict[str, float]:
  """`val_loss` (a mixture's: the sources' losses weighted by the base mixture weights) and, per
  source of a mixture, `eval/<source>/val_loss` and `eval/<source>/bits_per_byte` (one source:
  `val_bits_per_byte`). Bits per byte divide by the val split's mean UTF-8 bytes per token."""
  out, total = {}, 0.0
  for v in validation:
    loss = evaluate(trainer, params, v.batches, rows)
    total += v.weight * loss
    if v.name:
      out[f"eval/{v.name}/val_loss"] = loss
      out[f"eval/{v.name}/bits_per_byte"] = loss / math.log(2) / v.bytes_per_token
    else:  # one source: its bits per byte, comparable across tokenizers
      out["val_bits_per_byte"] = loss / math.log(2) / v.bytes_per_token
  return {"val_loss": total, **out}


class _StopSignal:
  """SIGTERM, or a first SIGINT, asks the loop to checkpoint and stop; a second SIGINT aborts."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    _log(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then "
         "stopping (press Ctrl-C again to abort)")

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def agreed(self) -> bool:
    """True on every process if any process was asked to stop."""
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(np.array(self.requested)).any())


def objective(cfg: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
  """Trainer.build's loss_fn / init_params for `cfg.compress`: distillation and/or QAT."""
  kwargs = distill.objective(cfg, tokenizer) if cfg.compress.distill.teacher else {}
  if cfg.compress.qat.enabled:
    from gptjax import quantize  # pylint: disable=import-outside-toplevel  (Qwix only when used)
    spec = quantize.Spec.from_qat_config(cfg.compress.qat)
    kwargs["loss_fn"] = quantize.qat_loss(kwargs.get("loss_fn", train_lib.lm_loss_sum), spec)
  return kwargs


def run(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
  """Trains (or resumes) as the config says. Returns a summary of the run.

  `workdir` may be a URL (`s3://`, `gs://`): the run then works on a local copy that uploads
  checkpoints as they commit, and everything else as it changes (gptjax/storage.py)."""
  if not storage.is_url(workdir):
    return _run(cfg, workdir, devices)
  storage.check_single_process(workdir, jax.process_count())
  with storage.mirrored(workdir, background=True) as local:
    return _run(cfg, local, devices)


def _harness_suite(cfg: ml_collections.ConfigDict, trainer: Trainer, tokenizer):
  """`gptjax.harness.HarnessSuite` of `eval.harness_tasks` (the eval extra), or None."""
  if not cfg.eval.get("harness_tasks"):
    return None
  try:
    from gptjax import harness as harness_lib  # lm-eval: only when harness tasks are asked for
  except ImportError as err:
    raise ConfigError(f"config.eval.harness_tasks: {cfg.eval.harness_tasks!r} needs lm-eval, which "
                      f"is not installed ({err}). pip install 'gptjax[eval]'.") from err
  return harness_lib.HarnessSuite(cfg, trainer, tokenizer)


def _run(cfg: ml_collections.ConfigDict, workdir: str, devices) -> dict[str, Any]:
  tokenizer, mesh = prepare(cfg, workdir, devices)
  trainer = Trainer.build(cfg, mesh, **objective(cfg, tokenizer))
  suite = evaluate_lib.Suite.from_config(cfg, trainer, tokenizer)  # eval.tasks files checked now
  harness = _harness_suite(cfg, trainer, tokenizer)  # lm-eval tasks and task files checked now
  plan, t = trainer.run, cfg.train
  args = trainer.model.args
  counts = accounting.param_counts(args)
  stream = training.Stream(cfg.data, tokenizer, seq_len=plan.seq_len,
                           micro_batch=plan.micro_batch, seed=cfg.seed,
                           sequences_before=lambda step: plan.tokens_before(step) // plan.seq_len)
  fingerprint = stream.fingerprint()
  _check_same_on_all_hosts(fingerprint, "token stream",
                           "Give every host the same data files and data.* settings (the token "
                           "cache is built from them on each host).")
  rows = trainer.host_rows(plan.micro_batch)  # this host's rows of every micro-batch
  train_it = stream.train(rows.rows)
  validation = stream.validation(cfg.train.eval_batches * plan.max_accum, rows.rows, _log)
  ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint, config=cfg)
  state = _restore_or_start(trainer, ckpt, cfg, workdir, train_it, fingerprint)
  if cfg.compress.distill.teacher:  # the frozen teacher is not part of the run's checkpoints
    state = state.replace(frozen=distill.restore_teacher(cfg, trainer.abstract_state.frozen))
  backend = attention.current_backend()
  resolved = json.loads(cfg.to_json_best_effort())  # with the attention kernels that run
  resolved["model"]["attention_kernels"] = attention.kernel_record(args, backend)
  run_lib.write_config(resolved, workdir)  # only now: every check above passed
  _log(f"{cfg.name}, {counts.total:,} params, mesh {dict(mesh.shape)}, {plan.total_steps} steps "
       f"of {plan.max_accum * plan.micro_batch} x {plan.seq_len} tokens")
  attention.announce(args, backend)  # one line per layer kind (and phase, where they differ)

  def validate(state) -> dict[str, Any]:
    return {**validation_metrics(trainer, state.params, validation, rows),
            **suite.metrics(state.params),  # eval/<task>/<metric>; {} without eval.tasks
            **(harness.metrics(state.params) if harness else {})}  # eval/harness/<task>/<metric>

  def next_batch(step: int) -> list[dict[str, np.ndarray]]:
    return [next(train_it) for _ in range(plan.accum(step))]

  def meta(step: int, tokens: int) -> dict[str, Any]:
    return {"tokens": tokens, "data": train_it.get_state(), "micro_batch": plan.micro_batch,
            "data_fingerprint": fingerprint}

  start = int(state.step)
  summary = train(trainer, state, next_batch, rows, cfg=cfg, workdir=workdir, ckpt=ckpt,
                  hooks=[Hook(t.eval_every, validate)], meta=meta,
                  flops_token=accounting.flops_per_token(args, plan.seq_len),
                  peak=_mesh_peak_flops(mesh))
  state = summary.pop("state")
  summary["params"] = counts.total
  if t.sample_tokens and not summary["preempted"]:
    summary["samples"] = write_samples(trainer, state.params, tokenizer, workdir, t.sample_tokens,
                                       cfg.seed)
  if start == plan.total_steps:
    _log(f"the run in {workdir} had already finished ({start} steps); nothing to do")
  elif not summary["preempted"]:
    bpb = summary.get("val_bits_per_byte")
    per_byte = f" nats/token, {bpb:.4f} bits/byte" if bpb is not None else ""
    _log(f"done. val loss {summary.get('val_loss', float('nan')):.4f}{per_byte}; outputs in "
         f"{workdir} (config.json, checkpoints/, metrics.jsonl, tb/, tokenizer.model, samples.txt)")
  return summary


def _restore_or_start(trainer: Trainer, ckpt: checkpoint.Checkpointer,
                      cfg: ml_collections.ConfigDict, workdir: str, train_it, fingerprint: str):
  """The latest readable checkpoint's state, with the data iterator moved to its position; else a
  fresh state (from `checkpoint.restore_from`'s weights when set)."""
  ck = cfg.checkpoint
  restored = ckpt.restore_latest(trainer.abstract_state, init_opt_state=trainer.tx.init)
  if not restored:
    refuse_silent_restart(ckpt, ck, workdir)
    state = trainer.init_state()
    if ck.restore_from:
      abstract = trainer.abstract_state.params
      state = state.replace(params=checkpoint.restore_params(ck.restore_from, abstract))
      _log(f"starting from the weights of {ck.restore_from} (fresh optimizer state)")
    return state
  state, meta = restored
  state = state.replace(opt_state=optim.set_hyperparams(state.opt_state, cfg, _log))
  if meta.get("data_fingerprint", fingerprint) != fingerprint:
    raise ConfigError(
        f"the checkpoint at step {meta['step']} in {workdir} was trained on another token stream:"
        " the data its settings name has changed since (e.g. data.paths matches other files, or "
        "they were edited), so its data position would skip or repeat data. Restore the data to "
        f"resume, or start a new --workdir with --config.checkpoint.restore_from={workdir}.")
  saved = meta.get("config")
  why = saved and training.same_past(ml_collections.ConfigDict(saved["data"]), cfg.data,
                                     meta["step"])
  if why:
    raise ConfigError(f"config.data.mixture_stages: the checkpoint at step {meta['step']} in "
                      f"{workdir} cannot resume with these settings: {why}. Put them back, or "
                      f"start a new --workdir with --config.checkpoint.restore_from={workdir}.")
  train_it.set_state(checkpoint.resume_data_state(meta, cfg, trainer.run))
  _log(f"resuming from the checkpoint at step {meta['step']} ({meta['tokens']:,} tokens seen)")
  return state


@dataclasses.dataclass(frozen=True)
class Hook:
  """Work the loop does on a cadence: `fn(state)` every `every` steps (0 = only at the end) and
  after the last step; its values join that step's metrics row (`val_loss` also tags the step's
  checkpoint for `checkpoint.keep_best`)."""

  every: int
  fn: Callable[[Any], dict[str, Any]]

  def due(self, done: int, is_last: bool) -> bool:
    return is_last or bool(self.every and done % self.every == 0)


def train(trainer: Trainer, state, next_batch: Callable[[int], list[dict[str, np.ndarray]]],
          rows: feed.HostRows, *, cfg: ml_collections.ConfigDict, workdir: str,
          ckpt: checkpoint.Checkpointer, hooks: Sequence[Hook] = (),
          meta: Callable[[int, int], dict[str, Any]] = lambda step, tokens: {"tokens": tokens},
          flops_token: float | None = None, peak: float | None = None) -> dict[str, Any]:
  """The training loop every objective runs: pre-training, fine-tuning, distillation, QAT.

  Steps `trainer` from `state` to the end of its plan. Each step feeds the micro-batches
  `next_batch(step)` (this host's `rows` of each); metrics leave the device every
  `train.log_every` steps and go to `metrics.jsonl` and TensorBoard; the non-finite policy
  (`train.nonfinite`) is applied to every step; hooks run on their cadence; checkpoints are saved
  every `checkpoint.save_every` steps and at the end, with `meta(step, tokens)` beside the state.
  SIGTERM or a first Ctrl-C saves a checkpoint after the current step and returns.

  Returns:
    The last metrics row's values, plus `state`, `steps`, `tokens`, `preempted`, `compile_s`.
  """
  plan, t, ck = trainer.run, cfg.train, cfg.checkpoint
  resolved = json.loads(cfg.to_json_best_effort())
  writer = metrics_lib.MetricsWriter(
      workdir, trackers=lambda: trackers_lib.open_all(t, workdir, resolved))
  pending, summary = [], {"preempted": False}
  start = int(state.step)
  tokens_seen = plan.tokens_before(start)
  last_time, last_tokens, compile_s, skips = time.perf_counter(), tokens_seen, None, 0
  bar = tqdm(range(start, plan.total_steps), initial=start, total=plan.total_steps, unit="step",
             disable=not (t.progress and jax.process_index() == 0), dynamic_ncols=True)
  profiler = _Profiler(t.profile_steps, os.path.join(workdir, "profile"))
  try:
    with _StopSignal() as stop:
      for step in bar:
        micro = next_batch(step)
        host = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        profiler.before(step)
        state, step_metrics = trainer.step(state, rows.to_global(host, leading=1))
        profiler.after(step, state)
        pending.append(step_metrics)
        tokens_seen += len(micro) * plan.micro_batch * plan.seq_len
        if compile_s is None:  # the first step compiles; time it apart from throughput
          jax.block_until_ready(step_metrics)
          compile_s = time.perf_counter() - last_time
          last_time, last_tokens = time.perf_counter(), tokens_seen
        done = step + 1
        is_last, preempted = done == plan.total_steps, stop.agreed()
        is_save = is_last or preempted or (ck.save_every and done % ck.save_every == 0)
        row = {}
        for hook in hooks:
          if hook.due(done, is_last):
            row.update(hook.fn(state))
        if done % t.log_every == 0 or is_last or row or is_save:
          fetched = jax.device_get(pending)
          pending = []
          skips = _check_finite(fetched, done, t, skips)
          now = time.perf_counter()
          tok_s = (tokens_seen - last_tokens) / max(now - last_time, 1e-9)
          last_time, last_tokens = now, tokens_seen
          row.update(_step_row(fetched, plan.accum(step) * plan.micro_batch * plan.seq_len, tok_s,
                               tokens_seen, flops_token, peak))
          if "compile_s" not in summary:
            row["compile_s"] = summary["compile_s"] = compile_s
          writer.write(done, row)
          summary.update(row)
          bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}",
                          **({"val": f"{summary['val_loss']:.3f}"} if "val_loss" in summary
                             else {}))
        if is_save:  # tagged only with a validation loss measured at this very step
          ckpt.save(done, state, {"step": done, **meta(done, tokens_seen)}, row.get("val_loss"))
        if preempted and not is_last:
          summary["preempted"] = True
          bar.close()
          _log(f"stopped at step {done}; checkpoint saved. Run the same command to resume.")
          break
  finally:  # whatever happens, finish the checkpoint writes already started
    bar.close()
    profiler.close()
    ckpt.close()
    writer.close()
  summary.update(state=state, steps=int(state.step), tokens=tokens_seen)
  return summary


def _step_row(fetched: list[dict[str, Any]], step_tokens: int, tok_s: float, tokens_seen: int,
              flops_token: float | None, peak: float | None) -> dict[str, Any]:
  """The metrics row of the steps just fetched (the last step's values, their mean loss)."""
  last = fetched[-1]
  row = {"loss": float(last["loss"]), "loss_avg": float(np.mean([f["loss"] for f in fetched])),
         "lr": float(last["lr"]), "grad_norm": float(last["grad_norm"]), "tokens": tokens_seen,
         "tokens_per_s": tok_s, "step_time_s": step_tokens / max(tok_s, 1e-9),
         "mfu": accounting.mfu(tok_s, flops_token, peak) if peak and flops_token else None}
  if "z_loss" in last:  # logged apart: `loss` is the cross-entropy alone
    row["z_loss"] = float(last["z_loss"])
  stats = jax.local_devices()[0].memory_stats()  # None where the backend keeps none (CPU)
  if stats and "bytes_in_use" in stats:
    row["mem_gb"] = stats["bytes_in_use"] / 1e9
    row["peak_mem_gb"] = stats.get("peak_bytes_in_use", stats["bytes_in_use"]) / 1e9
  return row


class _Profiler:
  """Traces optimizer steps `start .. start+length-1` (`train.profile_steps`) with jax.profiler into
  `folder`: TensorBoard's profile plugin and Perfetto read it."""

  def __init__(self, window: tuple[int, int], folder: str):
    self.start, self.length = (int(v) for v in window)
    self.folder, self.on = folder, False

  def before(self, step: int) -> None:
    if self.length and not self.on and self.start <= step < self.start + self.length:
      jax.profiler.start_trace(self.folder)
      self.on, self.first = True, step

  def after(self, step: int, state) -> None:
    if self.on and step == self.start + self.length - 1:
      jax.block_until_ready(state)  # the trace holds the steps' device work, not just dispatch
      self.close()
      _log(f"profiled steps {self.first}-{step} into {self.folder} (TensorBoard: profile tab; "
           "or open the .trace.json.gz in ui.perfetto.dev)")

  def close(self) -> None:
    if self.on:
      jax.profiler.stop_trace()
      self.on = False


def refuse_silent_restart(ckpt: checkpoint.Checkpointer, ck: ml_collections.ConfigDict,
                          workdir: str) -> None:
  """Refuses to start from step 0 in a workdir whose checkpoints were all unreadable, unless
  `checkpoint.start_over` asks for it."""
  if ckpt.quarantined() and not ck.start_over:
    raise ConfigError(
        f"every checkpoint in {workdir} is unreadable (moved to corrupt_checkpoints/: "
        f"{', '.join(ckpt.quarantined())}), so this run would start again from step 0. Set "
        "--config.checkpoint.start_over=True to do that, or use a new --workdir.")


def _mesh_peak_flops(mesh) -> float | None:
  """The summed peak FLOP/s of the mesh's devices (None if any kind is unknown, e.g. CPUs)."""
  peaks = [accounting.peak_flops_of(d) for d in mesh.devices.flat]
  return None if any(p is None for p in peaks) else float(sum(peaks))


def _check_finite(fetched: list[dict[str, Any]], done: int, t: ml_collections.ConfigDict,
                  skips: int) -> int:
  """Applies the non-finite policy to the steps just fetched; returns consecutive skips so far."""
  first = done - len(fetched) + 1
  for i, f in enumerate(fetched):
    if math.isfinite(f["loss"]) and math.isfinite(f["grad_norm"]):
      skips = 0
      continue
    if t.nonfinite == "stop":
      raise NonFiniteError(
          f"loss {f['loss']} / grad norm {f['grad_norm']} at step {first + i}: training stopped "
          "and the checkpoints on disk were left untouched. Lower optim.peak_lr, raise warmup, "
          "or set train.nonfinite='skip' to drop such updates.")
    skips += 1
    _log(f"WARNING: non-finite loss at step {first + i}: update skipped ({skips} in a row)")
    if skips >= t.max_skips:
      raise NonFiniteError(f"{skips} consecutive non-finite steps (train.max_skips={t.max_skips})"
                           "; stopping with the checkpoints on disk untouched.")
  return skips


def write_samples(trainer: Trainer, params, tokenizer, workdir: str, n_tokens: int,
                  seed: int) -> list[str]:
  """Samples a continuation of a few fixed prompts; prints them and writes `samples.txt`."""
  prompts = [tokenizer.encode(p) for p in ("The ", "def ")]
  with sharding.context(trainer.mesh, trainer.rules):
    samples = generate.generate(trainer.model, params, prompts,
                                min(n_tokens, trainer.model.args.ctx - 1), temperature=0.8,
                                top_k=40, eos_id=tokenizer.eos_id, seed=seed)
  texts = [tokenizer.decode(list(ids) + new) for ids, new in zip(prompts, samples)]
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "samples.txt"), "w", encoding="utf-8") as f:
      f.write("\n\n-----\n\n".join(texts) + "\n")
    for text in texts:
      print(f"--- sample ---\n{text}\n", flush=True)
  return texts
