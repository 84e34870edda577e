"""Plan a run before it starts: sizes, FLOPs, memory per device (estimated and compiled), time.

    report = plan.make(cfg, n_devices=256, device_kind="h100", mfu=0.4)
    print(plan.format_report(report))

`make` compiles the *real* train step (`Trainer.build` with the loop's objective: the same
`jax.jit`, loss, shardings and state, a distillation teacher's frozen parameters and QAT included)
for abstract arrays (`jax.ShapeDtypeStruct`, with `segment_ids` under `data.document_mask`) on a
mesh of `n_devices` devices, so no parameter is ever allocated, and reads the compiler's memory
figures per device. On a laptop those
devices are fake CPU devices: start the process with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (scripts/plan.py does).

What the compiler says exactly on any backend is the state each device holds (`arguments`: the
parameter and optimizer shards). Its temporary memory is an upper bound for a GPU or TPU: the CPU
compiler keeps bfloat16 buffers in float32 and has no fused attention kernel (it keeps attention
probabilities that cuDNN's flash attention never stores). So whether a run fits is judged by the
accounting estimate (`accounting.memory_per_device`), and the report shows the compiler's
figures and their ratio beside it.
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gptjax import accounting, config as config_lib, optim, sharding
from gptjax.model import ModelArgs
from gptjax.train import Trainer

# Memory per device in bytes, as sold (decimal GB).
DEVICE_MEMORY = {
    "h100": 80e9,
    "h200": 141e9,
    "a100": 80e9,
    "tpu-v4": 32e9,
    "tpu-v5e": 16e9,
    "tpu-v5p": 95e9,
    "tpu-v6e": 32e9,
}
USABLE_FRACTION = 0.9  # of a device's memory: the rest for the runtime, fragmentation, buffers
REMAT_ORDER = ("none", "dots", "full")  # least recomputation first
TENSOR_PARALLEL_FROM = 20e9  # parameters from which `suggest` puts tensor parallelism in a node


@dataclasses.dataclass
class Report:
  """Everything `format_report` prints; JSON-ready through `dataclasses.asdict`."""

  name: str
  n_devices: int
  device_kind: str
  mesh: dict[str, int]
  remat: str
  dtype: str
  params: int
  flops_per_token: float
  seq_len: int
  micro_batch: int
  accum: int
  tokens_per_step: int
  flops_per_step: float
  estimate: dict[str, float]  # accounting: params, grads, optimizer, activations, total (bytes)
  compiled: dict[str, float] | None  # the compiler's per-device figures (bytes)
  compile_s: float | None
  device_memory: float | None
  fits: bool | None  # by the estimate (see the module docstring)
  mfu: float
  step_s: float | None
  train_tokens: int
  days: float | None
  suggestion: str | None
  teacher_params: int = 0  # a distillation teacher's, frozen in the state (0 = none)


def device_memory(device_kind: str) -> float | None:
  key = device_kind.lower().replace(" ", "")
  for name, size in DEVICE_MEMORY.items():
    if name.replace("-", "") in key.replace("-", ""):
      return size
  return None


def _peak(device_kind: str) -> float | None:
  key = device_kind.lower().replace(" ", "").replace("-", "")
  for name, peak in accounting.PEAK_FLOPS.items():
    if name.replace("-", "") in key:
      return peak
  return None


def build_trainer(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
  """The trainer `gptjax.loop.run` builds for `cfg`: its loss and init (`loop.objective`), so a
  distillation teacher's parameters are in `TrainState.frozen` and QAT steps are QAT steps.

  No tokenizer is needed: the teacher's size is read from its config.json (the tokenizers are
  compared when the run starts).
  """
  from gptjax import loop  # pylint: disable=import-outside-toplevel  (the data pipeline: slow)
  return Trainer.build(cfg, mesh, **loop.objective(cfg, None))


def batch_keys(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The arrays of a training batch (`gptjax.data.pipeline`): `segment_ids` and `positions` too
  under `data.document_mask`."""
  return ("inputs", "targets") + (("segment_ids", "positions") if cfg.data.document_mask else ())


def abstract_batch(cfg: ml_collections.ConfigDict,
                   trainer: Trainer) -> dict[str, jax.ShapeDtypeStruct]:
  """A full-size step's batch as the loop feeds it: int32 [accum, micro_batch, seq_len] arrays."""
  run = trainer.run
  spec = jax.ShapeDtypeStruct((run.max_accum, run.micro_batch, run.seq_len), jnp.int32,
                              sharding=trainer.batch_sharding(leading=1))
  return {k: spec for k in batch_keys(cfg)}


def teacher_params(cfg: ml_collections.ConfigDict) -> int:
  """Parameters of the distillation teacher (`compress.distill.teacher`; 0 without one)."""
  if not cfg.compress.distill.teacher:
    return 0
  from gptjax import distill  # pylint: disable=import-outside-toplevel
  return accounting.param_counts(distill.teacher_model(cfg).args).total


def estimate(cfg: ml_collections.ConfigDict, n_devices: int) -> accounting.MemoryEstimate:
  """The accounting module's training memory per device for this config on `n_devices`; `params`
  includes a distillation teacher's (float32, sharded as the student's, no grads or moments)."""
  sizes = config_lib.mesh_shape(cfg.mesh, n_devices)
  args = ModelArgs.from_config(cfg.model)
  micro = optim.micro_batch(cfg)  # resolved: under a batch ramp 0 is the ramp's start
  per_device = max(micro // (sizes["data"] * sizes["fsdp"]), 1)
  est = accounting.memory_per_device(args, optim.seq_len(cfg), per_device,
                                     fsdp=sizes["fsdp"], tensor=sizes["tensor"])
  frozen = 4.0 * teacher_params(cfg) / (sizes["fsdp"] * sizes["tensor"])
  return dataclasses.replace(est, params=est.params + frozen)


def compiled_memory(cfg: ml_collections.ConfigDict, devices) -> tuple[dict[str, float], float]:
  """Compiles the sharded train step for abstract inputs; returns (per-device bytes, seconds).

  Keys: `arguments` (the state and batch shards a device holds), `outputs`, `aliased` (outputs
  written over donated arguments), `temp` (everything else alive during the step: activations,
  gradients, collectives' buffers) and `peak` = arguments + outputs - aliased + temp.
  """
  lowered = lower_step(cfg, devices)
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  out = {"arguments": float(m.argument_size_in_bytes), "outputs": float(m.output_size_in_bytes),
         "aliased": float(m.alias_size_in_bytes), "temp": float(m.temp_size_in_bytes)}
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
  return out, seconds


def lower_step(cfg: ml_collections.ConfigDict, devices) -> jax.stages.Lowered:
  """The training step of `cfg` on a mesh of `devices`, lowered for its abstract state and batch."""
  trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
  return trainer.lower_step(abstract_batch(cfg, trainer))


def suggest(cfg: ml_collections.ConfigDict, n_devices: int, memory: float) -> str | None:
  """The first layout, by the accounting estimate, that fits `memory` bytes per device.

  Tried in order of cost: less recomputation before more, larger micro-batches before smaller
  (more gradient accumulation); FSDP over all devices alone for models under `TENSOR_PARALLEL_FROM`
  parameters, tensor parallelism of 8 inside a node (NVLink) times FSDP across nodes above it, as
  the Megatron and OPT-175B runs did, so that FSDP's all-gathers cross the slower network
  `tensor` times less. Returns config overrides, or None if nothing fits.
  """
  args = ModelArgs.from_config(cfg.model)
  big = accounting.param_counts(args).total >= TENSOR_PARALLEL_FROM
  seq_len = optim.seq_len(cfg)
  frozen = 4.0 * teacher_params(cfg)  # a distillation teacher, float32, sharded as the student
  # A batch ramp grows the batch in micro-batches, so it needs more than one per step.
  o = cfg.optim
  ramp = o.batch_ramp_tokens > 0 and cfg.train.global_batch * seq_len > o.batch_ramp_start
  for tensor in (8, 4, 2, 1) if big else (1, 2, 4, 8):
    if n_devices % tensor or args.n_heads % tensor:
      continue
    fsdp = n_devices // tensor
    if cfg.train.global_batch % fsdp:
      continue
    rows = cfg.train.global_batch // fsdp  # sequences per device per optimizer step
    per_device = [k for k in range(rows, 0, -1)  # micro-batch divisors
                  if rows % k == 0 and not (ramp and k == rows)]
    for remat in REMAT_ORDER:
      for k in per_device:
        est = accounting.memory_per_device(dataclasses.replace(args, remat=remat), seq_len, k,
                                           fsdp=fsdp, tensor=tensor)
        if est.total + frozen / (fsdp * tensor) <= USABLE_FRACTION * memory:
          return (f"--config.mesh.data=1 --config.mesh.fsdp={fsdp} --config.mesh.tensor={tensor} "
                  f"--config.model.remat={remat} --config.train.micro_batch={k * fsdp}")
  return None


def make(cfg: ml_collections.ConfigDict, n_devices: int, device_kind: str = "h100",
         mfu: float = 0.4, train_tokens: int | None = None, compile_step: bool = True,
         devices=None) -> Report:
  """Plans `cfg` on `n_devices` devices of `device_kind`.

  Args:
    cfg: a full config (preset plus overrides); validated for `n_devices` first.
    n_devices: devices in the target mesh.
    device_kind: e.g. 'h100', 'tpu-v5p': sets memory per device and peak FLOP/s.
    mfu: assumed model-FLOPs utilisation for the time estimate.
    train_tokens: tokens to train on (default: the config's run length).
    compile_step: also compile the real step (needs `n_devices` JAX devices, fake ones are fine).
    devices: the devices to compile for (default: the first `n_devices` of `jax.devices()`).
  """
  config_lib.validate(cfg, n_devices=n_devices)
  args = ModelArgs.from_config(cfg.model)
  sizes = config_lib.mesh_shape(cfg.mesh, n_devices)
  run = optim.plan(cfg)  # the micro-batch and accumulation the loop will use
  seq_len, micro, accum = run.seq_len, run.micro_batch, run.max_accum
  shards = sizes["data"] * sizes["fsdp"]
  if micro % shards:  # validate() checks train.micro_batch as written; a ramp resolves 0 lower
    raise config_lib.ConfigError(
        f"config.train.micro_batch: the micro-batch of {micro} sequences (train.micro_batch=0 "
        f"resolves to the batch ramp's start) does not split over data x fsdp = {shards} devices. "
        f"Set train.micro_batch to a multiple of {shards} dividing global_batch="
        f"{cfg.train.global_batch}; the ramp then starts at one micro-batch.")
  flops_token = accounting.flops_per_token(args, seq_len)
  tokens_step = cfg.train.global_batch * seq_len
  est = estimate(cfg, n_devices)
  compiled, compile_s = None, None
  if compile_step:
    if devices is None:
      if jax.device_count() < n_devices:
        raise config_lib.ConfigError(
            f"planning for {n_devices} devices needs that many JAX devices, this process has "
            f"{jax.device_count()}. Start it with XLA_FLAGS="
            f"--xla_force_host_platform_device_count={n_devices} (scripts/plan.py does this).")
      devices = jax.devices()[:n_devices]
    compiled, compile_s = compiled_memory(cfg, devices)
  memory = device_memory(device_kind)
  fits = None if memory is None else est.total <= USABLE_FRACTION * memory
  peak = _peak(device_kind)
  step_s = tokens_step * flops_token / (n_devices * peak * mfu) if peak else None
  if train_tokens is None:
    train_tokens = cfg.train.tokens or cfg.train.steps * tokens_step
  days = train_tokens / tokens_step * step_s / 86400 if step_s else None
  suggestion = suggest(cfg, n_devices, memory) if memory and not fits else None
  if suggestion and all(f in _current_flags(cfg) for f in suggestion.split()):
    suggestion = None  # nothing better than what was asked for
  return Report(
      name=cfg.name, n_devices=n_devices, device_kind=device_kind, mesh=sizes, remat=args.remat,
      dtype=str(cfg.model.dtype), params=accounting.param_counts(args).total,
      flops_per_token=flops_token, seq_len=seq_len, micro_batch=micro, accum=accum,
      tokens_per_step=tokens_step,
      flops_per_step=flops_token * tokens_step,
      estimate={**dataclasses.asdict(est), "total": est.total}, compiled=compiled,
      compile_s=compile_s, device_memory=memory, fits=fits, mfu=mfu, step_s=step_s,
      train_tokens=int(train_tokens), days=days, suggestion=suggestion,
      teacher_params=teacher_params(cfg))


def _current_flags(cfg: ml_collections.ConfigDict) -> set[str]:
  return {f"--config.mesh.{a}={cfg.mesh[a]}" for a in config_lib.MESH_AXES} | {
      f"--config.model.remat={cfg.model.remat}",
      f"--config.train.micro_batch={optim.micro_batch(cfg)}"}


def _gb(x: float | None) -> str:
  return "-" if x is None else f"{x / 1e9:,.2f} GB"


def format_report(r: Report) -> str:
  """A human-readable table of a `Report`."""
  mesh = " x ".join(f"{a} {s}" for a, s in r.mesh.items())
  lines = [
      f"{r.name}: {r.params:,} params on {r.n_devices} x {r.device_kind} (mesh {mesh}), "
      f"{r.dtype}, remat {r.remat}" + (f"; distilled from a frozen {r.teacher_params:,}-param "
                                        "teacher (its shards are in params below)"
                                        if r.teacher_params else ""),
      f"  FLOPs per token        {r.flops_per_token / 1e9:,.2f} GFLOP",
      f"  tokens per step        {r.tokens_per_step:,} ({r.accum} x {r.micro_batch} x {r.seq_len})",
      f"  FLOPs per step         {r.flops_per_step / 1e15:,.2f} PFLOP",
      "  memory per device (accounting estimate):",
      f"    params {_gb(r.estimate['params'])}, grads {_gb(r.estimate['grads'])}, optimizer "
      f"{_gb(r.estimate['optimizer'])}, activations {_gb(r.estimate['activations'])}; "
      f"total {_gb(r.estimate['total'])}",
  ]
  if r.compiled:
    c = r.compiled
    ratio = c["peak"] / r.estimate["total"] if r.estimate["total"] else float("nan")
    state = r.estimate["params"] + r.estimate["optimizer"]
    lines += ["  memory per device (compiler, the real sharded step on CPU devices):",
              f"    arguments {_gb(c['arguments'])} (estimate: params + optimizer = {_gb(state)}), "
              f"temp {_gb(c['temp'])}, outputs {_gb(c['outputs'])} (aliased "
              f"{_gb(c['aliased'])}); peak {_gb(c['peak'])} = {ratio:.2f} x the estimate",
              "    (an upper bound for GPUs/TPUs: the CPU compiler keeps bfloat16 buffers in "
              "float32 and has no fused attention kernel)",
              f"  compile time           {r.compile_s:.1f} s"]
  if r.device_memory:
    verdict = "fits" if r.fits else "does NOT fit"
    lines.append(f"  device memory          {_gb(r.device_memory)} ({USABLE_FRACTION:.0%} usable): "
                 f"{verdict} by the estimate")
    if r.compiled and r.fits and r.compiled["peak"] > USABLE_FRACTION * r.device_memory:
      lines.append("                         (the CPU compiler's upper bound does not: check the "
                   "first steps' memory on the device, or use more remat)")
  if r.suggestion:
    lines.append(f"  try                    {r.suggestion}")
  elif r.fits is False:
    lines.append("  nothing fits on this many devices even with full remat and micro-batch 1 per "
                 "device: use more devices")
  if r.step_s:
    lines.append(f"  step time at {r.mfu:.0%} MFU   {r.step_s:,.2f} s; {r.train_tokens:,} tokens "
                 f"in {r.days:,.1f} days")
  return "\n".join(lines)


def to_json(r: Report) -> dict[str, Any]:
  return dataclasses.asdict(r)
