"""Collects a sweep's results and fits scaling laws: L(N) for sizes at fixed tokens, Chinchilla
L(N, D) when tokens vary too (an IsoFLOP sweep), then plots loss against compute.

  python scripts/fit_scaling.py --sweep_dir=runs/sweeps/model_size-cpu          # L(N)
  python scripts/fit_scaling.py --sweep_dir=runs/sweeps/isoflop-cpu --law=nd    # L(N, D), N*(C)
  python scripts/fit_scaling.py --csv=results.csv --out=fits/                    # from a table

Writes `results.csv` (one row per run), `fit.json` and `scaling.png` into --out (default: the sweep
folder) and prints the fitted parameters.
"""

import json
import os

import numpy as np
from absl import app, flags, logging
import ml_collections

from gptjax import cli, run as run_lib, scaling, sweep, trackers

_SWEEP_DIRS = flags.DEFINE_multi_string("sweep_dir", [], "A sweep's folder (repeat: pool sweeps).")
_CSV = flags.DEFINE_string("csv", None, "A results table written before, instead of --sweep_dir.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: the first --sweep_dir).")
_LAW = flags.DEFINE_enum("law", "auto", ["auto", "n", "nd"], "'n': L(N) = E + A/N^alpha; 'nd': "
                         "Chinchilla L(N, D); 'auto': 'nd' when the runs' token counts differ.")
_N_KEY = flags.DEFINE_enum("n_key", "params", ["params", "non_embedding", "matmul"],
                           "Which parameter count is N.")
_LOSS_KEY = flags.DEFINE_enum("loss_key", "loss", ["loss", "val_loss", "train_loss"],
                              "The final loss to fit ('loss' = validation if logged, else train).")
_ALL = flags.DEFINE_bool("include_unfinished", False, "Also fit runs that did not reach their end.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if bool(_SWEEP_DIRS.value) == bool(_CSV.value):
    raise app.UsageError("Give --sweep_dir (one or more) or --csv.")
  if _CSV.value:
    rows, out, run_curves = scaling.read_csv(_CSV.value), _OUT.value or ".", None
  else:
    rows, run_curves = [], {}
    for d in _SWEEP_DIRS.value:
      found = scaling.collect(d, finished_only=not _ALL.value)
      rows += found
      run_curves.update(scaling.curves(d, [r["name"] for r in found]))
    out = _OUT.value or _SWEEP_DIRS.value[0]
    print(f"wrote {scaling.write_csv(rows, os.path.join(out, 'results.csv'))}")
  n, d = scaling.column(rows, _N_KEY.value), scaling.column(rows, "tokens")
  loss = scaling.column(rows, _LOSS_KEY.value)
  law = _LAW.value if _LAW.value != "auto" else ("nd" if d.max() > 1.1 * d.min() else "n")
  print(f"{'name':<50} {'N':>12} {'D':>12} {'C=6ND':>9} {'loss':>7}")
  for r, ni, di, li in zip(rows, n, d, loss):
    print(f"{r['name']:<50} {ni:>12,.0f} {di:>12,.0f} {6 * ni * di:>9.2e} {li:>7.4f}")
  result, chinchilla, power_law = {"law": law, "n_key": _N_KEY.value, "runs": len(rows)}, None, None
  if law == "n":
    power_law = scaling.fit_power_law(n, loss)
    result.update(E=power_law.E, A=power_law.A, alpha=power_law.alpha)
    print(f"L(N) = {power_law.E:.4f} + {power_law.A:.4g} / N^{power_law.alpha:.4f}")
  else:
    chinchilla = scaling.fit_chinchilla(n, d, loss)
    spent = 6 * n * d  # budgets from the data's range to 100x beyond it, one per decade
    c = 10.0 ** np.arange(np.floor(np.log10(spent.min())), np.ceil(np.log10(spent.max())) + 3)
    n_opt, d_opt = chinchilla.compute_optimal(c)
    result.update(E=chinchilla.E, A=chinchilla.A, B=chinchilla.B, alpha=chinchilla.alpha,
                  beta=chinchilla.beta, compute_optimal=[
                      {"C": ci, "N": ni, "D": di} for ci, ni, di in zip(c, n_opt, d_opt)])
    print(f"L(N, D) = {chinchilla.E:.4f} + {chinchilla.A:.4g} / N^{chinchilla.alpha:.4f} "
          f"+ {chinchilla.B:.4g} / D^{chinchilla.beta:.4f}")
    for ci, ni, di in zip(c, n_opt, d_opt):
      print(f"  C = {ci:.0e}: N* = {ni:.3g}, D* = {di:.3g} ({di / ni:.1f} tokens/param)")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "fit.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  png = scaling.plot(rows, os.path.join(out, "scaling.png"), chinchilla=chinchilla,
                     power_law=power_law, run_curves=run_curves, n_key=_N_KEY.value,
                     loss_key=_LOSS_KEY.value)
  print(f"wrote {os.path.join(out, 'fit.json')} and {png}")
  if _SWEEP_DIRS.value:
    _attach(_SWEEP_DIRS.value[0], out, [os.path.join(out, n) for n in ("fit.json", "results.csv")]
            + [png], result)


def _attach(sweep_dir: str, out: str, paths: list[str], result: dict) -> None:
  """With W&B or MLflow among the sweep's trackers, attaches the fit's files to a run '<sweep>-fit'
  in the sweep's group."""
  with open(os.path.join(sweep_dir, sweep.SWEEP_JSON), encoding="utf-8") as f:
    manifest = json.load(f)
  saved = run_lib.saved_config(os.path.join(sweep_dir, manifest["runs"][0]["name"]))
  t = ml_collections.ConfigDict(saved["train"]) if saved else None
  if t is None or not [n for n in trackers.names(t.trackers) if n != "tensorboard"]:
    return
  summary = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
  took = trackers.attach(t, out, paths, f"{manifest['sweep']}-fit", summary)
  if took:
    print(f"attached {', '.join(os.path.basename(p) for p in paths)} to {', '.join(took)} "
          f"(run {manifest['sweep']}-fit, group {t.run_group})")


if __name__ == "__main__":
  cli.run(main)
