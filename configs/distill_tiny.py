"""Distillation on a laptop: a tiny-large teacher (6 x 384) teaches the tiny preset (4 x 256).

Both train on the embedded corpus with the same tokenizer (the tokenizer cache gives both runs
the same SentencePiece model). Usage:

  python scripts/train.py --config=configs/distill_tiny.py:teacher --workdir=runs/tiny-large
  python scripts/train.py --config=configs/distill_tiny.py --workdir=runs/tiny-distilled
"""

from configs import tiny


def get_config(arg: str = "student"):
  c = tiny.get_config()
  if arg == "teacher":
    c.name = "tiny-large"
    c.model.update(n_layers=6, d_model=384, n_heads=6)
    c.train.steps = 300
    c.optim.peak_lr = 1e-3
  elif arg == "student":
    c.name = "tiny-distilled"
    c.compress.distill.update(teacher="runs/tiny-large", alpha=0.5, temperature=1.0)
  else:
    raise ValueError(f"configs/distill_tiny.py: unknown argument {arg!r}; use 'teacher' or "
                     "'student' (the default).")
  return c
