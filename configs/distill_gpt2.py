"""GPT-2 distillation: a trained GPT-2 one size up teaches the student (medium -> small, ...).

Train the teacher first, with the same data and tokenizer settings:

  python scripts/train.py --config=configs/gpt2.py:medium --workdir=runs/gpt2-medium
  python scripts/train.py --config=configs/distill_gpt2.py:small --workdir=runs/gpt2-small-kd
"""

from configs import gpt2

TEACHER = {"small": "medium", "medium": "large", "large": "xl"}


def get_config(arg: str = "small"):
  if arg not in TEACHER:
    raise ValueError(f"configs/distill_gpt2.py: no larger GPT-2 teaches {arg!r}; use one of "
                     f"{sorted(TEACHER)}.")
  c = gpt2.get_config(arg)
  c.name = f"gpt2-{arg}-distilled"
  c.compress.distill.update(teacher=f"runs/gpt2-{TEACHER[arg]}", alpha=0.5, temperature=1.0)
  # Both models' logits for a slice of positions are formed at once: keep micro-batches modest.
  c.train.micro_batch = 32
  return c
