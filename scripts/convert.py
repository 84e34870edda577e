"""Converts checkpoints: gptjax -> Hugging Face GPT-2, Hugging Face GPT-2 -> gptjax, and gptjax ->
params-only gptjax (no optimizer state, for serving). The command line of `gptjax.convert`.

  python scripts/convert.py to_hf   --workdir=runs/x [--step=N] --out=hf/x [--dtype=bfloat16]
  python scripts/convert.py from_hf --hf_dir=hf/x --out=runs/imported [--scan_layers=false]
  python scripts/convert.py params  --workdir=runs/x [--step=N] --out=runs/serve [--dtype=bfloat16]

`to_hf` streams: one array of the checkpoint is in memory at a time, so a model larger than host
RAM converts. Every conversion is checked before success is reported: the HF ones compare logits on
fixed inputs in both frameworks (`--atol` + `--rtol` x the largest logit), `params` compares every
array; a mismatch exits with status 1. The check itself holds one copy of the model in memory at a
time (skip it with --verify=false). A gptjax output is a workdir (`config.json`,
`checkpoints/<step>/`) that `--config.checkpoint.restore_from` and this script accept.
"""

import sys

from absl import app, flags, logging

from gptjax import cli, convert, storage
from gptjax.errors import ConfigError

COMMANDS = ("to_hf", "from_hf", "params")
_WORKDIR = flags.DEFINE_string("workdir", None, "to_hf/params: the gptjax run (or checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "to_hf/params: the checkpoint step (default: latest).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "from_hf: a local GPT-2 folder (save_pretrained).")
_OUT = flags.DEFINE_string("out", None, "Output folder (must not exist or be empty).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of the written "
                           "weights (bfloat16 halves the size; checked against rounded weights).")
_SCAN = flags.DEFINE_bool("scan_layers", True, "from_hf: stack the layers (model.scan_layers).")
_PAD = flags.DEFINE_integer("pad_vocab_to", 128, "from_hf: model.pad_vocab_to of the import.")
_VERIFY = flags.DEFINE_bool("verify", True, "Check the conversion (logits / arrays) first.")
_ATOL = flags.DEFINE_float("atol", 1e-4, "Logit check: absolute tolerance.")
_RTOL = flags.DEFINE_float("rtol", 1e-5, "Logit check: tolerance added per unit of max |logit|.")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command: {' | '.join(COMMANDS)}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  command, out = argv[1], _OUT.value
  need = {"to_hf": ("workdir", "out"), "from_hf": ("hf_dir", "out"), "params": ("workdir", "out")}
  missing = [f"--{k}" for k in need[command] if flags.FLAGS[k].value is None]
  if missing:
    raise app.UsageError(f"{command} needs {', '.join(missing)}")
  workdir = storage.readable(_WORKDIR.value) if _WORKDIR.value else None
  try:
    with storage.mirrored(out, "--out", delete_steps=False) as local_out:
      if command == "to_hf":
        convert.to_hf(workdir, _STEP.value, local_out, _DTYPE.value, _VERIFY.value, _ATOL.value,
                      _RTOL.value)
      elif command == "from_hf":
        convert.from_hf(_HF_DIR.value, local_out, _SCAN.value, _PAD.value, _DTYPE.value,
                        _VERIFY.value, _ATOL.value, _RTOL.value)
      else:
        convert.params_only(workdir, _STEP.value, local_out, _DTYPE.value, _VERIFY.value)
  except ConfigError:
    raise  # a wrong flag or input: cli.run prints it alone, with status 2
  except (convert.ConversionError, ValueError) as e:
    print(f"convert: FAILED: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"convert: OK: {out}" + ("" if _VERIFY.value else " (not verified: --verify=false)"),
        flush=True)


if __name__ == "__main__":
  cli.run(main)
