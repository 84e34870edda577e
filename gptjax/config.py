"""Config validation: every check that can fail before anything compiles or is written.

`validate(cfg)` raises `ConfigError` naming the setting, what is wrong, and how to fix it.
"""

import jax
import ml_collections

import dataclasses

from gptjax import attention, eval_tasks, heads, model as model_lib, mup, optim, peft, prune
from gptjax import quantize_spec, trackers
from gptjax.errors import ConfigError
# Re-exported: the mesh's names and checks live with the meshes.
from gptjax.sharding import (LOGICAL_AXES, MESH_AXES, mesh_order, mesh_shape,  # noqa: F401
                             validate_rules)

SCHEDULES = ("cosine", "linear", "constant", "rsqrt", "wsd")


def _check(ok: bool, key: str, problem: str, fix: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}: {problem}. {fix}")


def validate_model(m: ml_collections.ConfigDict) -> None:
  """Checks `cfg.model` alone."""
  for key in ("vocab_size", "ctx", "n_layers", "d_model", "n_heads", "pad_vocab_to"):
    _check(int(m[key]) >= 1, f"model.{key}", f"must be a positive integer, got {m[key]!r}",
           "Set it to a value >= 1.")
  if not m.d_head:
    _check(m.d_model % m.n_heads == 0, "model.n_heads",
           f"{m.n_heads} heads do not divide d_model={m.d_model}",
           "Choose n_heads dividing d_model, or set model.d_head explicitly.")
  _check(m.d_head >= 0 and m.d_ff >= 0, "model.d_head/d_ff", "must be >= 0 (0 = default)",
         "Use 0 for d_model // n_heads and 4 * d_model.")
  _check(m.norm in ("pre", "post"), "model.norm", f"unknown value {m.norm!r}",
         "Use 'pre' (GPT-2/3) or 'post' (GPT-1).")
  _check(m.remat in model_lib.REMAT_POLICIES, "model.remat", f"unknown remat policy {m.remat!r}",
         f"Choose one of {sorted(model_lib.REMAT_POLICIES)}.")
  _check(m.attention in model_lib.ATTENTION_PATTERNS, "model.attention",
         f"unknown attention pattern {m.attention!r}",
         f"Choose one of {sorted(model_lib.ATTENTION_PATTERNS)}.")
  period = len(model_lib.ATTENTION_PATTERNS[m.attention])
  _check(m.n_layers % period == 0, "model.n_layers",
         f"{m.n_layers} layers cannot alternate {m.attention!r} attention in periods of {period}",
         f"Use a multiple of {period} layers or model.attention='dense'.")
  _check(m.local_window >= 1, "model.local_window", "must be >= 1", "Set a band width in tokens.")
  _check(m.attention_impl in attention.IMPLEMENTATIONS, "model.attention_impl",
         f"unknown kernel {m.attention_impl!r}", f"Use one of {attention.IMPLEMENTATIONS}.")
  _check(m.dtype in model_lib.DTYPES, "model.dtype", f"unknown dtype {m.dtype!r}",
         f"Use one of {sorted(model_lib.DTYPES)}.")
  for key in ("embd_dropout", "attn_dropout", "resid_dropout"):
    _check(0.0 <= m[key] < 1.0, f"model.{key}", f"must be in [0, 1), got {m[key]}",
           "Use 0 to disable dropout.")
  _check(m.init_std > 0, "model.init_std", "must be > 0", "GPT-2 uses 0.02.")
  mup.validate(m)


def validate_attention(cfg: ml_collections.ConfigDict, backend: str) -> None:
  """Checks that `model.attention_impl` can run on `backend`, for training and evaluation of every
  layer kind (`attention.resolve_kernel`, which raises the ConfigError)."""
  args = model_lib.ModelArgs.from_config(cfg.model)
  f = cfg.finetune
  if f.train_path and f.peft == "prefix":  # a prefix-tuning run: its own attention path
    args = dataclasses.replace(args, prefix_len=f.prefix_len)
  for window in dict.fromkeys(args.window(i) for i in range(len(args.pattern))):
    for training in (True, False):
      attention.resolve_kernel(args, backend, training=training, window=window,
                               segments=cfg.data.document_mask)


def validate_eval(e: ml_collections.ConfigDict) -> None:
  """Checks `cfg.eval`: the task list's syntax (its files are read when the run starts)."""
  _check(e.shots >= 0 and e.seed >= 0, "eval.shots/seed", "must be >= 0",
         "Use 0 shots for zero-shot evaluation.")
  try:
    eval_tasks.parse_tasks(e.tasks, "config.eval.tasks")
  except eval_tasks.EvalError as err:
    raise ConfigError(str(err)) from err


def validate_finetune(f: ml_collections.ConfigDict) -> None:
  """Checks `cfg.finetune` (its files and base are read when a fine-tuning run starts)."""
  _check(f.task in heads.TASKS, "finetune.task", f"unknown task {f.task!r}",
         f"Choose one of {heads.TASKS}.")
  _check(f.peft in peft.METHODS, "finetune.peft", f"unknown method {f.peft!r}",
         f"Choose one of {peft.METHODS}.")
  classes = [c.strip() for c in f.classes.split(",") if c.strip()]
  if f.task not in ("sft", "multiple_choice"):
    _check(len(classes) >= 2 and len(set(classes)) == len(classes), "finetune.classes",
           f"needs two or more distinct comma-separated names, got {f.classes!r}",
           "List every label value, e.g. 'neg,pos' or '0,1,2'.")
  n_text = 2 if f.task in heads.PAIR_TASKS else 1
  fields = [x for x in f.text_fields.split(",") if x.strip()]
  _check(f.task == "sft" or len(fields) == n_text, "finetune.text_fields",
         f"task {f.task!r} reads {n_text} text field(s), got {f.text_fields!r}",
         "Name them comma-separated, e.g. 'premise,hypothesis'.")
  _check(f.lora.rank >= 1, "finetune.lora.rank", f"must be >= 1, got {f.lora.rank}",
         "LoRA updates have rank r >= 1 (e.g. 8).")
  _check(f.lora.alpha > 0, "finetune.lora.alpha", f"must be > 0, got {f.lora.alpha}",
         "The update is scaled by alpha / rank; e.g. alpha = 2 * rank.")
  _check(f.adapter_dim >= 1 and f.prefix_len >= 1, "finetune.adapter_dim/prefix_len",
         f"must be >= 1, got {f.adapter_dim} and {f.prefix_len}", "Use e.g. 64 and 10.")
  _check(not f.freeze or f.peft == "none", "finetune.freeze",
         f"is {f.freeze!r} but peft={f.peft!r} already freezes the whole base",
         "Leave it '' with a PEFT method, or use peft='none'.")
  _check(0.0 <= f.head_dropout < 1.0, "finetune.head_dropout", f"must be in [0, 1), got "
         f"{f.head_dropout}", "GPT-1 uses 0.1.")
  _check(f.aux_lm_weight >= 0 and (f.task != "sft" or not f.aux_lm_weight),
         "finetune.aux_lm_weight", f"{f.aux_lm_weight} is not usable with task {f.task!r}",
         "Use a weight >= 0 (GPT-1: 0.5); sft is a language-modelling loss already, so 0 there.")
  _check(f.epochs >= 0 and 0.0 <= f.warmup_fraction < 1.0 and f.match_examples >= 0,
         "finetune.epochs/warmup_fraction/match_examples", "epochs and match_examples must be >= "
         f"0 and warmup_fraction in [0, 1), got {f.epochs}, {f.warmup_fraction}, "
         f"{f.match_examples}", "GPT-1 trains 3 epochs with 0.2% warmup.")


def validate_compress(cfg: ml_collections.ConfigDict) -> None:
  """Checks `cfg.compress`: QAT against the model, distillation weights, the pruning schedule."""
  quantize_spec.check(cfg)
  kd = cfg.compress.distill
  _check(0.0 <= kd.alpha <= 1.0, "compress.distill.alpha", f"must be in [0, 1], got {kd.alpha}",
         "0 = plain LM loss, 1 = only the teacher's distribution.")
  _check(kd.temperature > 0, "compress.distill.temperature", f"must be > 0, got {kd.temperature}",
         "Use 1 for the raw distributions; 2 is common.")
  prune.check(cfg.compress.prune)


def validate_runtime(cfg: ml_collections.ConfigDict) -> None:
  """The trackers, the compilation cache and the profiler window."""
  t = cfg.train
  trackers.check(t)
  _check(t.compile_cache_min_s >= 0, "train.compile_cache_min_s", "must be >= 0",
         "Use 0 to store every compilation.")
  p = t.profile_steps
  ok = (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(v, int) for v in p)
        and p[0] >= 0 and p[1] >= 0)
  _check(ok, "train.profile_steps", f"must be (start, length) with integers >= 0, got {p!r}",
         "E.g. --config.train.profile_steps='(10, 5)' traces steps 10 to 14; (0, 0) = off.")
  if p[1]:
    total = optim.plan(cfg).total_steps
    _check(p[0] + p[1] <= total, "train.profile_steps",
           f"steps {p[0]} to {p[0] + p[1] - 1} lie beyond the run's {total} steps (0 to "
           f"{total - 1})", "Trace a window inside the run.")


def validate(cfg: ml_collections.ConfigDict, n_devices: int | None = None,
             backend: str | None = None) -> None:
  """Checks the whole config; `n_devices` defaults to `jax.device_count()`, `backend` (what the
  attention kernels must run on) to this process's (`attention.current_backend()`)."""
  m, t, o = cfg.model, cfg.train, cfg.optim
  validate_model(m)
  validate_attention(cfg, attention.current_backend() if backend is None else backend)
  validate_rules(cfg.mesh.rules)
  seq_len = optim.seq_len(cfg)
  _check(0 < seq_len <= m.ctx, "train.seq_len", f"{seq_len} exceeds the model context {m.ctx}",
         "Use train.seq_len <= model.ctx (or raise model.ctx).")
  _check(t.global_batch >= 1, "train.global_batch", "must be >= 1", "Set sequences per step.")
  micro = optim.micro_batch(cfg)  # 0 resolves to the global batch, or to a batch ramp's start
  _check(t.global_batch % micro == 0, "train.micro_batch",
         f"{micro} does not divide global_batch={t.global_batch}",
         "Choose a micro-batch that divides the global batch (0 = the global batch, or the "
         "start of optim.batch_ramp_tokens' ramp).")
  _check(t.steps >= 1 or t.tokens >= 1, "train.steps", "the run has no length",
         "Set train.steps or train.tokens.")
  _check(t.log_every >= 1, "train.log_every", "must be >= 1", "Fetch metrics every N >= 1 steps.")
  _check(t.nonfinite in ("stop", "skip"), "train.nonfinite", f"unknown policy {t.nonfinite!r}",
         "Use 'stop' or 'skip'.")
  ck = cfg.checkpoint
  _check(ck.save_every >= 0 and ck.keep >= 1 and ck.keep_best >= 0, "checkpoint.save_every/keep",
         "save_every and keep_best must be >= 0 and keep >= 1", "Keep at least one checkpoint.")
  _check(o.peak_lr > 0, "optim.peak_lr", f"must be > 0, got {o.peak_lr}", "Set a positive rate.")
  _check(o.schedule in SCHEDULES, "optim.schedule", f"unknown schedule {o.schedule!r}",
         f"Choose one of {SCHEDULES}.")
  _check(0.0 <= o.final_lr_fraction <= 1.0, "optim.final_lr_fraction", "must be in [0, 1]",
         "GPT-3 decays to 0.1 of the peak.")
  _check(o.clip_norm >= 0 and o.weight_decay >= 0, "optim.clip_norm/weight_decay", "must be >= 0",
         "Use 0 to disable.")
  validate_runtime(cfg)
  validate_eval(cfg.eval)
  validate_compress(cfg)
  validate_finetune(cfg.finetune)
  n_devices = jax.device_count() if n_devices is None else n_devices
  sizes = mesh_shape(cfg.mesh, n_devices)
  mesh_order(cfg.mesh)
  batch_shards = sizes["data"] * sizes["fsdp"]
  _check(micro % batch_shards == 0, "train.micro_batch",
         f"the micro-batch of {micro} sequences per pass does not split over data x fsdp = "
         f"{batch_shards} devices",
         f"Use a micro-batch that is a multiple of {batch_shards} (train.micro_batch, or "
         "train.global_batch when it is 0; under optim.batch_ramp_tokens it is the ramp's first "
         "size), or fewer data x fsdp devices.")
  heads = m.n_heads
  _check(heads % sizes["tensor"] == 0, "mesh.tensor",
         f"tensor parallelism of {sizes['tensor']} does not divide n_heads={heads}",
         "Choose mesh.tensor dividing the number of heads.")
