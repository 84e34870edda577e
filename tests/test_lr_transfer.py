"""Learning-rate transfer tables and plots (gptjax/lr_transfer.py); the µP sweep run for real."""

import os
import subprocess
import sys

import numpy as np
import pytest

from gptjax import lr_transfer, sweep, sweep_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows_from(losses):
  """{(kind, width): [loss per LR of the grid]} -> rows as `lr_transfer.collect` gives them."""
  grid = [2.0**-e for e in range(10, 5, -1)]
  return [{"name": f"{k}-{w}-{lr}", "parametrization": k, "d_model": w, "peak_lr": lr, "loss": x}
          for (k, w), xs in losses.items() for lr, x in zip(grid, xs)], grid


def test_best_learning_rate_drift_and_table_from_known_curves():
  rows, grid = rows_from({
      ("sp", 64): [5.0, 4.6, 4.4, 4.5, 4.9],    # best at grid[2]
      ("sp", 256): [4.3, 4.1, 4.4, 5.2, np.nan],  # best at grid[1]; a diverged run
      ("sp", 1024): [3.9, 4.2, 4.6, 5.8, 7.0],  # best at grid[0]: drifted 2 steps
      ("mup", 64): [5.0, 4.6, 4.4, 4.5, 4.9],
      ("mup", 256): [4.6, 4.2, 4.0, 4.1, 4.6],
      ("mup", 1024): [4.5, 4.0, 3.8, 3.7, 4.2],  # best at grid[3]: 1 step
  })
  top = lr_transfer.best(rows)
  assert top["sp", 64]["peak_lr"] == grid[2] and top["sp", 1024]["peak_lr"] == grid[0]
  assert top["mup", 1024]["loss"] == 3.7
  assert lr_transfer.drift(rows) == {"sp": 2, "mup": 1}
  table = lr_transfer.markdown(rows).splitlines()
  assert table[2] == "| SP (standard) | 64 | 0.00391 | 4.4000 | 2 |"
  assert table[-1] == "| µP | 1024 | 0.00781 | 3.7000 | 1 |"  # 2^-7
  assert len(table) == 2 + 6


def test_plot_writes_one_panel_per_parametrization(tmp_path):
  rows, _ = rows_from({("sp", 64): [5.0, 4.6, 4.4, 4.5, 4.9], ("mup", 64): [5.0, 4.6, 4.4, 4.5, 9]})
  path = lr_transfer.plot(rows, str(tmp_path / "t.png"))
  assert os.path.getsize(path) > 10_000


@pytest.mark.slow
def test_the_mup_sweep_runs_and_its_base_width_runs_coincide(tmp_path, monkeypatch):
  """mup_transfer:smoke (2 widths x 2 LRs x SP/µP) trained for real, then tabled and plotted: at
  the base width µP is SP, so those runs give the same loss; at twice the width they differ."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device per run
  sw = sweep.expand("mup_transfer:smoke", n_devices=1)
  workdir = str(tmp_path / "sweep")
  assert set(sweep_run.run_local(sw, workdir).values()) == {"trained"}
  proc = subprocess.run([sys.executable, "scripts/plot_transfer.py", f"--sweep_dir={workdir}"],
                        cwd=REPO, capture_output=True, text=True, check=True)
  assert "| µP | 64 |" in proc.stdout and os.path.exists(os.path.join(workdir, "transfer.png"))
  rows = lr_transfer.collect(workdir)
  loss = {(r["parametrization"], r["d_model"], r["peak_lr"]): r["loss"] for r in rows}
  assert len(loss) == 8 and all(np.isfinite(list(loss.values())))
  for lr in {k[2] for k in loss}:
    assert loss["mup", 32, lr] == loss["sp", 32, lr]
    assert loss["mup", 64, lr] != loss["sp", 64, lr]
