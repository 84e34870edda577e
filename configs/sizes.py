"""The published GPT sizes, in one table to check line by line against the papers.

GPT-1: Radford et al. 2018. GPT-2: Radford et al. 2019. GPT-3: Brown et al. 2020, Table 2.1.
Columns: layers, d_model, heads, d_head, context, vocab, batch (sequences per step), peak lr,
nominal params (as published, rounded), LayerNorm placement.

Notes on the rows:
* GPT-3 XL: the paper prints 24 heads of d_head 128, but 24 x 128 = 3072 != d_model 2048. We keep
  d_head 128 and use 16 heads (as GPT-Neo 1.3B does), so that heads x d_head = d_model.
* GPT-3 13B: the paper prints d_model 5140; 40 heads x 128 = 5120 is the consistent value.
* GPT-3 batch sizes are given in tokens (0.5M, 1M, 2M, 3.2M); in sequences of 2048 that is 256, 512,
  1024 and 1536 (3.1M tokens).
* GPT-2 learning rates were tuned per size and not published; we use the GPT-3 values of the
  nearest size.
"""

from typing import NamedTuple


class Size(NamedTuple):
  layers: int
  d_model: int
  heads: int
  d_head: int
  ctx: int
  vocab: int
  batch: int  # sequences per optimizer step
  lr: float
  nominal: float  # published parameter count
  norm: str  # 'post' (GPT-1) or 'pre' (GPT-2/3)


SIZES: dict[str, Size] = {
    #                   layers d_model heads d_head  ctx   vocab  batch    lr   nominal  norm
    "gpt1":        Size(12,    768,    12,   64,    512, 40478,    64, 2.5e-4, 117e6, "post"),
    "gpt2-small":  Size(12,    768,    12,   64,   1024, 50257,   512, 6.0e-4, 124e6, "pre"),
    "gpt2-medium": Size(24,   1024,    16,   64,   1024, 50257,   512, 3.0e-4, 355e6, "pre"),
    "gpt2-large":  Size(36,   1280,    20,   64,   1024, 50257,   512, 2.5e-4, 774e6, "pre"),
    "gpt2-xl":     Size(48,   1600,    25,   64,   1024, 50257,   512, 2.0e-4, 1558e6, "pre"),
    "gpt3-small":  Size(12,    768,    12,   64,   2048, 50257,   256, 6.0e-4, 125e6, "pre"),
    "gpt3-medium": Size(24,   1024,    16,   64,   2048, 50257,   256, 3.0e-4, 350e6, "pre"),
    "gpt3-large":  Size(24,   1536,    16,   96,   2048, 50257,   256, 2.5e-4, 760e6, "pre"),
    "gpt3-xl":     Size(24,   2048,    16,  128,   2048, 50257,   512, 2.0e-4, 1.3e9, "pre"),
    "gpt3-2.7b":   Size(32,   2560,    32,   80,   2048, 50257,   512, 1.6e-4, 2.7e9, "pre"),
    "gpt3-6.7b":   Size(32,   4096,    32,  128,   2048, 50257,  1024, 1.2e-4, 6.7e9, "pre"),
    "gpt3-13b":    Size(40,   5120,    40,  128,   2048, 50257,  1024, 1.0e-4, 13.0e9, "pre"),
    "gpt3-175b":   Size(96,  12288,    96,  128,   2048, 50257,  1536, 0.6e-4, 175.0e9, "pre"),
}


def lookup(family: str, name: str) -> Size:
  """Returns the row `family-name` (or `family` alone), with a clear error for unknown names."""
  key = family if not name else f"{family}-{name}"
  if key not in SIZES:
    choices = sorted(k.split("-", 1)[1] for k in SIZES if k.startswith(family + "-"))
    raise ValueError(
        f"Unknown {family} preset {name!r}; choose one of {choices} "
        f"(e.g. --config=configs/{family}.py:{choices[0] if choices else ''}).")
  return SIZES[key]
