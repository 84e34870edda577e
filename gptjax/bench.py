"""Train-step throughput: tokens/s, compile time, MFU, the fraction of the machine's matmul speed.

    result = bench.measure_train_step(cfg, steps=10, warmup=2)       # one dict, JSON-ready
    result = bench.run(cfg, steps=10, warmup=2, reference=make_torch_step)

`run` times the gptjax step, a large matmul (the machine's practical FLOP/s ceiling) and, if
given, a reference implementation's step in interleaved rounds, so that all three see the same
background load; the ratios it reports are therefore steadier than the absolute numbers on a shared
machine. Every time is a median over the timed rounds, each ended by `block_until_ready`.
"""

import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

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
