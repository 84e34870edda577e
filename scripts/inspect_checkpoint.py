"""Shows what a run's checkpoints hold: steps, sizes on disk, the tree of shapes and dtypes, the
config they were trained with and the data position.

  python scripts/inspect_checkpoint.py --workdir=runs/x [--step=N] [--opt_state] [--config]
"""

import json

from absl import flags, logging
from flax import traverse_util
import numpy as np

from gptjax import checkpoint, cli, layout, run, storage

_WORKDIR = flags.DEFINE_string("workdir", None, "A gptjax run (or its checkpoints/ folder).")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint to describe (default: latest).")
_OPT = flags.DEFINE_bool("opt_state", False, "Also list every optimizer-state array.")
_CONFIG = flags.DEFINE_bool("config", False, "Print all of the config (default: model, train, "
                            "mesh).")
flags.mark_flag_as_required("workdir")


def _mib(n: int) -> str:
  return f"{n / 2**20:,.2f} MiB"


def _tree_rows(tree) -> tuple[list[str], int, int]:
  """One 'path  shape  dtype' row per array; (rows, values, bytes)."""
  rows, values, size = [], 0, 0
  for keys, md in traverse_util.flatten_dict(tree).items():
    if not hasattr(md, "shape"):
      continue  # empty optimizer states
    n = int(np.prod(md.shape, dtype=np.int64))
    values, size = values + n, size + n * np.dtype(md.dtype).itemsize
    name, shape = "/".join(map(str, keys)), str(tuple(md.shape))
    rows.append(f"    {name:<48} {shape:<22} {np.dtype(md.dtype)}")
  return rows, values, size


def _as_dict(tree):
  """Orbax metadata keeps optimizer tuples as lists; index them so every level has keys."""
  if isinstance(tree, (list, tuple)):
    return {str(i): _as_dict(v) for i, v in enumerate(tree)}
  if isinstance(tree, dict):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def describe(path: str, step: int | None = None, opt_state: bool = False,
             full_config: bool = False) -> str:
  """The report printed by this script, as text."""
  reader = checkpoint.Reader(path)
  step = reader.resolve(step)
  lines = [f"checkpoints in {reader.directory}:", f"  {'step':>8}  {'on disk':>12}  items"]
  for s in reader.steps():
    items = [i for i in ("params", "opt_state", "meta") if reader.has(s, i)]
    lines.append(f"  {s:>8}  {_mib(reader.size_on_disk(s)):>12}  {', '.join(items)}"
                 + ("   <- shown below" if s == step else ""))
  meta = reader.meta(step)
  config, where = run.checkpoint_config(reader, step)
  lines += ["", f"step {step}:"]
  seq_len = (config["train"]["seq_len"] or config["model"]["ctx"]) if config else None
  position = f"  data position: step {meta['step']}, {meta.get('tokens', 0):,} tokens seen"
  if seq_len:
    position += f" (= {meta.get('tokens', 0) // seq_len:,} sequences of {seq_len} tokens)"
  lines.append(position)
  if "data" in meta:
    lines.append(f"  data iterator state: {json.dumps(meta['data'])}")
  params = reader.tree(step)
  rows, values, size = _tree_rows(params)
  lines.append(f"  params: {len(rows)} arrays, {values:,} values, {_mib(size)}, layout "
               f"{'scanned (model.scan_layers=True)' if layout.is_scanned(params) else 'unrolled'}")
  lines += rows
  if reader.has(step, "opt_state"):
    rows, values, size = _tree_rows(_as_dict(reader.tree(step, "opt_state")))
    lines.append(f"  opt_state: {len(rows)} arrays, {values:,} values, {_mib(size)}"
                 + ("" if opt_state else " (--opt_state lists them)"))
    lines += rows if opt_state else []
  else:
    lines.append("  opt_state: none (a params-only export)")
  if config is None:
    lines.append("  config: not recorded")
  else:
    shown = config if full_config else {k: config[k] for k in ("name", "seed", "model", "train",
                                                               "mesh") if k in config}
    lines.append(f"  config ({where}{'' if full_config else '; --config prints all of it'}):")
    lines += ["    " + row for row in json.dumps(shown, indent=2, sort_keys=True).splitlines()]
  return "\n".join(lines)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  print(describe(storage.readable(_WORKDIR.value), _STEP.value, _OPT.value, _CONFIG.value))


if __name__ == "__main__":
  cli.run(main)
