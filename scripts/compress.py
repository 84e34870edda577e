"""Compresses a trained run every way gptjax knows and tabulates what each costs and saves.

  python scripts/compress.py --workdir=runs/tiny --out=runs/tiny-compress
  python scripts/compress.py --workdir=runs/tiny --out=runs/c --methods=int8,int4 --group_size=64

The methods (baseline, int8, int4, float+ft, qat, pruned50, pruned24, student, distilled), the
columns and what goes where under --out: gptjax/compress.py, which does the work.
"""

import os

from absl import flags, logging

from gptjax import cli, compress, storage

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (scripts/train.py's workdir).")
_OUT = flags.DEFINE_string("out", None, "Where the compressed runs and the table go.")
_METHODS = flags.DEFINE_list("methods", list(compress.METHODS),
                             f"Subset of {', '.join(compress.METHODS)}.")
_GROUP = flags.DEFINE_integer("group_size", 64, "int4: weights per scale along the contraction.")
_FT_STEPS = flags.DEFINE_integer("finetune_steps", 50, "Steps of QAT / pruning fine-tuning.")
_FT_LR = flags.DEFINE_float("finetune_lr_scale", 0.25, "Fine-tuning peak lr / the run's peak lr.")
_STUDENT_STEPS = flags.DEFINE_integer("student_steps", 0, "Student steps (0 = the run's steps).")
_VAL_DOCS = flags.DEFINE_integer("val_docs", 200, "Held-out documents scored.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 8, "Rows per scoring batch.")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 8, "Rows decoded together.")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 64, "New tokens per row.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices to use (0 = all).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  opts = compress.Options(
      methods=tuple(_METHODS.value), group_size=_GROUP.value, finetune_steps=_FT_STEPS.value,
      finetune_lr_scale=_FT_LR.value, student_steps=_STUDENT_STEPS.value, val_docs=_VAL_DOCS.value,
      eval_batch=_EVAL_BATCH.value, decode_batch=_DECODE_BATCH.value,
      decode_tokens=_DECODE_TOKENS.value, num_devices=_NUM_DEVICES.value)
  with storage.mirrored(_OUT.value, "--out", delete_steps=False) as out:
    rows = compress.study(storage.readable(_WORKDIR.value), out, opts)
  print(compress.table(rows))
  print(f"wrote {os.path.join(_OUT.value, 'results.md')} and results.json; runs and serving "
        f"checkpoints in {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
