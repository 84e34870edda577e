"""IsoFLOP sweep (Hoffmann et al. 2022, approach 2): for each compute budget C, several sizes, each
trained on D = C / 6N tokens, so that all runs of a budget cost the same.

Sizes come from the model_size family (d_model = 64 x n_layers, heads of width 64); N is the total
parameter count; the run length is D rounded to whole batches. Within a budget a size that would get
fewer than `MIN_STEPS` steps is left out (it belongs to a bigger budget); a budget too small for the
smallest size is an error. Each run is labelled `meta.budget`, and the cosine schedule decays over
the run's own length, as in Chinchilla. Fit L(N, D) on the results with scripts/fit_scaling.py.

Default: budgets 1e15 to 3e16 FLOPs over the 1.5M-54M family (batches of 64 x 256 tokens).
`:cpu`: budgets 1e12 and 3e12 over 1-4 layers, context 128, batches of 16 x 128 (about 10 minutes).

Usage: python scripts/sweep.py --config=configs/sweeps/isoflop.py[:cpu]
"""

from configs.sweeps import model_size
from gptjax import sweep as sweep_lib

BUDGETS = {"": [1e15, 3e15, 1e16, 3e16], "cpu": [1e12, 3e12]}
LAYERS = {"": [2, 3, 4, 5, 6, 8, 10], "cpu": [1, 2, 3, 4]}
MIN_STEPS = {"": 200, "cpu": 20}


def get_config(arg: str = ""):
  c = model_size.get_config(arg)
  c.name = "isoflop" + (f"_{arg}" if arg else "")
  c.train.update(tokens=0, eval_every=0)
  c.optim.warmup_steps = 10 if arg == "cpu" else 100
  return c


def sweep(arg: str = ""):
  sizes = sweep_lib.sizes_by_aspect_ratio(LAYERS[arg], aspect_ratio=64, d_head=64)
  return sweep_lib.isoflop(get_config(arg), BUDGETS[arg], sizes, min_steps=MIN_STEPS[arg])
