"""Train-step throughput: tokens/s, compile time, MFU, the fraction of the machine's matmul speed.

    result = bench.measure_train_step(cfg, steps=10, warmup=2)       # one dict, JSON-ready
    result = bench.run(cfg, steps=10, warmup=2, reference=make_torch_step)

`run` times the gptjax step, a large matmul (the machine's practical FLOP/s ceiling) and, if
given, a reference implementation's step in interleaved rounds, so that all three see the same
background load; the ratios it reports are therefore steadier than the absolute numbers on a shared
machine. Every time is a median over the timed rounds, each ended by `block_until_ready`.

`accelerator_suite` is the ready benchmark for one GPU or TPU (`scripts/bench.py
--suite=accelerator`): GPT-2 small and GPT-3 XL with their accelerator overlays
(configs/accelerators.py), each compiled ahead of time so compile time stands apart from step time,
with tokens/s, MFU (PaLM FLOPs, and with the banded layers' attention counted over their window),
peak device memory, the fused attention kernel found in the compiled HLO, and a bfloat16 square
GEMM measured in the same run as the practical ceiling. On CPU it runs small stand-ins.
"""

import gc
import os
import re
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import configs
from gptjax import accounting, config as config_lib, optim, plan, sharding
from gptjax.data import pipeline
from gptjax.model import ModelArgs

Step = Callable[[], None]  # runs one complete step and waits for it
MATMUL_SHAPE = (2048, 384, 50304)  # (M, K, N): the fixed CPU config's output projection


def bench_devices(cfg: ml_collections.ConfigDict) -> list:
  """All devices if a mesh axis is -1 ('the rest'), else exactly as many as the mesh names."""
  sizes = [int(cfg.mesh[a]) for a in config_lib.MESH_AXES]
  devices = jax.devices()
  return devices if -1 in sizes else devices[:int(np.prod(sizes))]


def random_batch(cfg: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """A [accum, micro_batch, seq_len] batch of random token ids with the arrays the loop feeds
  (inputs, shifted targets, and segment_ids under data.document_mask, id 0 ending documents): the
  full global batch in the run plan's micro-batches (the steps after any batch ramp)."""
  run = optim.plan(cfg)
  rng = np.random.default_rng(seed)
  windows = rng.integers(0, cfg.model.vocab_size,
                         (run.max_accum * run.micro_batch, run.seq_len + 1), dtype=np.int32)
  batch = pipeline.to_example(windows, eos_id=0, segment_ids=cfg.data.document_mask)
  return {k: v.reshape(run.max_accum, run.micro_batch, run.seq_len) for k, v in batch.items()}


def make_train_step(cfg: ml_collections.ConfigDict, devices=None) -> tuple[Step, dict]:
  """Builds the sharded train step training runs (`plan.build_trainer`: distillation and QAT
  included; a teacher keeps its random init, which costs the same) on a random batch; returns
  (step, info).

  The first call of `step` compiles. `info` holds the mesh shape, tokens per step, the last loss
  and the trainer.
  """
  devices = bench_devices(cfg) if devices is None else devices
  config_lib.validate(cfg, n_devices=len(devices))
  mesh = sharding.make_mesh(cfg.mesh, devices)
  trainer = plan.build_trainer(cfg, mesh)
  state = [trainer.init_state()]
  batch = jax.device_put(random_batch(cfg, cfg.seed), trainer.batch_sharding())
  metrics = {}

  def step():
    state[0], metrics["last"] = trainer.step(state[0], batch)
    jax.block_until_ready((state[0], metrics["last"]))

  info = {"mesh": dict(mesh.shape), "tokens_per_step": int(batch["inputs"].size),
          "loss": lambda: float(metrics["last"]["loss"]), "trainer": trainer}
  return step, info


def make_matmul(shape=MATMUL_SHAPE, dtype=jnp.float32, device=None) -> tuple[Step, float]:
  """A jitted [M, K] @ [K, N] product; returns (step, FLOPs per call)."""
  m, k, n = shape
  device = device or jax.devices()[0]
  keys = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(keys[0], (m, k), dtype), device)
  b = jax.device_put(jax.random.normal(keys[1], (k, n), dtype), device)
  matmul = jax.jit(jnp.matmul)

  def step():
    matmul(a, b).block_until_ready()

  return step, 2.0 * m * k * n


def interleaved_times(steps: dict[str, Step], rounds: int, warmup: int) -> tuple[dict, dict]:
  """Calls every step once per round, in turn; returns ({name: first-call s}, {name: [s, ...]})."""
  first, times = {}, {name: [] for name in steps}
  for name, step in steps.items():
    start = time.perf_counter()
    step()
    first[name] = time.perf_counter() - start
  for _ in range(warmup):
    for step in steps.values():
      step()
  for _ in range(rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return first, times


def run(cfg: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2,
        matmul_shape: tuple[int, int, int] | None = MATMUL_SHAPE,
        reference: Callable[[ml_collections.ConfigDict], Step] | None = None,
        reference_name: str = "torch", peak_flops: float | None = None) -> dict:
  """Measures the train step of `cfg` (and a matmul and a reference step, interleaved).

  Args:
    cfg: a full gptjax config (any preset and overrides).
    steps: timed rounds; warmup: untimed rounds after the first (compiling) call.
    matmul_shape: (M, K, N) of the ceiling matmul, in the model's compute dtype; None = skip.
    reference: builds another implementation's step for the same config (e.g. the PyTorch one).
    peak_flops: per-device peak for MFU; default: the device kind's entry in PEAK_FLOPS, if any.

  Returns:
    A JSON-ready dict: sizes, tokens/s, step and compile seconds, FLOPs per token, MFU, the matmul
    GFLOP/s with the fraction of it the step reaches, and the reference's tokens/s with the ratio.
  """
  load_before = os.getloadavg()[0]
  args = ModelArgs.from_config(cfg.model)
  seq_len = optim.seq_len(cfg)
  devices = bench_devices(cfg)
  fns, info = {}, None
  fns["gptjax"], info = make_train_step(cfg, devices)
  if matmul_shape:
    fns["matmul"], matmul_flop = make_matmul(matmul_shape, args.dtype, devices[0])
  if reference is not None:
    fns[reference_name] = reference(cfg)
  first, times = interleaved_times(fns, steps, warmup)
  med = {name: statistics.median(t) for name, t in times.items()}

  tokens = info["tokens_per_step"]
  flops_token = accounting.flops_per_token(args, seq_len)
  tokens_per_s = tokens / med["gptjax"]
  peak = peak_flops or accounting.peak_flops_of(devices[0])
  out = {
      "preset": cfg.name, "mesh": info["mesh"], "devices": len(devices),
      "device_kind": devices[0].device_kind, "dtype": cfg.model.dtype,
      "batch": cfg.train.global_batch, "micro_batch": optim.micro_batch(cfg),
      "seq_len": seq_len, "steps": steps, "warmup": warmup,
      "tokens_per_s": round(tokens_per_s, 1), "step_s": round(med["gptjax"], 4),
      "step_s_min": round(min(times["gptjax"]), 4), "step_s_max": round(max(times["gptjax"]), 4),
      "compile_s": round(first["gptjax"], 2), "loss": round(info["loss"](), 4),
      "flops_per_token": flops_token,
      "model_tflops": round(tokens_per_s * flops_token / 1e12, 4),
      "mfu": None if peak is None else round(
          accounting.mfu(tokens_per_s, flops_token, peak, len(devices)), 4),
  }
  if matmul_shape:
    matmul_flops = matmul_flop / med["matmul"]
    out.update({"matmul_shape": list(matmul_shape), "matmul_gflops": round(matmul_flops / 1e9, 1),
                "matmul_fraction": round(
                    tokens_per_s * flops_token / len(devices) / matmul_flops, 3)})
  if reference is not None:
    ref_tokens_per_s = tokens / med[reference_name]
    out.update({f"{reference_name}_tokens_per_s": round(ref_tokens_per_s, 1),
                f"{reference_name}_step_s": round(med[reference_name], 4),
                f"ratio_vs_{reference_name}": round(tokens_per_s / ref_tokens_per_s, 3)})
  out.update({"cpu_count": os.cpu_count(), "load_avg_before": round(load_before, 2),
              "load_avg_after": round(os.getloadavg()[0], 2), "jax": jax.__version__})
  return out


def measure_train_step(cfg: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2) -> dict:
  """The gptjax train step alone: tokens/s, step and compile time, FLOPs per token, MFU."""
  return run(cfg, steps, warmup, matmul_shape=None)


# ---- the accelerator suite -------------------------------------------------------------------
SUITE_PRESETS = ("gpt2:small", "gpt3:xl")
# CPU (CI): stand-ins of the same family and overlay, small enough to compile and step in seconds.
CPU_STAND_INS = {
    "gpt2:small": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_head": 0, "ctx": 64,
                   "vocab_size": 512},
    "gpt3:xl": {"n_layers": 2, "d_model": 64, "n_heads": 2, "d_head": 0, "ctx": 128,
                "local_window": 32, "vocab_size": 512},
}
CPU_ROWS = 2  # sequences per step of a CPU stand-in
GEMM_N = {"gpu": 8192, "tpu": 8192, "cpu": 512}  # square bfloat16 GEMM of the ceiling
# custom-call targets of fused kernels in compiled HLO: cuDNN's fused attention (what
# jax.nn.dot_product_attention(implementation='cudnn') lowers to), Pallas / Mosaic TPU kernels
# (Splash attention), Pallas Triton and Mosaic GPU kernels.
FUSED_KERNEL_TARGETS = (r"__cudnn\$fmha\w*", r"tpu_custom_call", r"__gpu\$xla\.gpu\.triton",
                        r"mosaic_gpu\w*")
NONE_FOUND = "none found"


def find_fused_kernels(hlo_text: str) -> dict[str, int]:
  """{custom-call target: calls} of the fused attention / Pallas kernels in compiled HLO text
  (`compiled.as_text()`); a TPU kernel is named by its kernel_name when the line has one."""
  found: dict[str, int] = {}
  for line in hlo_text.splitlines():
    m = re.search(r'custom_call_target="([^"]+)"', line)
    if not m or not any(re.fullmatch(p, m.group(1)) for p in FUSED_KERNEL_TARGETS):
      continue
    name = m.group(1)
    kernel = re.search(r'kernel_name\\?"?[=:]\s*\\?"([\w.\-]+)', line)
    if kernel:
      name = f"{name}:{kernel.group(1)}"
    found[name] = found.get(name, 0) + 1
  return dict(sorted(found.items()))


def describe_kernels(found: dict[str, int]) -> str:
  return ", ".join(f"{k} x{n}" for k, n in found.items()) or NONE_FOUND


def flops_per_token_banded(args: ModelArgs, seq_len: int | None = None) -> float:
  """PaLM's training FLOPs per token with each locally banded layer's attention counted over its
  window: 6N + 12·H·Q·(sum over layers of the keys a query sees), T for a dense layer (as PaLM
  counts it) and the band width w (at most T) for a banded one. Equals
  `accounting.flops_per_token` for dense models."""
  t = seq_len or args.ctx
  keys = sum(min(args.window(i) or t, t) for i in range(args.n_layers))
  return 6.0 * accounting.param_counts(args).matmul + 12.0 * args.n_heads * args.d_head * keys


def suite_config(preset: str, backend: str, n_devices: int = 1,
                 memory_limit: float | None = None) -> tuple[ml_collections.ConfigDict, str]:
  """The suite's config of `preset` ('gpt2:small') on `n_devices` devices, and how its
  micro-batch was chosen.

  The preset with its accelerator overlay ('gpu' on CPU too), one micro-batch per step (no batch
  ramp, no accumulation), FSDP over the devices. The remat policy and micro-batch are what the
  planner picks for `memory_limit` bytes per device (the allocator's limit), with the overlay's
  larger loss chunk counted; without a limit (CPU) the stand-in's `CPU_ROWS` sequences per device.
  """
  cfg = configs.load(f"{preset},{'gpu' if backend == 'cpu' else backend}")
  with cfg.unlocked():
    if backend == "cpu":
      cfg.model.update(CPU_STAND_INS[preset])
      cfg.name += " (cpu stand-in)"
    cfg.optim.batch_ramp_tokens = 0
    cfg.mesh.update(data=1, fsdp=n_devices, tensor=1)
    if memory_limit is None:
      rows, how = CPU_ROWS * n_devices, f"{CPU_ROWS} rows per device (stand-in)"
    else:
      from configs import accelerators  # pylint: disable=import-outside-toplevel
      fit = accelerators.derive_fit(cfg, backend, n_devices=n_devices, memory=memory_limit)
      if fit is None:
        raise config_lib.ConfigError(
            f"{preset}: no remat policy and micro-batch fit {memory_limit / 1e9:.1f} GB per device "
            f"on {n_devices} device(s) by the planner's estimate; run the suite on more devices.")
      cfg.model.remat, rows, _ = fit
      how = (f"planner: remat {fit[0]}, {rows // n_devices} rows per device fit the allocator's "
             f"{memory_limit / 1e9:.1f} GB")
    cfg.train.update(global_batch=rows, micro_batch=rows)
  return cfg, how


def _peak_bytes(device) -> float | None:
  stats = device.memory_stats()
  return None if not stats or "peak_bytes_in_use" not in stats else float(
      stats["peak_bytes_in_use"])


def measure_suite_model(cfg: ml_collections.ConfigDict, devices, steps: int, warmup: int,
                        peak: float | None, gemm_flops: float) -> dict:
  """One row of the suite: compile (lower + compile, timed apart), steps, memory, kernels."""
  config_lib.validate(cfg, n_devices=len(devices))
  args = ModelArgs.from_config(cfg.model)
  trainer = plan.build_trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
  state = trainer.init_state()
  batch = jax.device_put(random_batch(cfg, cfg.seed), trainer.batch_sharding())
  start = time.perf_counter()
  compiled = trainer.lower_step(batch).compile()
  compile_s = time.perf_counter() - start
  kernels = find_fused_kernels(compiled.as_text())
  m = compiled.memory_analysis()
  compiled_peak = None if m is None else float(
      m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
      + m.temp_size_in_bytes)
  times, metrics = [], None
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  seq_len = optim.seq_len(cfg)
  tokens = int(batch["inputs"].size)
  tokens_per_s = tokens / step_s
  flops, banded = accounting.flops_per_token(args, seq_len), flops_per_token_banded(args, seq_len)
  per_device = tokens_per_s / len(devices)
  row = {
      "preset": cfg.name, "params": accounting.param_counts(args).total, "dtype": cfg.model.dtype,
      "seq_len": seq_len, "micro_batch": cfg.train.micro_batch, "remat": cfg.model.remat,
      "scan_layers": cfg.model.scan_layers, "attention_impl": cfg.model.attention_impl,
      "loss_chunk_rows": cfg.train.loss_chunk_rows, "tokens_per_step": tokens,
      "compile_s": round(compile_s, 2), "step_s": round(step_s, 5),
      "tokens_per_s": round(tokens_per_s, 1), "flops_per_token": flops,
      "flops_per_token_banded": banded,
      "mfu": None if peak is None else round(per_device * flops / peak, 4),
      "mfu_banded": None if peak is None else round(per_device * banded / peak, 4),
      "mfu_vs_gemm": round(per_device * flops / gemm_flops, 4),
      "mfu_banded_vs_gemm": round(per_device * banded / gemm_flops, 4),
      "peak_memory_bytes": _peak_bytes(devices[0]), "compiled_memory_bytes": compiled_peak,
      "attention_kernel": describe_kernels(kernels), "loss": round(float(metrics["loss"]), 4),
  }
  del state, compiled, batch, trainer
  gc.collect()
  return row


def accelerator_suite(steps: int = 10, warmup: int = 2, n_devices: int = 1,
                      presets: tuple[str, ...] = SUITE_PRESETS, gemm_n: int | None = None) -> dict:
  """GPT-2 small and GPT-3 XL in bfloat16 with their accelerator overlays on `n_devices` devices of
  the default backend, and a bfloat16 square GEMM as the measured ceiling; a JSON-ready dict (see
  `format_suite`). On CPU the models are `CPU_STAND_INS` and the output says so."""
  start = time.perf_counter()
  backend = jax.default_backend()
  devices = jax.devices()[:n_devices]
  if len(devices) < n_devices:
    raise config_lib.ConfigError(f"--suite_devices={n_devices}: this process has "
                                 f"{len(devices)} {backend} device(s).")
  device = devices[0]
  peak = accounting.peak_flops_of(device)
  n = gemm_n or GEMM_N.get(backend, GEMM_N["cpu"])
  gemm, gemm_flop = make_matmul((n, n, n), jnp.bfloat16, device)
  first, times = interleaved_times({"gemm": gemm}, max(steps, 5), warmup)
  gemm_flops = gemm_flop / statistics.median(times["gemm"])
  stats = device.memory_stats() or {}
  limit = float(stats["bytes_limit"]) if "bytes_limit" in stats else None
  note = ("cpu: small stand-ins of each preset (the 'gpu' overlay, "
          + "; ".join(f"{p}: {CPU_STAND_INS[p]}" for p in presets) + ") replace the real models"
          if backend == "cpu" else f"{backend}: the presets with their '{backend}' overlay")
  rows = []
  for preset in presets:
    try:
      cfg, how = suite_config(preset, backend, n_devices, limit)
    except config_lib.ConfigError as e:  # e.g. GPT-3 XL with Adam on one 16 GB TPU chip
      rows.append({"preset": preset, "skipped": str(e)})
      continue
    rows.append({**measure_suite_model(cfg, devices, steps, warmup, peak, gemm_flops),
                 "micro_batch_from": how})
  return {
      "suite": "accelerator", "backend": backend, "device_kind": device.device_kind,
      "devices": len(devices), "note": note, "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
      "memory_limit_bytes": limit, "datasheet_peak_flops": peak,
      "gemm": {"n": n, "dtype": "bfloat16", "compile_s": round(first["gemm"], 3),
               "tflops": round(gemm_flops / 1e12, 4),
               "fraction_of_datasheet": None if peak is None else round(gemm_flops / peak, 4)},
      "models": rows, "steps": steps, "warmup": warmup,
      "total_s": round(time.perf_counter() - start, 1),
  }


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def _gb(x: float | None) -> str:
  return "-" if x is None else f"{x / 1e9:.2f} GB"


def format_suite(r: dict) -> str:
  """The suite's result as a table, one column per model."""
  g = r["gemm"]
  lines = [f"accelerator suite on {r['devices']} x {r['device_kind']} ({r['backend']}), "
           f"jax {r['jax']}: {r['note']}",
           f"bf16 GEMM {g['n']}^3: {g['tflops']:.2f} TFLOP/s measured"
           + (f" = {_pct(g['fraction_of_datasheet'])} of the datasheet "
              f"{r['datasheet_peak_flops'] / 1e12:.0f} TFLOP/s" if r["datasheet_peak_flops"]
              else " (no datasheet peak for this device)")]
  fields = [
      ("micro-batch (sequences)", lambda m: f"{m['micro_batch']} x {m['seq_len']}"),
      ("remat / scan / loss chunk",
       lambda m: f"{m['remat']} / {'scan' if m['scan_layers'] else 'unrolled'} / "
                 f"{m['loss_chunk_rows']}"),
      ("compile s", lambda m: f"{m['compile_s']:.2f}"),
      ("step s (median)", lambda m: f"{m['step_s']:.4f}"),
      ("tokens/s", lambda m: f"{m['tokens_per_s']:,.0f}"),
      ("MFU (PaLM) vs datasheet", lambda m: _pct(m["mfu"])),
      ("MFU (banded) vs datasheet", lambda m: _pct(m["mfu_banded"])),
      ("MFU (PaLM) vs GEMM", lambda m: _pct(m["mfu_vs_gemm"])),
      ("MFU (banded) vs GEMM", lambda m: _pct(m["mfu_banded_vs_gemm"])),
      ("peak device memory", lambda m: _gb(m["peak_memory_bytes"])),  # process high-water mark
      ("compiled step memory", lambda m: _gb(m["compiled_memory_bytes"])),
      ("attention kernel (HLO)", lambda m: m["attention_kernel"]),
      ("loss", lambda m: f"{m['loss']:.4f}"),
  ]
  width = max(len(name) for name, _ in fields) + 2
  ran = [m for m in r["models"] if "skipped" not in m]
  colw = max(24, *(len(m["preset"]) + 2 for m in ran)) if ran else 24
  lines.append(" " * width + "".join(m["preset"].ljust(colw) for m in ran))
  for name, get in fields:
    lines.append(name.ljust(width) + "".join(get(m).ljust(colw) for m in ran))
  lines += [f"  {m['preset']}: {m['micro_batch_from']}" for m in ran]
  lines += [f"  {m['preset']}: SKIPPED: {m['skipped']}" for m in r["models"] if "skipped" in m]
  lines.append(f"total {r['total_s']:.1f} s")
  return "\n".join(line.rstrip() for line in lines)
