"""Peak host memory of `gptjax.convert.to_hf` (`scripts/convert.py to_hf`) on a large model, against
its largest tensor.

  python scripts/bench_convert.py                         # GPT-2 medium (355M params, 1.4 GB fp32)
  python scripts/bench_convert.py --preset=gpt2:large --layouts=unrolled --check

Writes a params-only checkpoint of random weights (once per layout, reused) and converts it in a
fresh process that reports its own peak RSS (`resource.getrusage`) and its RSS after imports. The
streaming export should need about one stored array (plus one converted tensor) above that
baseline: the largest stored array is the stacked [layers, ...] MLP kernel when scanned, the
embedding when unrolled. Prints one JSON line per measurement.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import flags, logging

from gptjax import cli

_PRESET = flags.DEFINE_string("preset", "gpt2:medium", "Model preset whose size to convert.")
_DIR = flags.DEFINE_string("dir", "/tmp/gptjax_bench_convert", "Scratch folder (checkpoints kept).")
_LAYOUTS = flags.DEFINE_list("layouts", ["scanned", "unrolled"], "Checkpoint layouts to convert.")
_CHECK = flags.DEFINE_bool("check", False, "Also measure a run with the logit check (it holds "
                            "one whole model in memory at a time).")
_PHASE = flags.DEFINE_enum("phase", None, ["make", "convert"], "Internal: run one phase.")
_LAYOUT = flags.DEFINE_string("layout", "scanned", "Internal: the layout of this phase.")


def _rss_mb() -> float:
  with open("/proc/self/statm", encoding="utf-8") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _make(workdir: str, scanned: bool) -> None:
  """A params-only checkpoint of random N(0, 0.02) weights of the preset."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  import configs  # pylint: disable=import-outside-toplevel
  from gptjax import checkpoint, run  # pylint: disable=import-outside-toplevel
  from gptjax.model import GPT, ModelArgs  # pylint: disable=import-outside-toplevel

  cfg = configs.load(_PRESET.value)
  cfg.model.scan_layers = scanned
  shapes = jax.eval_shape(lambda: GPT(ModelArgs.from_config(cfg.model)).init(
      jax.random.key(0), np.zeros((1, 8), np.int32)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)),
                        nn.meta.unbox(shapes["params"]))
  run.save_params(workdir, 1, params, {"step": 1, "tokens": 0,
                                       "config": checkpoint.config_json(cfg)})


def _convert(workdir: str, out: str, verify: bool) -> dict:
  import shutil  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  # Loaded now: the libraries' own memory counts in the baseline RSS, not in the conversion's.
  # pylint: disable-next=import-outside-toplevel,unused-import
  import torch  # noqa: F401 (loaded before the baseline is measured)
  # pylint: disable-next=import-outside-toplevel,unused-import
  import transformers  # noqa: F401 (loaded before the baseline is measured)

  from gptjax import checkpoint, convert  # pylint: disable=import-outside-toplevel

  reader = checkpoint.Reader(workdir)
  leaves = list(traverse_util.flatten_dict(reader.tree(1)).values())
  largest = max(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in leaves) / 2**20
  total = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in leaves) / 2**20
  shutil.rmtree(out, ignore_errors=True)
  baseline = _rss_mb()
  t0 = time.perf_counter()
  err = convert.to_hf(workdir, None, out, verify=verify)
  seconds = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  shutil.rmtree(out, ignore_errors=True)
  return {"params_mb": round(total, 1), "largest_tensor_mb": round(largest, 1),
          "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
          "conversion_mb": round(peak - baseline, 1),
          "conversion_over_largest": round((peak - baseline) / largest, 2),
          "verified": verify, "max_abs_logit_error": err, "seconds": round(seconds, 1)}


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  workdir = os.path.join(_DIR.value, _PRESET.value.replace(":", "-") + "-" + _LAYOUT.value)
  if _PHASE.value == "make":
    _make(workdir, _LAYOUT.value == "scanned")
    return
  if _PHASE.value == "convert":
    result = _convert(workdir, os.path.join(_DIR.value, "hf"), _CHECK.value)
    print(json.dumps({"preset": _PRESET.value, "layout": _LAYOUT.value} | result), flush=True)
    return
  runs = [(layout, False) for layout in _LAYOUTS.value]
  runs += [(layout, True) for layout in _LAYOUTS.value] if _CHECK.value else []
  for layout, verify in runs:
    base = [sys.executable, os.path.abspath(__file__), f"--preset={_PRESET.value}",
            f"--dir={_DIR.value}", f"--layout={layout}"]
    if not os.path.isdir(os.path.join(_DIR.value, f"{_PRESET.value.replace(':', '-')}-{layout}")):
      subprocess.run(base + ["--phase=make"], check=True)
    subprocess.run(base + ["--phase=convert", f"--check={verify}"], check=True)


if __name__ == "__main__":
  cli.run(main)
