"""Learning-rate transfer across widths: µP against the standard parametrization (Tensor Programs
V).

The tiny family (configs/tiny.py: 2 layers of 4 heads here, context 128, the tiny tokenizer) at
several widths, each trained on the same tokens at every learning rate of a grid, under SP and
under µP with the narrowest width as the base (`model.mup_base_width`). At the base width the two
parametrizations are one model, so those runs coincide. Under µP the best learning rate should
stay put as the model widens; under SP it moves down.

`python scripts/plot_transfer.py --sweep_dir=...` prints the best learning rate per width and
writes `transfer.png` (loss against learning rate, one curve per width, SP and µP side by side).

| variant  | widths              | peak LRs             | steps x batch x ctx | runs | time       |
|----------|---------------------|----------------------|---------------------|------|------------|
| (none)   | 128, 256, 512, 1024 | 2^-12 .. 2^-4 (9)    | 2000 x 64 x 256     | 72   | accelerator|
| `:cpu`   | 64, 128, 256        | 2^-11 .. 2^-5 (7)    | 100 x 16 x 128      | 42   | ~30 min CPU|
| `:smoke` | 32, 64              | 2^-8, 2^-6           | 6 x 8 x 64          | 8    | seconds    |

Usage: python scripts/sweep.py --config=configs/sweeps/mup_transfer.py:cpu --workdir=runs/mup
"""

from configs import tiny
from gptjax import sweep as sweep_lib

WIDTHS = {"": [128, 256, 512, 1024], "cpu": [64, 128, 256], "smoke": [32, 64]}
LRS = {"": [2.0**-e for e in range(12, 3, -1)], "cpu": [2.0**-e for e in range(11, 4, -1)],
       "smoke": [2.0**-8, 2.0**-6]}


def _variant(arg: str) -> str:
  if arg not in WIDTHS:
    raise ValueError(f"mup_transfer takes no argument, ':cpu' or ':smoke', got {arg!r}.")
  return arg


def get_config(arg: str = ""):
  arg = _variant(arg)
  c = tiny.get_config()
  c.name = "mup_transfer" + (f"_{arg}" if arg else "")
  c.model.update(n_layers=2, n_heads=4, d_model=WIDTHS[arg][0])
  c.train.sample_tokens = 0
  c.checkpoint.keep_best = 0
  c.checkpoint.save_every = 0
  c.optim.update(weight_decay=0.0, schedule="cosine")  # one knob swept: the learning rate
  if arg == "cpu":
    c.model.ctx = 128
    c.train.update(global_batch=16, steps=100, log_every=10, eval_every=0, eval_batches=8)
    c.optim.warmup_steps = 10
  elif arg == "smoke":
    c.data.max_docs = 300
    c.data.tokenizer.update(vocab_size=2048, train_chars=2_000_000)
    c.model.update(vocab_size=2048, ctx=64)
    c.train.update(global_batch=8, steps=6, log_every=2, eval_every=0, eval_batches=2,
                   progress=False)
    c.optim.warmup_steps = 2
  else:
    c.train.update(global_batch=64, steps=2000, log_every=50, eval_every=500, eval_batches=20)
    c.optim.warmup_steps = 100
  return c


def sweep(arg: str = ""):
  arg = _variant(arg)
  base = WIDTHS[arg][0]
  parametrizations = sweep_lib.zipped({"model.parametrization": ["sp", "mup"],
                                       "model.mup_base_width": [0, base]})
  return sweep_lib.product(parametrizations, sweep_lib.grid({"model.d_model": WIDTHS[arg]}),
                           sweep_lib.grid({"optim.peak_lr": LRS[arg]}))
