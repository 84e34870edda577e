"""Times the full train step (forward, backward, AdamW) and prints one JSON line.

Usage:
  python scripts/bench.py                    # the fixed CPU config (configs/cpu_bench.py)
  python scripts/bench.py --reference=torch  # also the PyTorch eager reference, and the ratio
  python scripts/bench.py --config=configs/gpt3.py:small --config.train.global_batch=8 --steps=5
  python scripts/bench.py --suite=accelerator  # GPT-2 small + GPT-3 XL, bf16, accelerator overlays

Reports tokens/s (median over timed steps), step and compile time, FLOPs per token (PaLM), MFU
(with --peak_flops or on a known accelerator), and the fraction of a large matmul's FLOP/s the
step reaches. `--suite=accelerator` prints a table (gptjax.bench.accelerator_suite: compile time
apart, MFU against the datasheet and a measured bf16 GEMM, peak memory, the attention kernel in the
compiled HLO; small stand-in models on CPU), then the same as one JSON line. The recommended XLA
flags of the backend present are added first (`--xla_flags=auto`, gptjax/xla_flags.py).
"""

import json
import os
import runpy

from absl import flags
from ml_collections import config_flags

from gptjax import bench, cli, xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cpu_bench.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the first (compiling) one.")
_REFERENCE = flags.DEFINE_enum("reference", "none", ["none", "torch"],
                               "Also time this implementation of the same step, interleaved.")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device for MFU (0 = known kinds).")
_MATMUL = flags.DEFINE_list("matmul", [str(d) for d in bench.MATMUL_SHAPE],
                            "M,K,N of the ceiling matmul ([M,K] @ [K,N]); empty = skip.")
_SUITE = flags.DEFINE_enum("suite", "none", ["none", "accelerator"],
                           "'accelerator': the ready GPU/TPU suite instead of --config's step.")
_SUITE_DEVICES = flags.DEFINE_integer("suite_devices", 1, "--suite: devices to run it on.")
xla_flags.define_flag()
_TORCH_REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks", "torch_reference.py")


def main(argv):
  del argv
  xla_flags.apply_from_flag()  # before anything starts JAX's backends
  if _SUITE.value == "accelerator":
    result = bench.accelerator_suite(steps=_STEPS.value, warmup=_WARMUP.value,
                                     n_devices=_SUITE_DEVICES.value)
    print(bench.format_suite(result))
    print(json.dumps(result))
    return
  reference = None
  if _REFERENCE.value == "torch":
    # benchmarks/ is not an installed package: run the file from this checkout (it imports torch).
    reference = runpy.run_path(_TORCH_REFERENCE)["make_train_step"]
  result = bench.run(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value,
                     matmul_shape=tuple(int(d) for d in _MATMUL.value) or None,
                     reference=reference, reference_name=_REFERENCE.value,
                     peak_flops=_PEAK.value or None)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
