"""Fine-tuning a pre-trained GPT: task heads, SFT, freezing and PEFT on the one sharded train step.

    ft = FineTune.build(cfg, mesh)                  # Trainer.build with this objective
    state = ft.load_base(ft.trainer.init_state(), base_params)
    state, metrics = ft.trainer.step(state, batch)  # batch: [accum, B, ...] arrays (gptjax.heads)
    ft.evaluate(state, sft.eval_batches(val.rows, 16))  # {'val_loss', 'val_accuracy'}

    summary = finetune.run(cfg, workdir)            # what scripts/finetune.py runs

The train state splits the parameters: `params` = {'base': the pre-trained weights that train,
'head': the task head, 'lora': LoRA pairs} (only the parts a run has) and `frozen` = {'base': the
frozen pre-trained weights}, which the step reads but never updates and the optimizer never sees.
`trunk(params, frozen, spec)` puts the GPT back together, LoRA merged in: a plain GPT tree.
Checkpoints hold the trained parts only; the frozen base is read again from `finetune.base`.
"""

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gptjax import checkpoint, compile_cache, config as config_lib, generate, heads
from gptjax import loss as loss_lib
from gptjax import hf, layout, loop, optim, peft, run as run_lib, sharding
from gptjax.errors import ConfigError
from gptjax.data import sft, tokenizer as tokenizer_lib
from gptjax.model import GPT, ModelArgs
from gptjax.train import StepConfig, Trainer



@dataclasses.dataclass(frozen=True)
class Spec:
  """The static (hashable) description of a fine-tuning objective."""

  task: str
  num_classes: int
  head_dropout: float = 0.0
  aux_lm_weight: float = 0.0
  method: str = "none"  # finetune.peft
  freeze: str = ""
  lora: peft.Lora | None = None
  adapter_dim: int = 0
  prefix_len: int = 0

  @classmethod
  def from_config(cls, f: ml_collections.ConfigDict) -> "Spec":
    lora = peft.Lora(f.lora.rank, f.lora.alpha, f.lora.targets) if f.peft == "lora" else None
    return cls(task=f.task, num_classes=len([c for c in f.classes.split(",") if c.strip()]),
               head_dropout=f.head_dropout, aux_lm_weight=f.aux_lm_weight, method=f.peft,
               freeze=f.freeze, lora=lora, adapter_dim=f.adapter_dim if f.peft == "adapters" else 0,
               prefix_len=f.prefix_len if f.peft == "prefix" else 0)

  def model_args(self, args: ModelArgs) -> ModelArgs:
    return dataclasses.replace(args, adapter_dim=self.adapter_dim, prefix_len=self.prefix_len)


def init_params(_model, rng, tokens, *, spec: Spec, model: GPT, head: heads.Head | None):
  """`Trainer.build`'s init: (trainable params, frozen params), boxed with logical axes."""
  r_trunk, r_head, r_lora = jax.random.split(rng, 3)
  full = model.init(r_trunk, tokens)["params"]
  peft.check_freeze([p for p in peft.flatten(full) if not peft.is_peft_param(p)], spec.freeze)
  trainable, frozen = peft.split(full, peft.frozen_predicate(spec.method, spec.freeze))
  params = {"base": trainable} if trainable else {}
  if head is not None:
    x_1xD = jnp.zeros((1, model.args.d_model), model.args.dtype)
    params["head"] = head.init(r_head, x_1xD)["params"]
  if spec.lora is not None:
    params["lora"] = peft.lora_init(r_lora, full, spec.lora, model.args.width_mult)
  if not params:
    raise ConfigError("config.finetune.freeze: freezes every parameter and there is no head: "
                      "nothing would train. Freeze less.")
  return params, ({"base": frozen} if frozen else None)


def trunk(params, frozen, spec: Spec) -> dict[str, Any]:
  """The whole GPT parameter tree: trainable and frozen base joined, LoRA merged in."""
  base = peft.join(params.get("base"), (frozen or {}).get("base"))
  if "lora" in params:
    base = peft.merge(base, params["lora"], spec.lora.scale)
  return base


def _lm_sums(model: GPT, base, h_NxLxD, targets_NxL, weights_NxL, sc: StepConfig, mesh,
             batch_axes):
  """Next-token cross-entropy sums from final hidden states (fused with the output projection)."""
  variables = {"params": base}
  if sc.vocab_parallel:
    logits = model.apply(variables, h_NxLxD, method="logits")
    return loss_lib.vocab_parallel_cross_entropy_sum(logits, targets_NxL, weights_NxL, sc.z_loss,
                                                     mesh, batch_axes)
  w_VxD = model.apply(variables, method="output_embedding")
  return loss_lib.unembed_cross_entropy_sum(
      h_NxLxD.astype(w_VxD.dtype), w_VxD, targets_NxL, weights_NxL, sc.z_loss,
      vocab_size=model.args.vocab_size, mesh=mesh, batch_axes=batch_axes)


def _forward(params, frozen, batch, rng, spec: Spec, model: GPT, head, sc: StepConfig):
  """(trunk params, hidden states, task logits or None); dropout only when `rng` is given."""
  base = trunk(params, frozen, spec)
  r_model, r_head = jax.random.split(rng) if rng is not None else (None, None)
  drop = rng is not None and sc.dropout

  def trunk_fn(tokens_NxL, positions_NxL=None, segment_ids_NxL=None):
    return model.apply({"params": base}, tokens_NxL, positions_NxL, segment_ids_NxL, not drop,
                       rngs={"dropout": r_model} if drop else None, method="hidden")

  if spec.task == "sft":
    return base, trunk_fn(batch["inputs"], batch["positions"], batch["segment_ids"]), None
  head_drop = rng is not None and spec.head_dropout > 0

  def head_fn(x_xD):
    return head.apply({"params": params["head"]}, x_xD, not head_drop,
                      rngs={"dropout": r_head} if head_drop else None)

  logits, h_NxLxD = heads.task_logits(spec.task, trunk_fn, head_fn, batch)
  return base, h_NxLxD, logits


def loss_sums(params, frozen, micro, rng, _model, sc: StepConfig, mesh, batch_axes, *, spec: Spec,
              model: GPT, head) -> tuple[jax.Array, jax.Array]:
  """The objective for `Trainer.build`: (sum of losses, their weight) of one micro-batch.

  SFT: token cross-entropy on the completion tokens. Tasks with a head: the head's cross-entropy
  per example (or labelled token), plus aux_lm_weight times the micro-batch's mean LM loss on the
  task's text per example (GPT-1: L = L_task + λ·L_LM).
  """
  base, h_NxLxD, logits = _forward(params, frozen, micro, rng, spec, model, head, sc)
  if spec.task == "sft":
    return _lm_sums(model, base, h_NxLxD, micro["targets"], micro["weights"], sc, mesh, batch_axes)
  total, count = heads.loss_sums(logits, micro["labels"], micro["label_weights"])
  if spec.aux_lm_weight:
    lm_total, lm_count = _lm_sums(model, base, h_NxLxD, micro["targets"].reshape(h_NxLxD.shape[:2]),
                                  micro["weights"].reshape(h_NxLxD.shape[:2]), sc, mesh, batch_axes)
    total = total + spec.aux_lm_weight * count * lm_total / jnp.maximum(lm_count, 1.0)
  return total, count


def eval_sums(params, frozen, batch, *, spec: Spec, model: GPT, head, sc: StepConfig, mesh,
              batch_axes) -> dict[str, jax.Array]:
  """Task loss sum, weight and correct predictions (SFT: completion-token loss) of one batch."""
  base, h_NxLxD, logits = _forward(params, frozen, batch, None, spec, model, head, sc)
  if spec.task == "sft":
    total, count = _lm_sums(model, base, h_NxLxD, batch["targets"], batch["weights"], sc, mesh,
                            batch_axes)
    return {"loss_sum": total, "count": count, "correct": jnp.zeros((), jnp.float32)}
  labels, weights = batch["labels"], batch["label_weights"]
  total, count = heads.loss_sums(logits, labels, weights)
  correct = ((heads.predictions(logits, labels) == labels) * weights).sum()
  return {"loss_sum": total, "count": count, "correct": correct}


@dataclasses.dataclass
class FineTune:
  """A fine-tuning objective on a `Trainer`, with its jitted evaluation and prediction."""

  spec: Spec
  model: GPT  # the GPT with this run's adapters / prefixes
  head: heads.Head | None
  trainer: Trainer
  _eval: Any = None
  _logits: Any = None
  _trunk: Any = None

  @classmethod
  def build(cls, cfg: ml_collections.ConfigDict, mesh) -> "FineTune":
    spec = Spec.from_config(cfg.finetune)
    model = GPT(spec.model_args(ModelArgs.from_config(cfg.model)))
    head = None
    if spec.task != "sft":
      head = heads.Head(heads.num_outputs(spec.task, spec.num_classes), spec.head_dropout,
                        model.args.readout_std(cfg.model.init_std), model.args.dtype)
    parts = dict(spec=spec, model=model, head=head)
    trainer = Trainer.build(cfg, mesh, loss_fn=functools.partial(loss_sums, **parts),
                            init_params=functools.partial(init_params, **parts))
    sc = StepConfig(seed=cfg.seed, z_loss=0.0, dropout=False,
                    vocab_parallel=mesh.shape["tensor"] > 1)
    sh = trainer.state_shardings
    batch_sh = trainer.batch_sharding(leading=0)
    ft = cls(spec, model, head, trainer)
    ft._eval = jax.jit(functools.partial(eval_sums, **parts, sc=sc, mesh=mesh,
                                         batch_axes=sharding.batch_axes(trainer.rules)),
                       in_shardings=(sh.params, sh.frozen, batch_sh),
                       out_shardings=sharding.replicated(mesh))
    ft._logits = jax.jit(lambda p, f, b: _forward(p, f, b, None, spec, model, head, sc)[2],
                         in_shardings=(sh.params, sh.frozen, batch_sh))
    ft._trunk = jax.jit(functools.partial(trunk, spec=spec), in_shardings=(sh.params, sh.frozen))
    return ft

  def _ctx(self):
    return sharding.context(self.trainer.mesh, self.trainer.rules)

  def _put(self, batch):
    """Global arrays from a whole [B, ...] batch that every process holds (from the val file)."""
    rows = self.trainer.host_rows(len(next(iter(batch.values()))))
    return rows.to_global(rows.select(batch))

  def base_abstract(self) -> Any:
    """ShapeDtypeStructs (with shardings) of the pre-trained weights: the GPT tree this run loads
    from `finetune.base`, without PEFT parameters."""
    a = self.trainer.abstract_state
    full = peft.join(a.params.get("base"), (a.frozen or {}).get("base"))
    return peft.unflatten({p: x for p, x in peft.flatten(full).items()
                           if not peft.is_peft_param(p)})

  def load_base(self, state, base_params, trainable: bool = True):
    """`state` with its base weights taken from `base_params` (a GPT tree, e.g. `restore_params`):
    the frozen ones always, the trainable ones too if `trainable` (not on resume). Leaves are
    placed as the state's shardings say; the state owns them (a step may donate their buffers)."""
    sh = self.trainer.state_shardings
    where = peft.flatten(sh.params.get("base")) | peft.flatten((sh.frozen or {}).get("base"))
    new = peft.flatten(base_params)
    take = lambda tree: peft.unflatten({p: jax.device_put(new[p], where[p]) if p in new else x
                                        for p, x in peft.flatten(tree).items()})
    params = dict(state.params)
    if trainable and "base" in params:
      params["base"] = take(params["base"])
    frozen = {"base": take(state.frozen["base"])} if state.frozen else None
    return state.replace(params=params, frozen=frozen)

  def counts(self) -> tuple[int, int]:
    """(trainable parameters, all parameters) of this run."""
    a = self.trainer.abstract_state
    trainable = peft.count(a.params)
    return trainable, trainable + peft.count(a.frozen)

  def logits(self, state, batch) -> jax.Array:
    """The head's logits for a [B, ...] batch (no dropout)."""
    with self._ctx():
      return self._logits(state.params, state.frozen, self._put(batch))

  def trunk(self, state) -> Any:
    """The fine-tuned GPT's parameters (LoRA merged; adapters / prefixes need `self.model`)."""
    with self._ctx():
      return self._trunk(state.params, state.frozen)

  def evaluate(self, state, batches) -> dict[str, float]:
    """'val_loss' (task loss, or completion-token loss for SFT) and 'val_accuracy'."""
    with self._ctx():
      sums = jax.device_get([self._eval(state.params, state.frozen, self._put(b)) for b in batches])
    count = max(sum(float(s["count"]) for s in sums), 1.0)
    out = {"val_loss": sum(float(s["loss_sum"]) for s in sums) / count}
    if self.spec.task != "sft":
      out["val_accuracy"] = sum(float(s["correct"]) for s in sums) / count
    return out

  def exact_match(self, state, pairs: list[tuple[list[int], list[int]]], eos_id: int) -> float:
    """Fraction of (prompt, completion) pairs whose greedy continuation equals the completion."""
    params, new = self.trunk(state), max(len(c) for _, c in pairs)
    with self._ctx():
      out = generate.generate(self.model, params, [p for p, _ in pairs], new, temperature=0.0,
                              eos_id=eos_id)
    return float(np.mean([list(o) == list(c) for o, (_, c) in zip(out, pairs)]))


# ---- the pre-trained base and the run --------------------------------------------------------
def resolve_base(cfg: ml_collections.ConfigDict) -> Callable[[Any], Any] | None:
  """Reads `finetune.base` and sets the model's shape and the tokenizer from it.

  Returns:
    None for a randomly initialised base (''), else `load(abstract_base) -> params`, placing the
    pre-trained weights as the ShapeDtypeStructs of `FineTune.base_abstract()` say.

  Raises:
    ConfigError: the path is neither a gptjax run nor a Hugging Face GPT-2 folder.
  """
  path = cfg.finetune.base
  if not path:
    return None
  saved = run_lib.saved_config(path)
  if saved is None:
    raise ConfigError(f"config.finetune.base: {path!r} has no config.json. Point it at a gptjax "
                      "run's workdir or a local Hugging Face GPT-2 folder (save_pretrained).")
  tk = cfg.data.tokenizer
  if "model" in saved and "data" in saved:  # a gptjax run: its model shape and its tokenizer
    # The base's architecture; how the model computes stays this run's (ModelArgs.RUNTIME_FIELDS).
    cfg.model.update({k: v for k, v in saved["model"].items()
                      if k in cfg.model and k not in ModelArgs.RUNTIME_FIELDS})
    tk.kind = saved["data"]["tokenizer"]["kind"]
    tk.path = os.path.join(path, tokenizer_lib.WORKDIR_SPM if tk.kind == "sentencepiece"
                           else tokenizer_lib.WORKDIR_GPT2)
    return lambda abstract: checkpoint.restore_params(path, abstract)
  if saved.get("model_type") == "gpt2":  # Hugging Face: vocab.json + merges.txt beside it
    args, params = hf.load_hf_model(path, scan_layers=cfg.model.scan_layers,
                                    pad_vocab_to=cfg.model.pad_vocab_to)
    cfg.model.update({k: getattr(args, k) for k in ModelArgs.architecture_fields()
                      if k in cfg.model})
    tk.kind, tk.path = "gpt2_bpe", path

    def load(abstract):
      layout.check_shapes(params, abstract, f"config.finetune.base: the model in {path}")
      return jax.tree.map(lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding), params,
                          abstract)
    return load
  raise ConfigError(f"config.finetune.base: {os.path.join(path, run_lib.CONFIG)} is neither a "
                    "gptjax run's config nor a "
                    "Hugging Face GPT-2 config (model_type 'gpt2'). Point it at one of those.")


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"gptjax: {msg}", flush=True)


def warmup_steps(fraction: float, steps: int) -> int:
  """`finetune.warmup_fraction` of `steps`, rounded, and at least one step when the fraction is
  > 0 (GPT-1's 0.2% of a short run would otherwise round to no warmup at all)."""
  return max(1, round(fraction * steps)) if fraction > 0 else 0


# Settings of pre-training that fine-tuning does not implement: refused rather than ignored.
_NOT_IN_FINETUNING = {
    "compress.qat.enabled": ("quantization-aware training", False),
    "compress.distill.teacher": ("distillation", ""),
    "eval.tasks": ("downstream tasks during training (use finetune.val_path; evaluate the "
                   "result with scripts/evaluate.py)", ""),
    "checkpoint.restore_from": ("another run's weights (set finetune.base instead)", ""),
    "train.sample_tokens": ("sampling at the end (use scripts/sample.py on the workdir)", 0),
}


def check_supported(cfg: ml_collections.ConfigDict) -> None:
  """Refuses settings fine-tuning would otherwise silently ignore."""
  for key, (what, off) in _NOT_IN_FINETUNING.items():
    value = cfg
    for part in key.split("."):
      value = value[part]
    if value != off:
      raise ConfigError(f"config.{key}: fine-tuning does not do {what}, but it is set to "
                        f"{value!r}. Set it to {off!r} for scripts/finetune.py.")


def run(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
  """Fine-tunes as `cfg.finetune` says, resuming from the workdir's latest checkpoint.

  Writes `config.json`, the tokenizer, `checkpoints/` (the trained parameters and their optimizer
  state; the frozen base is re-read from `finetune.base`), `metrics.jsonl` and TensorBoard events.

  Returns:
    A summary: steps, loss, val_loss, val_accuracy (tasks with a head), val_exact_match (sft with
    match_examples), trainable and total parameter counts.
  """
  devices = jax.devices() if devices is None else devices
  f, t, ck = cfg.finetune, cfg.train, cfg.checkpoint
  load_base, tokenizer, fmt, train, val = _prepare(cfg, workdir, devices)
  ft = FineTune.build(cfg, sharding.make_mesh(cfg.mesh, devices))
  plan = ft.trainer.run
  ckpt = checkpoint.Checkpointer(workdir, ck, config=cfg)
  state, step = _restore(ckpt, ft, load_base, workdir)
  if step is None:
    loop.refuse_silent_restart(ckpt, ck, workdir)
    state = ft.trainer.init_state()
    state = ft.load_base(state, load_base(ft.base_abstract())) if load_base else state
  else:
    _log(f"resuming from the checkpoint at step {step}")
  run_lib.write_config(cfg, workdir)
  trainable, total = ft.counts()
  _log(f"{f.task} ({f.peft}) from {f.base or 'a random base'}: {len(train.rows)} training rows, "
       f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%), "
       f"{plan.total_steps} steps")
  if train.truncated:
    _log(f"{train.truncated} training sequences were cut to {fmt.seq_len} tokens")

  rows = ft.trainer.host_rows(plan.micro_batch)  # this host's rows of every micro-batch
  ds = sft.train_batches(train.rows, micro_batch=plan.micro_batch, seed=cfg.seed,
                         rows_of_batch=rows.rows)
  val_batches = sft.eval_batches(val.rows, plan.micro_batch) if val else []

  def next_batch(step: int) -> list[dict[str, np.ndarray]]:
    first = plan.tokens_before(step) // (plan.micro_batch * plan.seq_len)
    return [ds[first + i] for i in range(plan.accum(step))]

  def validate(state) -> dict[str, Any]:
    out = ft.evaluate(state, val_batches)
    if f.task == "sft" and f.match_examples:
      out["val_exact_match"] = ft.exact_match(state, val.pairs[:f.match_examples],
                                              tokenizer.eos_id)
    return out

  summary = loop.train(ft.trainer, state, next_batch, rows, cfg=cfg, workdir=workdir, ckpt=ckpt,
                       hooks=[loop.Hook(t.eval_every, validate)] if val else [])
  state = summary.pop("state")
  summary.update(trainable=trainable, params=total, trainable_fraction=trainable / total)
  if not summary["preempted"]:
    _log("done. " + ", ".join(f"{k} {summary[k]:.4g}" for k in
                              ("loss", "val_loss", "val_accuracy", "val_exact_match")
                              if k in summary) + f"; outputs in {workdir}")
  return summary


def _prepare(cfg: ml_collections.ConfigDict, workdir: str, devices):
  """Checks the config and the workdir before anything is written, then reads the examples and
  sets the run's length from them. Returns (load_base, tokenizer, fmt, train, val)."""
  f, t = cfg.finetune, cfg.train
  if not f.train_path:
    raise ConfigError("config.finetune.train_path: is empty. Point it at a JSON Lines file of "
                      "training examples (formats: gptjax/data/sft.py).")
  check_supported(cfg)
  load_base = resolve_base(cfg)
  run_lib.check(cfg, workdir)  # before anything is written there
  tokenizer = tokenizer_lib.load_or_train(cfg.data, workdir)
  if load_base is None:
    cfg.model.vocab_size = tokenizer.vocab_size
  config_lib.validate(cfg, n_devices=len(devices))
  fmt = sft.Format.from_config(f, optim.seq_len(cfg))
  train = sft.load(f.train_path, "finetune.train_path", fmt, tokenizer)
  val = sft.load(f.val_path, "finetune.val_path", fmt, tokenizer) if f.val_path else None
  if f.epochs:
    t.update(steps=max(1, math.ceil(f.epochs * len(train.rows) / t.global_batch)), tokens=0)
  if f.warmup_fraction:
    cfg.optim.warmup_steps = warmup_steps(f.warmup_fraction, t.steps)
  config_lib.validate_runtime(cfg)  # train.profile_steps against the run's length, now known
  compile_cache.setup(cfg)  # before anything compiles
  return load_base, tokenizer, fmt, train, val


def _restore(ckpt: checkpoint.Checkpointer, ft: FineTune, load_base, workdir: str):
  """(state, step) of the latest checkpoint with its frozen base filled in, or (None, None)."""
  steps = ckpt.manager.all_steps()
  if not steps:
    return None, None
  stored = checkpoint.Reader(workdir).tree(max(steps))
  if "lora" in stored:
    peft.check_fits(stored["lora"], ft.base_abstract())
  what = f"config.finetune.base: the fine-tuned weights in {workdir} (step {max(steps)})"
  layout.check_shapes(stored, ft.trainer.abstract_state.params, what)
  restored = ckpt.restore_latest(ft.trainer.abstract_state, init_opt_state=ft.trainer.tx.init)
  if restored is None:
    return None, None
  state, meta = restored
  state = state.replace(opt_state=optim.set_hyperparams(state.opt_state, ft.trainer.cfg, _log))
  if load_base is not None:
    return ft.load_base(state, load_base(ft.base_abstract()), trainable=False), meta["step"]
  return state.replace(frozen=ft.trainer.init_state().frozen), meta["step"]


@dataclasses.dataclass
class Restored:
  """A fine-tuned run restored for evaluation or serving."""

  cfg: ml_collections.ConfigDict
  tokenizer: Any
  ft: FineTune
  state: Any
  step: int


def restore(workdir: str, base: str | None = None, devices=None) -> Restored:
  """The latest checkpoint of a fine-tuning run, on its base (or on `base`, another path).

  Raises:
    ConfigError: no checkpoint, or weights that do not fit the base (naming finetune.base).
  """
  cfg = run_lib.read_config(workdir, "workdir")
  if base is not None:
    cfg.finetune.base = base
  load_base = resolve_base(cfg)
  tokenizer = run_lib.load_tokenizer(cfg, workdir, "workdir")
  ft = FineTune.build(cfg, run_lib.inference_mesh(cfg, devices)[0])
  ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint)
  try:
    state, step = _restore(ckpt, ft, load_base, workdir)
  finally:
    ckpt.close()
  if step is None:
    raise ConfigError(f"{workdir!r} holds no fine-tuning checkpoint. Run scripts/finetune.py "
                      "first.")
  return Restored(cfg, tokenizer, ft, state, step)
