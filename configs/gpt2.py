"""GPT-2 (Radford et al. 2019): pre-LN, context 1024, vocab 50257, batch 512 sequences.

Usage: --config=configs/gpt2.py:small (small | medium | large | xl), optionally with a backend
suffix for throughput on accelerators: --config=configs/gpt2.py:small,gpu (see accelerators.py)
"""

from configs import accelerators, base


def get_config(arg: str = "small"):
  name, backend = accelerators.split(arg)
  c = base.from_size("gpt2", name)
  c.optim.warmup_steps = 2000
  # The paper gives no schedule length; 600k steps of 0.5M tokens (300B tokens, as GPT-3 used).
  c.train.steps = 600_000
  accelerators.apply(c, backend)
  c.lock()
  return c
