"""Measures the tokens per second the input pipeline delivers; prints one JSON line.

Usage: python scripts/bench_data.py --config=configs/tiny.py [--steps=2000]
Builds (or reuses) the tokenizer and token cache first; only the pipeline itself is timed.
"""

import json
import time

from absl import flags
from ml_collections import config_flags

from gptjax import cli, optim
from gptjax.data import pipeline, tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory holding the tokenizer ('' = none).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Batches to time.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Batches to take before timing.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  seq_len = optim.seq_len(cfg)
  start = time.perf_counter()
  tok = tokenizer.load_or_train(cfg.data, _WORKDIR.value)
  it = pipeline.make(cfg.data, tok, "train", seq_len=seq_len, global_batch=cfg.train.global_batch,
                     seed=cfg.seed)
  for _ in range(_WARMUP.value):
    next(it)
  setup = time.perf_counter() - start
  start = time.perf_counter()
  tokens = sum(next(it)["inputs"].size for _ in range(_STEPS.value))
  seconds = time.perf_counter() - start
  print(json.dumps({
      "config": cfg.name, "seq_len": seq_len, "global_batch": cfg.train.global_batch,
      "worker_count": cfg.data.worker_count, "prefetch": cfg.data.prefetch,
      "steps": _STEPS.value, "tokens_per_s": round(tokens / seconds),
      "steps_per_s": round(_STEPS.value / seconds, 1), "setup_s": round(setup, 2)}))


if __name__ == "__main__":
  cli.run(main)
