"""GPT-1 (Radford et al. 2018): 12 x 768, post-LN, context 512, Adam 2.5e-4, 2k warmup, cosine to 0.

Usage: --config=configs/gpt1.py (--config=configs/gpt1.py:gpu or :tpu: configs/accelerators.py)
"""

from configs import accelerators, base


def get_config(arg: str = ""):
  name, backend = accelerators.split(arg)
  c = base.from_size("gpt1", name)
  c.optim.b2 = 0.999  # plain Adam betas; GPT-1 predates the GPT-3 choice of 0.95
  c.optim.weight_decay = 0.01  # "w = 0.01 on all non-bias or gain weights"
  c.optim.warmup_steps = 2000
  # 100 epochs of BooksCorpus (~1B tokens) in batches of 64 x 512 tokens.
  c.train.steps = 3_000_000
  c.optim.final_lr_fraction = 0.0  # cosine annealing to 0
  c.optim.clip_norm = 0.0  # no clipping reported
  accelerators.apply(c, backend)
  c.lock()
  return c
