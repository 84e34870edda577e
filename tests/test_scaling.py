"""Scaling-law fits recover known laws; results tables, CSV, the plot and the fit script."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize

import configs
from gptjax import accounting, scaling, sweep, sweep_run
from gptjax.model import ModelArgs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Hoffmann et al. (2022), approach 3.
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla_loss(n, d, p=TRUE):
  return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def isoflop_points(noise=0.01, seed=0):
  """Runs as an IsoFLOP design would place them: 5 budgets x 9 sizes, 1% lognormal noise."""
  rng = np.random.default_rng(seed)
  n, d = [], []
  for c in np.geomspace(1e18, 1e21, 5):
    for size in np.geomspace(1e7, 3e9, 9):
      if 1e8 <= c / (6 * size) <= 1e12:
        n.append(size)
        d.append(c / (6 * size))
  n, d = np.array(n), np.array(d)
  return n, d, chinchilla_loss(n, d) * np.exp(rng.normal(0, noise, n.size))


def test_chinchilla_fit_recovers_the_law_it_was_generated_from():
  n, d, loss = isoflop_points()
  fit = scaling.fit_chinchilla(n, d, loss)
  for key in ("E", "alpha", "beta"):
    assert getattr(fit, key) == pytest.approx(TRUE[key], rel=0.1), (key, fit)
  # A and B trade off against the exponents; the fitted law must still predict the data.
  np.testing.assert_allclose(fit(n, d), chinchilla_loss(n, d), rtol=0.01)


def test_power_law_fit_recovers_l_of_n_at_fixed_data():
  rng = np.random.default_rng(1)
  n = np.geomspace(1e6, 5e7, 8)
  d = 2e8
  loss = chinchilla_loss(n, d) * np.exp(rng.normal(0, 0.005, n.size))
  fit = scaling.fit_power_law(n, loss)
  assert fit.E == pytest.approx(TRUE["E"] + TRUE["B"] / d ** TRUE["beta"], rel=0.1)
  assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.1)


def test_compute_optimal_sizes_minimise_the_fitted_loss_at_fixed_compute():
  fit = scaling.ChinchillaFit(**TRUE, objective=0.0)
  c = np.array([1e19, 1e21, 1e23])
  n_opt, d_opt = fit.compute_optimal(c)
  np.testing.assert_allclose(6 * n_opt * d_opt, c, rtol=1e-12)
  for ci, ni in zip(c, n_opt):
    best = optimize.minimize_scalar(lambda ln, ci=ci: fit(np.exp(ln), ci / (6 * np.exp(ln))),
                                    bounds=(np.log(1e5), np.log(1e14)), method="bounded",
                                    options={"xatol": 1e-8})
    assert np.exp(best.x) == pytest.approx(ni, rel=1e-3)
  assert np.all(np.diff(fit.frontier(c)) < 0)
  # N* grows as C^(beta/(alpha+beta)): with alpha > beta, data grows faster than parameters.
  np.testing.assert_allclose(np.diff(np.log(n_opt)) / np.diff(np.log(c)),
                             TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), rtol=1e-9)
  assert np.all(np.diff(d_opt / n_opt) > 0)


@pytest.mark.parametrize("bad", [
    dict(n=[1e6, 2e6], d=[1e8, 1e8], loss=[3.0, 2.9]),  # too few runs
    dict(n=[1e6, 2e6, 3e6, 4e6, 5e6], d=[1e8] * 5, loss=[3.0, np.nan, 2.8, 2.7, 2.6]),
    dict(n=[1e6, 2e6, 3e6, 4e6, 5e6], d=[1e8] * 4, loss=[3.0, 2.9, 2.8, 2.7, 2.6]),
])
def test_fits_reject_bad_input(bad):
  with pytest.raises(ValueError, match="fit|finite"):
    scaling.fit_chinchilla(**bad)


def fake_sweep(tmp_path):
  """A sweep folder as `run_local` leaves it, without training: configs, metrics, sweep.json."""
  root = tmp_path / "sweep"
  runs = []
  for i, (layers, loss) in enumerate([(1, 5.0), (2, 4.5), (3, 4.2), (4, 4.0)]):
    overrides = {"model.n_layers": layers, "model.d_model": 64 * layers, "model.n_heads": layers}
    cfg = sweep.apply(configs.load("tiny"), overrides, "test")
    name = sweep.run_name(overrides)
    (root / name).mkdir(parents=True)
    (root / name / "config.json").write_text(cfg.to_json_best_effort())
    steps = cfg.train.steps if i < 3 else 40  # the last one stopped early
    tok = cfg.train.global_batch * cfg.model.ctx
    rows = [{"step": s, "tokens": s * tok, "loss": loss + 1, "loss_avg": loss + 1.1}
            for s in range(10, steps + 1, 10)]
    rows.insert(1, {"step": 20, "tokens": 20 * tok, "loss": 99.0, "loss_avg": 99.0})  # pre-resume
    rows[-1].update(val_loss=loss)
    (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs.append({"name": name, "overrides": overrides, "meta": {"budget": 1e12 * (i + 1)}})
  (root / "sweep.json").write_text(json.dumps({"sweep": "fake", "runs": runs}))
  return root


def test_collect_builds_one_row_per_run_and_round_trips_through_csv(tmp_path):
  root = fake_sweep(tmp_path)
  rows = scaling.collect(str(root))
  assert [r["n_layers"] for r in rows] == [1, 2, 3, 4]
  assert [r["finished"] for r in rows] == [True, True, True, False]
  assert [r["loss"] for r in rows] == [5.0, 4.5, 4.2, 4.0]  # the final validation loss
  assert rows[0]["budget"] == 1e12 and rows[0]["steps"] == 100
  args = ModelArgs.from_config(configs.load("tiny").model)
  tiny = rows[3]
  assert tiny["params"] == accounting.param_counts(args).total
  assert tiny["compute"] == 6 * tiny["params"] * tiny["tokens"]
  assert len(scaling.collect(str(root), finished_only=True)) == 3
  curves = scaling.curves(str(root), [rows[0]["name"]])
  tokens, loss = curves[rows[0]["name"]]
  assert len(tokens) == 10 and 99.0 not in loss  # the re-logged step replaced the earlier one
  path = scaling.write_csv(rows, str(tmp_path / "out" / "results.csv"))
  assert scaling.read_csv(path) == rows
  with pytest.raises(FileNotFoundError, match="no runs"):
    scaling.collect(str(tmp_path / "out"))


def test_plot_writes_a_png(tmp_path):
  rows = scaling.collect(str(fake_sweep(tmp_path)))
  n, d, loss = isoflop_points()
  synthetic = [{"name": str(i), "params": ni, "tokens": di, "loss": li}
               for i, (ni, di, li) in enumerate(zip(n, d, loss))]
  fit = scaling.fit_chinchilla(n, d, loss)
  path = scaling.plot(synthetic, str(tmp_path / "iso.png"), chinchilla=fit)
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  power = scaling.fit_power_law(scaling.column(rows, "params"), scaling.column(rows, "loss"))
  curves = scaling.curves(str(tmp_path / "sweep"), [r["name"] for r in rows])
  path = scaling.plot(rows, str(tmp_path / "sizes.png"), power_law=power, run_curves=curves)
  assert os.path.getsize(path) > 10_000


def test_fit_script_fits_a_results_table(tmp_path):
  n, d, loss = isoflop_points()
  csv = scaling.write_csv([{"name": f"run{i}", "params": ni, "tokens": di, "loss": li}
                           for i, (ni, di, li) in enumerate(zip(n, d, loss))],
                          str(tmp_path / "results.csv"))
  proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "fit_scaling.py"),
                         f"--csv={csv}", f"--out={tmp_path / 'fit'}"], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  fit = json.load(open(tmp_path / "fit" / "fit.json"))
  assert fit["law"] == "nd" and fit["alpha"] == pytest.approx(TRUE["alpha"], rel=0.1)
  assert os.path.exists(tmp_path / "fit" / "scaling.png") and "L(N, D) =" in proc.stdout


@pytest.mark.slow
def test_a_real_size_sweep_runs_as_subprocesses_and_fits(tmp_path, monkeypatch):
  """model_size:smoke (4 sizes) trained for real by scripts/train.py subprocesses, then fitted."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device per run
  sw = sweep.expand("model_size:smoke", n_devices=1)
  workdir = str(tmp_path / "sweep")
  outcome = sweep_run.run_local(sw, workdir, in_process=False)
  assert set(outcome.values()) == {"trained"} and len(outcome) == 4
  assert set(sweep_run.run_local(sw, workdir, in_process=False).values()) == {"skipped"}
  rows = scaling.collect(workdir, finished_only=True)
  assert len(rows) == 4 and all(np.isfinite(r["val_loss"]) for r in rows)
  n, loss = scaling.column(rows, "params"), scaling.column(rows, "loss")
  fit = scaling.fit_power_law(n, loss)
  print(f"L(N) = {fit.E:.3f} + {fit.A:.4g} / N^{fit.alpha:.3f}; losses {loss}")
  assert np.all(np.isfinite([fit.E, fit.A, fit.alpha]))
  assert np.all(np.abs(fit(n) / loss - 1) < 0.1)  # the law describes the runs it was fitted to
  path = scaling.plot(rows, str(tmp_path / "scaling.png"), power_law=fit,
                      run_curves=scaling.curves(workdir, [r["name"] for r in rows]))
  assert os.path.getsize(path) > 10_000
