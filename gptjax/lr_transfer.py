"""Learning-rate transfer across widths: the best learning rate per width, SP against µP.

Reads a sweep over `model.parametrization`, `model.d_model` and `optim.peak_lr`
(configs/sweeps/mup_transfer.py), finds each width's best learning rate under each
parametrization, and plots loss against learning rate, one curve per width. Under µP the best
learning rate should stay within a grid step as the model widens; under SP it drifts down.

    rows = lr_transfer.collect("runs/mup")
    print(lr_transfer.markdown(lr_transfer.best(rows)))
    lr_transfer.plot(rows, "runs/mup/transfer.png")
"""

import math
import os
from typing import Any

import numpy as np

from gptjax import run as run_lib, scaling

NAMES = {"sp": "SP (standard)", "mup": "µP"}


def collect(sweep_dir: str) -> list[dict[str, Any]]:
  """One row per finished run: parametrization, d_model, peak_lr and the final loss
  (`scaling.run_row`'s, validation when the run evaluated, else the training average)."""
  out = []
  for row in scaling.collect(sweep_dir, finished_only=True):
    cfg = run_lib.read_config(os.path.join(sweep_dir, row["name"]), "lr_transfer")
    out.append({"name": row["name"], "parametrization": cfg.model.get("parametrization", "sp"),
                "d_model": row["d_model"], "peak_lr": float(cfg.optim.peak_lr),
                "loss": float(row["loss"])})
  if not out:
    raise FileNotFoundError(f"{sweep_dir!r}: no finished runs to compare (run the sweep first: "
                            "python scripts/sweep.py --config=configs/sweeps/mup_transfer.py:cpu).")
  return out


def best(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
  """{(parametrization, width): the row with the lowest finite loss}."""
  out: dict[tuple[str, int], dict[str, Any]] = {}
  for r in rows:
    if not math.isfinite(r["loss"]):
      continue
    key = (r["parametrization"], r["d_model"])
    if key not in out or r["loss"] < out[key]["loss"]:
      out[key] = r
  return out


def drift(rows: list[dict[str, Any]]) -> dict[str, int]:
  """Per parametrization: how many grid steps the best learning rate moves between the widths
  (largest minus smallest index in the sorted grid of learning rates)."""
  grid = sorted({r["peak_lr"] for r in rows})
  steps: dict[str, list[int]] = {}
  for (kind, _), r in best(rows).items():
    steps.setdefault(kind, []).append(grid.index(r["peak_lr"]))
  return {kind: max(i) - min(i) for kind, i in steps.items()}


def markdown(rows: list[dict[str, Any]]) -> str:
  """The transfer table: for each parametrization and width, the best learning rate and its loss,
  then the drift in grid steps."""
  top, moved = best(rows), drift(rows)
  lines = ["| parametrization | d_model | best peak LR | loss at best | drift (grid steps) |",
           "|---|---|---|---|---|"]
  for kind in sorted({k for k, _ in top}, key=list(NAMES).index):
    for (k, width), r in sorted(top.items(), key=lambda kv: kv[0][1]):
      if k == kind:
        lines.append(f"| {NAMES.get(k, k)} | {width} | {r['peak_lr']:.3g} | {r['loss']:.4f} | "
                     f"{moved[k]} |")
  return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> str:
  """Loss against learning rate (log 2 axis), one curve per width, SP and µP side by side; each
  width's best point is ringed. Returns `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  kinds = [k for k in NAMES if any(r["parametrization"] == k for r in rows)]
  widths = sorted({r["d_model"] for r in rows})
  finite = [r["loss"] for r in rows if math.isfinite(r["loss"])]
  top = best(rows)
  fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), sharey=True,
                           squeeze=False)
  colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(widths)))
  for ax, kind in zip(axes[0], kinds):
    for width, color in zip(widths, colors):
      pts = sorted((r["peak_lr"], r["loss"]) for r in rows
                   if r["parametrization"] == kind and r["d_model"] == width)
      if not pts:
        continue
      ax.plot(*zip(*pts), "o-", color=color, label=f"d_model {width}", ms=4)
      if (kind, width) in top:
        b = top[kind, width]
        ax.plot(b["peak_lr"], b["loss"], "o", ms=11, mfc="none", mec=color, mew=2)
    ax.set_xscale("log", base=2)
    ax.set(title=NAMES[kind], xlabel="peak learning rate")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("final loss (nats/token)")
  if finite:  # diverged runs would stretch the axis: show the interesting band
    lo = min(finite)
    axes[0][0].set_ylim(lo - 0.05, min(max(finite), lo + 2.0) + 0.05)
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write(sweep_dir: str, out_dir: str | None = None) -> tuple[str, str]:
  """Writes `transfer.md` (the table) and `transfer.png` (the plot) into `out_dir` (default the
  sweep's folder); returns their paths."""
  rows = collect(sweep_dir)
  out_dir = out_dir or sweep_dir
  table = os.path.join(out_dir, "transfer.md")
  with open(table, "w", encoding="utf-8") as f:
    f.write(markdown(rows) + "\n")
  return table, plot(rows, os.path.join(out_dir, "transfer.png"))
