"""Learning-rate sweep of the tiny preset (configs/tiny.py): 100 steps each, peak LR 5e-4 to 8e-3.

Usage: python scripts/sweep.py --config=configs/sweeps/lr_tiny.py
       python scripts/sweep.py --config=configs/sweeps/lr_tiny.py:random   (8 random draws of LR and
                                                                          weight decay, seed 0)
"""

from configs import tiny
from gptjax import sweep as sweep_lib


def get_config(arg: str = ""):
  del arg
  c = tiny.get_config()
  c.name = "lr_tiny"
  c.train.sample_tokens = 0  # the sweep compares losses; `scripts/train.py` runs can sample
  return c


def sweep(arg: str = ""):
  if arg == "random":
    return sweep_lib.random_search({"optim.peak_lr": sweep_lib.LogUniform(3e-4, 1e-2),
                                    "optim.weight_decay": [0.0, 0.1]}, n=8, seed=0)
  if arg:
    raise ValueError(f"lr_tiny takes no argument or ':random', got {arg!r}.")
  return sweep_lib.grid({"optim.peak_lr": [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]})
