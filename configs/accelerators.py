"""Accelerator overlays: a sized preset tuned for throughput on GPUs or TPUs, by a backend suffix.

    --config=configs/gpt3.py:xl,gpu     --config=configs/gpt2.py:small,tpu     (GPT-1: gpt1.py:gpu)

Every preset of configs/sizes.py takes the suffix; `apply` changes speed settings only (the model,
data, optimizer and schedule stay the paper's, except attention dropout):

| setting              | gpu (H100 80 GB)     | tpu (16 GB chip)     | why                       |
|----------------------|----------------------|----------------------|---------------------------|
| model.dtype          | bfloat16             | bfloat16             | tensor-core / MXU rate    |
| model.attn_dropout   | 0                    | 0                    | see `apply`               |
| model.attention_impl | auto                 | auto                 | cuDNN flash / Splash      |
| model.scan_layers    | False (unrolled)     | True (nn.scan)       | see `SCAN_LAYERS`         |
| train.loss_chunk_rows| 4096                 | 1024                 | see `LOSS_CHUNK_ROWS`     |
| mesh                 | data 1 x fsdp all    | data 1 x fsdp all    | ZeRO-3, as plan.suggest   |
| remat, micro-batch   | `FIT`                | `FIT`                | the planner's memory model|

(bfloat16 is the compute dtype: parameters, Adam's moments and the loss stay float32.)

`FIT` holds, per preset and backend, what `gptjax.plan.suggest` (the accounting memory model:
params + grads + Adam + activations, 90% of the device usable) picks first for `REFERENCE_DEVICES`
= 8 devices of `DEVICE_MEMORY` bytes, in the overlay's bfloat16, with the larger loss chunk's extra
logits counted: least recomputation first, then the largest micro-batch. `derive_fit` recomputes
an entry and tests/test_presets.py checks every one against it. The model counts the attention
probabilities the XLA path stores (cuDNN flash and Splash keep none), so it errs on the safe side.

`train.micro_batch` is global (sequences per pass over all devices): the table's value is for 8
devices. On N devices keep the rows per device (micro_batch / 8) with
`--config.train.micro_batch=<rows x N>` (validation fails, naming it, when it does not split);
on many nodes, `--config.mesh.data=<nodes> --config.mesh.fsdp=<devices per node>` keeps FSDP's
all-gathers inside a node. GPT-3's batch ramp then starts at one micro-batch when that is more than
the paper's 32k tokens (`--config.train.micro_batch=16` restores the paper's start, at a lower
throughput). Presets that fit no layout of 8 devices (13b on TPU, 175b) keep their micro-batch and
get the least memory (remat 'full', tensor 8 from 20B parameters as `plan.suggest` does): plan
the real device count with scripts/plan.py.
"""

import ml_collections

BACKENDS = ("gpu", "tpu")
REFERENCE_DEVICES = 8  # one HGX H100 node; one 8-chip TPU v5e host
# Memory of the device each overlay is sized for, in bytes (decimal GB, as sold). TPU: the 16 GB
# of a v5e chip, so that the overlay also fits a 32 GB v4 / v6e chip (with room to spare there).
DEVICE_MEMORY = {"gpu": 80e9, "tpu": 16e9}
DEVICE_KIND = {"gpu": "h100", "tpu": "tpu-v5e"}  # gptjax.plan / accounting names
# Layers under nn.scan (one compiled layer, a loop) or unrolled (one copy per layer). GPU: unrolled.
# Under scan every layer's saved activations are written into a stacked [layers, ...] buffer with
# dynamic-update-slice and read back with dynamic-slice in the backward pass, and the loop keeps
# XLA from fusing and scheduling across layer boundaries; MaxText's GPU recipes (configs/a3/*.sh)
# run scan_layers=false for this. Unrolled costs compile time linear in depth (24 layers for
# GPT-3 XL). TPU: scan, MaxText's TPU default, compile time flat in depth. To be measured on a GPU.
SCAN_LAYERS = {"gpu": False, "tpu": True}
# Rows (tokens) per chunk of the fused output projection + loss (gptjax/loss.py; base: 512, sized
# for CPU caches). Each chunk holds about three [rows, vocab] float32 arrays (logits, their
# exponentials, their gradient): 4096 rows x 50304 = 2.5 GB on an 80 GB GPU, 1024 rows = 0.6 GB
# on a 16 GB TPU chip. Larger chunks mean larger GEMMs and fewer loop iterations (each a handful
# of kernel launches on a GPU; a TPU's loop costs little, and 1024 rows already fill its MXU).
LOSS_CHUNK_ROWS = {"gpu": 4096, "tpu": 1024}
BASE_LOSS_CHUNK_ROWS = 512  # base.py's train.loss_chunk_rows, which the memory model assumes

# (preset, backend): (model.remat, train.micro_batch at REFERENCE_DEVICES, mesh.tensor).
FIT: dict[tuple[str, str], tuple[str, int, int]] = {
    ("gpt1", "gpu"): ("none", 64, 1),
    ("gpt1", "tpu"): ("none", 64, 1),
    ("gpt2-small", "gpu"): ("none", 512, 1),
    ("gpt2-small", "tpu"): ("none", 64, 1),
    ("gpt2-medium", "gpu"): ("none", 128, 1),
    ("gpt2-medium", "tpu"): ("none", 32, 1),
    ("gpt2-large", "gpu"): ("none", 64, 1),
    ("gpt2-large", "tpu"): ("none", 16, 1),
    ("gpt2-xl", "gpu"): ("none", 64, 1),
    ("gpt2-xl", "tpu"): ("none", 8, 1),
    ("gpt3-small", "gpu"): ("none", 128, 1),
    ("gpt3-small", "tpu"): ("none", 32, 1),
    ("gpt3-medium", "gpu"): ("none", 64, 1),
    ("gpt3-medium", "tpu"): ("none", 8, 1),
    ("gpt3-large", "gpu"): ("none", 32, 1),
    ("gpt3-large", "tpu"): ("none", 8, 1),
    ("gpt3-xl", "gpu"): ("none", 32, 1),
    ("gpt3-xl", "tpu"): ("none", 8, 1),
    ("gpt3-2.7b", "gpu"): ("none", 16, 1),
    ("gpt3-2.7b", "tpu"): ("full", 64, 1),
    ("gpt3-6.7b", "gpu"): ("none", 16, 1),
    ("gpt3-6.7b", "tpu"): ("full", 2, 4),
    ("gpt3-13b", "gpu"): ("none", 8, 1),
}
NO_FIT_REMAT = "full"  # presets missing from FIT: nothing fits 8 devices of that kind


def split(arg: str) -> tuple[str, str | None]:
  """'xl,gpu' -> ('xl', 'gpu'); 'gpu' -> ('', 'gpu') (GPT-1 has no size); 'xl' -> ('xl', None)."""
  parts = arg.split(",") if arg else [""]
  if len(parts) == 1:
    return ("", parts[0]) if parts[0] in BACKENDS else (parts[0], None)
  if len(parts) > 2 or parts[1] not in BACKENDS:
    raise ValueError(f"Unknown preset argument {arg!r}: expected 'size' or 'size,backend' with a "
                     f"backend in {BACKENDS}, e.g. --config=configs/gpt3.py:xl,gpu.")
  return parts[0], parts[1]


def apply(c: ml_collections.ConfigDict, backend: str | None) -> ml_collections.ConfigDict:
  """Overlays `backend`'s settings on the sized preset `c` (unlocked); None leaves it as it is."""
  if backend is None:
    return c
  if backend not in BACKENDS:
    raise ValueError(f"Unknown backend {backend!r}: choose one of {BACKENDS}.")
  preset = c.name
  c.name = f"{preset}-{backend}"
  c.model.dtype = "bfloat16"
  # Modern GPT training runs without attention dropout (GPT-3 reports none; PaLM, LLaMA and
  # MaxText use 0), and the fused attention kernels (cuDNN flash, Splash) have none: any rate > 0
  # would send attention back to the unfused path. Embedding and residual dropout stay.
  c.model.attn_dropout = 0.0
  c.model.attention_impl = "auto"  # cuDNN flash attention on GPU, Splash on TPU
  c.model.scan_layers = SCAN_LAYERS[backend]
  c.train.loss_chunk_rows = LOSS_CHUNK_ROWS[backend]
  c.mesh.update(data=1, fsdp=-1)
  if (preset, backend) in FIT:
    c.model.remat, c.train.micro_batch, c.mesh.tensor = FIT[preset, backend]
  else:
    c.model.remat = NO_FIT_REMAT
    # plan.suggest's rule: tensor parallelism of 8 inside a node from 20B parameters (the blocks'
    # 12 x layers x d_model^2 weights: 175b only).
    c.mesh.tensor = 8 if 12 * c.model.n_layers * c.model.d_model**2 >= 20e9 else 1
  if c.optim.batch_ramp_tokens > 0:  # at most one compiled size per micro-batch on the ramp
    micro = c.train.micro_batch or c.train.global_batch
    c.optim.batch_ramp_buckets = min(c.optim.batch_ramp_buckets, c.train.global_batch // micro)
  return c


def derive_fit(c: ml_collections.ConfigDict, backend: str, n_devices: int = REFERENCE_DEVICES,
               memory: float | None = None) -> tuple[str, int, int] | None:
  """What `gptjax.plan.suggest` picks for the overlaid config `c` on `n_devices` devices of
  `memory` bytes (default: `backend`'s DEVICE_MEMORY), as a `FIT` entry (None: nothing fits).

  The loss chunk's logits above base.py's 512 rows (two [rows, padded vocab] float32 arrays, as
  the memory model counts them) come off the memory first.
  """
  from gptjax import plan  # pylint: disable=import-outside-toplevel  (JAX: only when asked)
  from gptjax.model import ModelArgs  # pylint: disable=import-outside-toplevel

  args = ModelArgs.from_config(c.model)
  extra = max(c.train.loss_chunk_rows - BASE_LOSS_CHUNK_ROWS, 0) * args.padded_vocab * 4 * 2
  memory = (DEVICE_MEMORY[backend] if memory is None else memory) - extra / plan.USABLE_FRACTION
  flags = plan.suggest(c, n_devices, memory)
  if flags is None:
    return None
  got = dict(f.removeprefix("--config.").split("=") for f in flags.split())
  return got["model.remat"], int(got["train.micro_batch"]), int(got["mesh.tensor"])
