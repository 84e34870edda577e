"""Model-size sweep: one family of GPTs at a fixed shape, every size trained on the same tokens.

Shape rule (gptjax.sweep.sizes_by_aspect_ratio): d_model = 64 x n_layers and heads of width 64, so
n_heads = n_layers; Kaplan et al. (2020) found the loss nearly flat in the aspect ratio
d_model / n_layers between about 20 and 200, which leaves size as the one variable. With the tiny
preset's tokenizer (8192 pieces, tied embeddings) and context 256 the family spans 1.5M to 54M
parameters:

| layers | d_model | heads | params | non-embedding |
|---|---|---|---|---|
| 2 | 128 | 2 | 1.5M | 0.4M |
| 3 | 192 | 3 | 2.9M | 1.3M |
| 4 | 256 | 4 | 5.3M | 3.2M |
| 5 | 320 | 5 | 8.8M | 6.2M |
| 6 | 384 | 6 | 13.8M | 10.6M |
| 8 | 512 | 8 | 29.4M | 25.2M |
| 10 | 640 | 10 | 54.4M | 49.2M |

Every size sees 200M tokens (batches of 64 x 256), so the final losses trace L(N) at fixed data;
`python scripts/sweep.py --dry_run` prints the runs with their FLOPs.

`:cpu` is the family shrunk for a 2-core CPU: 1 to 5 layers (0.6M to 8M params), context 128,
150 steps of 16 x 128 tokens each (about 15 minutes in all). `:smoke` checks the machinery in
seconds per run (tests, the scaling notebook's reduced mode): 1 to 4 layers, 24 steps of 8 x 64
tokens, a 2048-piece tokenizer trained on 300 documents of the corpus.

Usage: python scripts/sweep.py --config=configs/sweeps/model_size.py[:cpu|:smoke]
"""

from configs import tiny
from gptjax import sweep as sweep_lib

LAYERS = {"": [2, 3, 4, 5, 6, 8, 10], "cpu": [1, 2, 3, 4, 5], "smoke": [1, 2, 3, 4]}


def get_config(arg: str = ""):
  c = tiny.get_config()
  c.name = "model_size" + (f"_{arg}" if arg else "")
  c.train.sample_tokens = 0
  c.checkpoint.keep_best = 0
  if arg == "cpu":
    c.model.ctx = 128
    c.train.update(global_batch=16, steps=150, log_every=10, eval_every=0, eval_batches=8)
    c.optim.update(peak_lr=2e-3, warmup_steps=15)
    c.checkpoint.save_every = 0
  elif arg == "smoke":
    c.data.max_docs = 300
    c.data.tokenizer.update(vocab_size=2048, train_chars=2_000_000)
    c.model.update(vocab_size=2048, ctx=64)
    c.train.update(global_batch=8, steps=24, log_every=4, eval_every=0, eval_batches=2,
                   progress=False)
    c.optim.update(peak_lr=3e-3, warmup_steps=4)
    c.checkpoint.save_every = 0
  elif not arg:
    c.train.update(global_batch=64, tokens=200_000_000, log_every=50, eval_every=1000,
                   eval_batches=20)
    c.optim.update(peak_lr=1e-3, warmup_steps=200)
    c.checkpoint.save_every = 1000
  else:
    raise ValueError(f"model_size takes no argument, ':cpu' or ':smoke', got {arg!r}.")
  return c


def sweep(arg: str = ""):
  return sweep_lib.sizes_by_aspect_ratio(LAYERS[arg], aspect_ratio=64, d_head=64)
