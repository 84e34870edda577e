"""Experiment trackers: where a run's metrics go besides `metrics.jsonl`.

`train.trackers` names any of 'tensorboard' (the default), 'wandb' and 'mlflow', comma-separated;
'' logs to metrics.jsonl alone. Each tracker gets:
- the resolved config as the run's parameters (W&B config; MLflow params, flattened to dotted keys);
- every metrics row at its optimizer step, with `tokens` as a metric, so either is an x-axis;
- a run name (`train.run_name`, default the workdir's name) and group (`train.run_group`: a sweep
  puts all its runs in one group named after it; the W&B group, the MLflow experiment).

A resumed run continues the same W&B and MLflow run (their ids are kept in
`<workdir>/trackers.json`). A tracker that fails (no login, no network, a full disk) warns once and
is dropped: training never stops for one. A tracker whose package is missing is refused at start
(`check`), before compiling.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from typing import Any, Protocol

from absl import logging
import ml_collections

from gptjax.errors import ConfigError

KNOWN = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}
STATE = "trackers.json"  # in the workdir: the W&B and MLflow run ids, so a resume continues them


class Tracker(Protocol):
  name: str

  def log(self, step: int, row: dict[str, float]) -> None: ...
  def artifact(self, path: str) -> None: ...
  def close(self) -> None: ...


def names(setting: str) -> list[str]:
  return [n.strip().lower() for n in str(setting).split(",") if n.strip()]


def check(t) -> None:
  """Refuses unknown tracker names and trackers whose package is not installed."""
  for name in names(t.trackers):
    if name not in KNOWN:
      raise ConfigError(f"config.train.trackers: unknown tracker {name!r}. Use any of "
                        f"{', '.join(KNOWN)}, comma-separated ('' = metrics.jsonl only).")
    if importlib.util.find_spec(KNOWN[name]) is None:
      raise ConfigError(f"config.train.trackers: {name!r} needs the {KNOWN[name]} package, which "
                        "is not installed. pip install 'gptjax[track]', or drop it from "
                        "train.trackers.")
  if "mlflow" in names(t.trackers) and not (t.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")):
    raise ConfigError("config.train.mlflow_uri: is empty and MLFLOW_TRACKING_URI is not set, so "
                      "MLflow has nowhere to log. Set one (an http:// server, sqlite:///x.db or "
                      "file:///path).")


class TensorBoard:
  name = "tensorboard"

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def log(self, step: int, row: dict[str, float]) -> None:
    for k, v in row.items():
      self._tb.add_scalar(k, v, step)

  def artifact(self, path: str) -> None:
    del path  # TensorBoard keeps scalars only

  def close(self) -> None:
    self._tb.close()


class WandB:
  """Weights & Biases: `train.wandb_project` / `wandb_entity` (else WANDB_PROJECT / WANDB_ENTITY,
  else project 'gptjax'), `train.wandb_mode` ('' = W&B's own default or WANDB_MODE; 'offline'
  writes `<workdir>/wandb/` for a later `wandb sync`)."""
  name = "wandb"

  def __init__(self, t, workdir: str, config: dict[str, Any], run_name: str, group: str,
               state: dict[str, str]):
    import wandb  # pylint: disable=import-outside-toplevel
    state.setdefault("wandb_id", uuid.uuid4().hex[:12])  # W&B run ids: letters and digits
    self._run = wandb.init(
        project=t.wandb_project or os.environ.get("WANDB_PROJECT") or "gptjax",
        entity=t.wandb_entity or None, name=run_name, group=group or None, config=config,
        dir=workdir, id=state["wandb_id"], resume="allow", mode=t.wandb_mode or None,
        reinit="create_new")
    self._run.define_metric("tokens")  # selectable as the x-axis beside the step

  def log(self, step: int, row: dict[str, float]) -> None:
    self._run.log(row, step=step)

  def artifact(self, path: str) -> None:
    self._run.save(path, base_path=os.path.dirname(path), policy="now")

  def close(self) -> None:
    self._run.finish()


class MLflow:
  """MLflow: `train.mlflow_uri` (else MLFLOW_TRACKING_URI); the experiment is the run group (else
  `train.mlflow_experiment`). A `file:` store is allowed explicitly (MLflow 3 otherwise refuses
  it and asks for a database)."""
  name = "mlflow"

  def __init__(self, t, config: dict[str, Any], run_name: str, group: str,
               state: dict[str, str]):
    uri = t.mlflow_uri or os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("file:") or "://" not in uri:
      os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel
    self._client = MlflowClient(tracking_uri=uri)
    if "mlflow_run_id" not in state:
      experiment = group or t.mlflow_experiment or "gptjax"
      found = self._client.get_experiment_by_name(experiment)
      eid = found.experiment_id if found else self._client.create_experiment(experiment)
      state["mlflow_run_id"] = self._client.create_run(eid, run_name=run_name).info.run_id
      params = _flatten(config)
      from mlflow.entities import Param  # pylint: disable=import-outside-toplevel
      items = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()]
      for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        self._client.log_batch(state["mlflow_run_id"], params=items[i:i + 100])
    self._id = state["mlflow_run_id"]

  def log(self, step: int, row: dict[str, float]) -> None:
    from mlflow.entities import Metric  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel
    now = int(time.time() * 1000)
    self._client.log_batch(self._id, metrics=[Metric(k, v, now, step) for k, v in row.items()])

  def artifact(self, path: str) -> None:
    self._client.log_artifact(self._id, path)

  def close(self) -> None:
    self._client.set_terminated(self._id)


class _Guarded:
  """A tracker whose failures warn once and drop it."""

  def __init__(self, tracker: Tracker):
    self.name, self._tracker, self.failed = tracker.name, tracker, False

  def _call(self, what: str, *args) -> None:
    if self._tracker is None:
      return
    try:
      getattr(self._tracker, what)(*args)
    except Exception as e:  # pylint: disable=broad-except  (a tracker never stops training)
      _warn(self.name, e)
      self._tracker, self.failed = None, True

  def log(self, step: int, row: dict[str, float]) -> None:
    self._call("log", step, row)

  def artifact(self, path: str) -> None:
    self._call("artifact", path)

  def close(self) -> None:
    self._call("close")
    self._tracker = None


def _warn(name: str, error: BaseException) -> None:
  logging.warning("tracker %s failed: %r", name, error)
  print(f"gptjax: WARNING: tracker {name} failed ({type(error).__name__}: {error}); training goes "
        "on without it (metrics.jsonl has every row)", flush=True)


def open_all(t, workdir: str, config: dict[str, Any] | None = None) -> list[Tracker]:
  """The trackers `train.trackers` names, started for the run in `workdir` (process 0 only: call
  it there). One that fails to start warns and is left out."""
  config = config or {}
  run_name = t.run_name or os.path.basename(os.path.normpath(workdir))
  state_path = os.path.join(workdir, STATE)
  state = {}
  if os.path.isfile(state_path):
    with open(state_path, encoding="utf-8") as f:
      state = json.load(f)
  out = []
  for name in names(t.trackers):
    try:
      if name == "tensorboard":
        tracker = TensorBoard(workdir)
      elif name == "wandb":
        tracker = WandB(t, workdir, config, run_name, t.run_group, state)
      else:
        tracker = MLflow(t, config, run_name, t.run_group, state)
    except Exception as e:  # pylint: disable=broad-except
      _warn(name, e)
      continue
    out.append(_Guarded(tracker))
  if state:
    os.makedirs(workdir, exist_ok=True)
    with open(state_path, "w", encoding="utf-8") as f:
      json.dump(state, f)
  return out


def attach(t, folder: str, paths: list[str], run_name: str,
           summary: dict[str, Any] | None = None) -> list[str]:
  """Attaches files (a sweep's fit.json, results.csv, scaling.png) to a tracked run `run_name` in
  the group `t.run_group`, for each tracker of `t.trackers` (a `train` config section) that keeps
  files: W&B and MLflow. Returns the names of the trackers that took them."""
  t = ml_collections.ConfigDict(t.to_dict() if hasattr(t, "to_dict") else dict(t))
  t.trackers = ",".join(n for n in names(t.trackers) if n != "tensorboard")
  t.run_name = run_name
  opened = open_all(t, folder, summary or {})
  for tracker in opened:
    for path in paths:
      tracker.artifact(path)
    tracker.close()
  return [tracker.name for tracker in opened if not tracker.failed]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out
