"""GPT-3 (Brown et al. 2020, Table 2.1): context 2048, alternating dense / locally banded attention.

Usage: --config=configs/gpt3.py:small (small | medium | large | xl | 2.7b | 6.7b | 13b | 175b),
optionally with a backend suffix for throughput on accelerators: --config=configs/gpt3.py:xl,gpu or
:xl,tpu (bfloat16, fused attention, micro-batch and remat sized for one device: accelerators.py).

The paper does not state the band width of its sparse layers; we use a local window of 256 tokens,
as later open replications did (config: model.local_window). Optimisation follows section 2.3 and
appendix B: Adam(0.9, 0.95, 1e-8), clip 1.0, weight decay 0.1, 375M warmup tokens, cosine decay to
10% over 260B tokens, 300B tokens in all, batch ramped from 32k tokens over the first 4-12B tokens.

The ramp grows the batch in whole micro-batches (gptjax.optim.plan), so it can start at 32k tokens
only with micro-batches of 32k tokens: train.micro_batch is 32768 / 2048 = 16 sequences, which is
also what 0 would resolve to under a ramp (`optim.micro_batch`). It is written out so that every
reader of the config (validation against the mesh, resuming) sees the size the steps use. Every
multiple of 16 sequences up to the full batch is a step of the ramp (optim.batch_ramp_buckets), so
the batch follows the paper's linear ramp within one micro-batch; each size compiles once (16 for
small to 96 for 175b: lower batch_ramp_buckets to compile fewer). A mesh with more than 16
data x fsdp devices needs a larger micro-batch (a multiple of them); the ramp then starts at one
micro-batch. train.micro_batch = global_batch with the ramp on is an error: set
optim.batch_ramp_tokens = 0 to train at the full batch from the first step.
"""

from configs import accelerators, base

# Batch-ramp length in tokens: the paper says 4-12B depending on model size; we ramp longer for
# bigger models (a documented choice, not a published number per size).
_RAMP_TOKENS = {"small": 4e9, "medium": 4e9, "large": 4e9, "xl": 4e9, "2.7b": 8e9, "6.7b": 8e9,
                "13b": 12e9, "175b": 12e9}


def get_config(arg: str = "small"):
  arg, backend = accelerators.split(arg)
  c = base.from_size("gpt3", arg)
  c.model.attention = "alternating"
  c.model.local_window = 256
  c.train.tokens = 300_000_000_000
  c.optim.warmup_tokens = 375_000_000
  c.optim.decay_tokens = 260_000_000_000
  c.optim.final_lr_fraction = 0.1
  c.optim.batch_ramp_tokens = int(_RAMP_TOKENS[arg])
  c.optim.batch_ramp_start = 32768
  c.train.micro_batch = c.optim.batch_ramp_start // c.model.ctx  # the ramp's first batch: 16
  c.optim.batch_ramp_buckets = c.train.global_batch // c.train.micro_batch  # every size on the way
  accelerators.apply(c, backend)
  c.lock()
  return c
