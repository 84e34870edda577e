"""Decode speed: tokens/s of KV-cache generation, and its speedup over full recomputation.

  python scripts/bench_decode.py                          # gpt2 small, random init, batch 1 and 16
  python scripts/bench_decode.py --config=configs/tiny.py --batch_sizes=1,64 --new_tokens=128

Random-init weights, layers unrolled unless --scan_layers. Prompts are `--prompt_tokens` random
tokens; decoding is greedy with no EOS, so every row makes exactly `--new_tokens` tokens. Each case
is compiled ahead of time, then timed `--repeats` times (median; the prompt's prefill included).
Full recomputation (the reference path of gptjax.generate: the whole sequence through the model at
every step) is timed at `--recompute_batch_sizes` only, as it is slow. Prints one JSON line.
"""

import dataclasses
import json
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gptjax import cli, generate
from gptjax.model import GPT, ModelArgs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt2.py:small", "Model preset.")
_BATCH = flags.DEFINE_list("batch_sizes", ["1", "16"], "Rows decoded together, KV-cache path.")
_RECOMPUTE = flags.DEFINE_list("recompute_batch_sizes", ["1"],
                               "Batch sizes also timed with full recomputation (empty = none).")
_NEW = flags.DEFINE_integer("new_tokens", 256, "Tokens generated per row.")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 16, "Prompt length.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per KV-cache case (median).")
_RECOMPUTE_REPEATS = flags.DEFINE_integer("recompute_repeats", 1,
                                          "Timed runs per full-recomputation case (median).")
_SCAN = flags.DEFINE_bool("scan_layers", False, "Decode with scanned layers (default: unrolled, "
                          "as scripts/sample.py does; faster).")


def measure(model: GPT, params, batch: int, use_cache: bool, repeats: int) -> dict[str, float]:
  """Compiles one greedy decode of [batch, prompt] random tokens, then times it."""
  rng = np.random.default_rng(batch)
  tokens_BxP = rng.integers(0, model.args.vocab_size, (batch, _PROMPT.value), dtype=np.int32)
  lengths_B = np.full((batch,), _PROMPT.value, np.int32)
  inputs = (tokens_BxP, lengths_B, jax.random.key(0), generate.Sampling(temperature=0.0))
  start = time.perf_counter()
  compiled = generate.decode.lower(model, params, *inputs, max_new_tokens=_NEW.value,
                                   use_cache=use_cache).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    new_BxM = jax.block_until_ready(compiled(params, *inputs))
    times.append(time.perf_counter() - start)
  assert (np.asarray(new_BxM) >= 0).all()  # every row made every token
  seconds = statistics.median(times)
  return {"tokens_per_s": round(batch * _NEW.value / seconds, 2), "seconds": round(seconds, 3),
          "compile_s": round(compile_s, 2)}


def main(argv):
  del argv
  cfg = _CONFIG.value
  args = dataclasses.replace(ModelArgs.from_config(cfg.model), scan_layers=_SCAN.value)
  model = GPT(args)
  if _PROMPT.value + _NEW.value > args.ctx:
    raise app.UsageError(f"--prompt_tokens + --new_tokens must be <= ctx = {args.ctx}")
  params = jax.jit(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"]))()
  result = {"config": cfg.name, "device": jax.devices()[0].device_kind,
            "layers": "scanned" if _SCAN.value else "unrolled", "prompt_tokens": _PROMPT.value,
            "new_tokens": _NEW.value}
  for b in _BATCH.value:
    result[f"cache_batch_{b}"] = measure(model, params, int(b), True, _REPEATS.value)
  for b in _RECOMPUTE.value:
    result[f"recompute_batch_{b}"] = measure(model, params, int(b), False,
                                             _RECOMPUTE_REPEATS.value)
    if b in _BATCH.value:
      result[f"speedup_batch_{b}"] = round(result[f"cache_batch_{b}"]["tokens_per_s"]
                                           / result[f"recompute_batch_{b}"]["tokens_per_s"], 2)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
