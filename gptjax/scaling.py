"""Scaling laws from a sweep's runs: one results table, L(N) and Chinchilla L(N, D) fits, a plot.

    rows = scaling.collect("runs/sweeps/isoflop")           # one dict per run, from its workdir
    scaling.write_csv(rows, "results.csv")
    fit = scaling.fit_chinchilla(n, d, loss)                 # L = E + A / N^alpha + B / D^beta
    n_opt, d_opt = fit.compute_optimal(1e21)                 # C = 6 N D

Fits follow Hoffmann et al. (2022), approach 3: the prediction is written as a log-sum-exp,
log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, and the Huber loss
(delta 1e-3) of log L minus the log of the observed loss is minimised with L-BFGS from a grid of
starting points, keeping the best. N is the total parameter count unless told otherwise; the
compute of a run is C = 6 N D, D its training tokens.
"""

import csv
import dataclasses
import itertools
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import threadpoolctl
from scipy import optimize

from gptjax import accounting, metrics as metrics_lib, optim, run as run_lib
from gptjax.model import ModelArgs
from gptjax.sweep import SWEEP_JSON

# Chinchilla's grid of initialisations (approach 3): every point is scored, the best few refined.
CHINCHILLA_GRID = {"alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5),
                   "e": np.arange(-1, 1.51, 0.5), "a": np.arange(0, 25.1, 5),
                   "b": np.arange(0, 25.1, 5)}


# ---- the results table --------------------------------------------------------------------------


def _final(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """The last value of every metric (rows re-logged after a resume replace the earlier ones)."""
  by_step = {r["step"]: r for r in rows}  # later rows of the same step win
  out: dict[str, Any] = {}
  for step in sorted(by_step):
    out.update({k: v for k, v in by_step[step].items() if v is not None})
  return out


def run_row(workdir: str, name: str | None = None, meta: dict[str, Any] | None = None) -> dict:
  """One run's row: model shape, parameter counts, tokens, compute, final losses, whether done."""
  cfg = run_lib.read_config(workdir, "run_row")
  args = ModelArgs.from_config(cfg.model)
  counts, planned = accounting.param_counts(args), optim.plan(cfg)
  has_metrics = os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  last = _final(metrics_lib.read(workdir)) if has_metrics else {}
  tokens, steps = last.get("tokens", 0), last.get("step", 0)
  train_loss = last.get("loss_avg", last.get("loss", math.nan))
  val_loss = last.get("val_loss", math.nan)
  return {
      "name": name or os.path.basename(os.path.normpath(workdir)), **(meta or {}),
      "n_layers": args.n_layers, "d_model": args.d_model, "n_heads": args.n_heads,
      "params": counts.total, "non_embedding": counts.non_embedding, "matmul": counts.matmul,
      "steps": steps, "planned_steps": planned.total_steps,
      "finished": steps >= planned.total_steps,
      "tokens": tokens, "compute": 6.0 * counts.total * tokens,
      "flops": accounting.flops_per_token(args, planned.seq_len) * tokens,
      "train_loss": train_loss, "val_loss": val_loss,
      "loss": val_loss if math.isfinite(val_loss) else train_loss,
  }


def collect(sweep_dir: str, finished_only: bool = False) -> list[dict[str, Any]]:
  """Rows of every run of a sweep, in the sweep's order (`sweep.json`), else of every run folder.

  Args:
    sweep_dir: the sweep's workdir, holding one gptjax workdir per run.
    finished_only: leave out runs that have not reached their last step.

  Returns:
    One dict per run that has started (has `config.json`); see `run_row` for the columns.
  """
  manifest = os.path.join(sweep_dir, SWEEP_JSON)
  if os.path.exists(manifest):
    with open(manifest, encoding="utf-8") as f:
      runs = [(r["name"], r["meta"]) for r in json.load(f)["runs"]]
  else:
    runs = [(d, {}) for d in sorted(os.listdir(sweep_dir))]
  rows = [run_row(os.path.join(sweep_dir, name), name, meta) for name, meta in runs
          if run_lib.saved_config(os.path.join(sweep_dir, name)) is not None]
  if not rows:
    raise FileNotFoundError(f"no runs in {sweep_dir!r}: expected folders holding config.json (run "
                            "the sweep first: python scripts/sweep.py --config=... --workdir=...).")
  return [r for r in rows if r["finished"]] if finished_only else rows


def curves(sweep_dir: str, names: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Each run's training curve: (tokens, train loss) at every logged step (runs that logged)."""
  out = {}
  for name in names:
    if not os.path.exists(os.path.join(sweep_dir, name, "metrics.jsonl")):
      continue
    rows = {r["step"]: r for r in metrics_lib.read(os.path.join(sweep_dir, name))}
    steps = sorted(rows)
    out[name] = (np.array([rows[s]["tokens"] for s in steps], float),
                 np.array([rows[s].get("loss_avg", rows[s]["loss"]) for s in steps], float))
  return out


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> str:
  """Writes the rows as CSV (columns: the union of keys, in first-seen order)."""
  columns = list(dict.fromkeys(k for r in rows for k in r))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  return path


def _number(text: str) -> Any:
  if text in ("True", "False"):
    return text == "True"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def read_csv(path: str) -> list[dict[str, Any]]:
  """Reads a results CSV back, numbers and booleans as such."""
  with open(path, encoding="utf-8", newline="") as f:
    return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def column(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
  """One column as a float array."""
  return np.array([float(r[key]) for r in rows])


# ---- fits ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """L(N) = E + A / N^alpha."""
  E: float
  A: float
  alpha: float
  objective: float  # the minimised Huber loss (per point, in units of delta)

  def __call__(self, n):
    return self.E + self.A / np.asarray(n, float) ** self.alpha


@dataclasses.dataclass(frozen=True)
class ChinchillaFit:
  """L(N, D) = E + A / N^alpha + B / D^beta, and the compute-optimal frontier it implies."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  objective: float

  def __call__(self, n, d):
    return (self.E + self.A / np.asarray(n, float) ** self.alpha
            + self.B / np.asarray(d, float) ** self.beta)

  def compute_optimal(self, c) -> tuple[np.ndarray, np.ndarray]:
    """(N*, D*) minimising L under C = 6 N D (Hoffmann et al. 2022, eq. 4).

    N* = G (C/6)^(beta/(alpha+beta)), D* = (C/6)^(alpha/(alpha+beta)) / G, with
    G = (alpha A / (beta B))^(1/(alpha+beta)).
    """
    c = np.asarray(c, float)
    s = self.alpha + self.beta
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
    return g * (c / 6) ** (self.beta / s), (c / 6) ** (self.alpha / s) / g

  def frontier(self, c) -> np.ndarray:
    """The lowest loss reachable with compute C."""
    return self(*self.compute_optimal(c))


def _huber_objective(theta: np.ndarray, log_terms: np.ndarray, log_loss: np.ndarray,
                     delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Huber loss of log-residuals (in units of delta) and its gradient, for M parameter vectors.

  A parameter vector is (c_1..c_K, s_1..s_K, e) and predicts log L = LSE(c_k - s_k x_k, e) from the
  K features x_k of a point (log N, and log D). theta: [M, 2K+1]; log_terms: [K, P]; log_loss: [P].
  Returns the loss [M] and gradient [M, 2K+1]; dividing by delta keeps the gradient O(1).
  """
  k = log_terms.shape[0]
  c, s, e = theta[:, :k, None], theta[:, k:2 * k, None], theta[:, 2 * k, None]
  z = np.concatenate([c - s * log_terms[None], np.broadcast_to(e[:, None], (len(theta), 1,
                                                                           log_loss.size))], 1)
  top = z.max(1, keepdims=True)
  w = np.exp(z - top)
  total = w.sum(1, keepdims=True)
  pred, w = (top + np.log(total))[:, 0], w / total  # log-sum-exp [M, P]; d pred / d z
  r = pred - log_loss
  huber = np.where(np.abs(r) <= delta, 0.5 * r ** 2 / delta, np.abs(r) - 0.5 * delta).sum(1)
  g = np.clip(r / delta, -1.0, 1.0)[:, None]
  grad = np.concatenate([(w[:, :k] * g).sum(2), -(w[:, :k] * log_terms[None] * g).sum(2),
                         (w[:, k] * g[:, 0]).sum(1, keepdims=True)], 1)
  return huber, grad


def _huber_fit(log_terms: np.ndarray, log_loss: np.ndarray, inits: np.ndarray, delta: float,
               starts: int) -> tuple[np.ndarray, float]:
  """Scores every grid point, runs L-BFGS from the `starts` best; returns (theta, loss/point)."""
  screen = _huber_objective(inits, log_terms, log_loss, delta)[0]
  best = None
  # A 5-parameter problem: BLAS threads only contend (10x slower on a busy machine).
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    for theta0 in inits[np.argsort(screen)[:starts]]:
      res = optimize.minimize(
          lambda t: tuple(x[0] for x in _huber_objective(t[None], log_terms, log_loss, delta)),
          theta0, jac=True, method="L-BFGS-B",
          options={"maxiter": 5000, "ftol": 1e-12, "gtol": 1e-9})
      if best is None or res.fun < best.fun:
        best = res
  return best.x, float(best.fun) / log_loss.size


def _check_points(loss: np.ndarray, *xs: np.ndarray, need: int) -> None:
  if any(x.shape != loss.shape for x in xs) or loss.size < need:
    raise ValueError(f"a fit needs at least {need} runs with equal-length N (D) and loss arrays; "
                     f"got {loss.size} losses and shapes {[x.shape for x in xs]}.")
  if not (np.all(np.isfinite(loss)) and np.all(loss > 0) and all(np.all(x > 0) for x in xs)):
    raise ValueError("losses, parameter counts and token counts must be finite and positive; drop "
                     "runs without a final loss (collect(..., finished_only=True)).")


def fit_power_law(n: Sequence[float], loss: Sequence[float], delta: float = 1e-3,
                  grid: dict | None = None, starts: int = 8) -> PowerLawFit:
  """Fits L(N) = E + A / N^alpha to final losses (e.g. a size sweep at fixed tokens).

  Arguments as `fit_chinchilla` (the grid's 'b' and 'beta' are not used).
  """
  n, loss = np.asarray(n, float), np.asarray(loss, float)
  _check_points(loss, n, need=3)
  g = grid or CHINCHILLA_GRID
  inits = np.array([[a, al, e] for a, al, e in itertools.product(g["a"], g["alpha"], g["e"])])
  x, obj = _huber_fit(np.log(n)[None], np.log(loss), inits, delta, starts)
  return PowerLawFit(E=math.exp(x[2]), A=math.exp(x[0]), alpha=float(x[1]), objective=obj)


def fit_chinchilla(n: Sequence[float], d: Sequence[float], loss: Sequence[float],
                   delta: float = 1e-3, grid: dict | None = None, starts: int = 8) -> ChinchillaFit:
  """Fits L(N, D) = E + A / N^alpha + B / D^beta (Chinchilla approach 3).

  Args:
    n: parameters of each run.
    d: training tokens of each run.
    loss: final loss of each run (nats/token).
    delta: the Huber threshold on log-loss residuals (Chinchilla: 1e-3).
    grid: candidate starting values per parameter ('a', 'b', 'e', 'alpha', 'beta'); default
      `CHINCHILLA_GRID`, the paper's (5 x 5 x 6 x 6 x 6 points).
    starts: L-BFGS is run from this many grid points, those with the lowest loss.

  Returns:
    The best fit over all starts.
  """
  n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
  _check_points(loss, n, d, need=5)
  g = grid or CHINCHILLA_GRID
  inits = np.array([[a, b, al, be, e] for a, b, al, be, e in itertools.product(
      g["a"], g["b"], g["alpha"], g["beta"], g["e"])])
  x, obj = _huber_fit(np.log(np.stack([n, d])), np.log(loss), inits, delta, starts)
  return ChinchillaFit(E=math.exp(x[4]), A=math.exp(x[0]), B=math.exp(x[1]), alpha=float(x[2]),
                       beta=float(x[3]), objective=obj)


# ---- the plot -----------------------------------------------------------------------------------


def plot(rows: Sequence[dict[str, Any]], path: str, chinchilla: ChinchillaFit | None = None,
         power_law: PowerLawFit | None = None, run_curves: dict | None = None,
         n_key: str = "params", loss_key: str = "loss") -> str:
  """Loss against compute C = 6 N D, one colour per model size, with the fitted frontier.

  Args:
    rows: results (`collect` or `read_csv`).
    path: the PNG to write.
    chinchilla: draws its compute-optimal frontier L(N*(C), D*(C)).
    power_law: adds a panel of final loss against N with the fitted L(N).
    run_curves: `curves(...)` output, drawn as thin lines behind the final points.
    n_key, loss_key: the columns used for N and the loss.

  Returns:
    The path written.
  """
  try:
    from matplotlib import cm, colors  # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("scaling.plot needs matplotlib: pip install -e '.[notebooks]'") from e

  n, d, loss = column(rows, n_key), column(rows, "tokens"), column(rows, loss_key)
  norm = colors.LogNorm(n.min(), max(n.max(), n.min() * 1.01))
  fig = Figure(figsize=(11 if power_law else 6.5, 4.5), layout="constrained")
  ax = fig.add_subplot(1, 2 if power_law else 1, 1)
  labelled = False
  for r, ni in zip(rows, n):
    if run_curves and r["name"] in run_curves:
      tokens, curve = run_curves[r["name"]]
      ax.plot(6 * ni * tokens, curve, lw=0.8, alpha=0.5, color=cm.viridis(norm(ni)),
              label=None if labelled else "training loss during a run")
      labelled = True
  ax.scatter(6 * n * d, loss, c=n, cmap="viridis", norm=norm, edgecolors="k", zorder=3,
             label="final loss of a run")
  if chinchilla:
    c = np.geomspace((6 * n * d).min() / 3, (6 * n * d).max() * 3, 100)
    ax.plot(c, chinchilla.frontier(c), "r--", lw=1.5, label=(
        f"fit: E={chinchilla.E:.2f}, A={chinchilla.A:.3g}, B={chinchilla.B:.3g}, "
        f"α={chinchilla.alpha:.2f}, β={chinchilla.beta:.2f}"))
  ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel=f"{loss_key} (nats/token)",
         title="loss vs compute")
  ax.legend(fontsize=8)
  fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=f"N ({n_key})")
  if power_law:
    ax2 = fig.add_subplot(1, 2, 2)
    grid = np.geomspace(n.min() / 2, n.max() * 2, 100)
    ax2.scatter(n, loss, c=n, cmap="viridis", norm=norm, edgecolors="k", zorder=3)
    ax2.plot(grid, power_law(grid), "r--", label=(
        f"L(N) = {power_law.E:.2f} + {power_law.A:.3g} / N^{power_law.alpha:.3f}"))
    ax2.set(xscale="log", xlabel=f"N ({n_key})", ylabel=f"{loss_key} (nats/token)",
            title="final loss vs parameters")
    ax2.legend(fontsize=8)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  return path
