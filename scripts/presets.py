"""Prints every preset: size, exact parameter count vs the published one, FLOPs per token.

Usage: python scripts/presets.py [--padded]
"""

import sys

from absl import flags

import configs
from configs import sizes
from gptjax import accounting, cli
from gptjax.model import ModelArgs

_PADDED = flags.DEFINE_bool("padded", False, "Count with the vocab padded as configured "
                            "(model.pad_vocab_to) instead of the exact published vocabulary.")


def main(argv):
  del argv
  print(f"{'preset':<12} {'layers':>6} {'d_model':>7} {'heads':>5} {'ctx':>5} {'vocab':>6} "
        f"{'params':>16} {'published':>10} {'error':>7} {'GFLOPs/token':>12}")
  for spec in configs.all_presets():
    cfg = configs.load(spec)
    if not _PADDED.value:
      cfg.model.pad_vocab_to = 1
    args = ModelArgs.from_config(cfg.model)
    n = accounting.param_counts(args).total
    key = spec.replace(":", "-")
    if key in sizes.SIZES:
      published = sizes.SIZES[key].nominal
      pub, err = f"{published / 1e6:>9.0f}M", f"{100 * (n - published) / published:>+6.2f}%"
    else:
      pub, err = "-", "-"
    print(f"{spec:<12} {args.n_layers:>6} {args.d_model:>7} {args.n_heads:>5} {args.ctx:>5} "
          f"{args.padded_vocab:>6} {n:>16,} {pub:>10} {err:>7} "
          f"{accounting.flops_per_token(args) / 1e9:>12.3f}")
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main)
