"""Experiment trackers: W&B (offline) and MLflow (a local file store) get the config and every
metrics row at the steps metrics.jsonl has; a failing tracker warns once and training finishes;
sweeps group their runs; bad settings are refused before compiling."""

import glob
import json
import os
import subprocess
import sys

import jax
import pytest

from gptjax import config as config_lib, loop, metrics, sweep, sweep_run
from gptjax.errors import ConfigError
from test_loop import corpus_cfg

pytest.importorskip("wandb", reason="the track extra is part of the dev install")
pytest.importorskip("mlflow", reason="the track extra is part of the dev install")
from helpers import wandb_offline  # noqa: E402  (needs wandb)
from mlflow.tracking import MlflowClient  # noqa: E402


def tracked_cfg(tmp_path, **train):
  c = corpus_cfg(tmp_path, steps=6)
  settings = {"trackers": "tensorboard,wandb,mlflow", "wandb_mode": "offline",
              "mlflow_uri": f"file://{tmp_path / 'mlruns'}", "run_group": "grp", **train}
  c.train.update(log_every=2, eval_every=3, sample_tokens=0, **settings)
  return c


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_PROJECT", raising=False)
  monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the tests' reads of the file store


def test_wandb_and_mlflow_hold_the_config_and_every_row_of_metrics_jsonl(tmp_path, quiet_wandb):
  workdir = str(tmp_path / "run")
  loop.run(tracked_cfg(tmp_path), workdir, devices=jax.devices()[:1])
  rows = {r["step"]: r for r in metrics.read(workdir)}
  assert sorted(rows) == [2, 3, 4, 6]

  (path,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
  run, config, history = wandb_offline.read(path)
  assert run.display_name == "run" and run.run_group == "grp" and run.project == "gptjax"
  assert config["model"]["d_model"] == 64 and config["train"]["steps"] == 6
  assert sorted(history) == sorted(rows)
  for step, row in rows.items():
    assert history[step]["loss"] == row["loss"] and history[step]["tokens"] == row["tokens"]
  assert history[3]["val_loss"] == rows[3]["val_loss"]

  client = MlflowClient(f"file://{tmp_path / 'mlruns'}")
  (ml_run,) = client.search_runs([client.get_experiment_by_name("grp").experiment_id])
  assert ml_run.info.run_name == "run"
  assert ml_run.data.params["model.d_model"] == "64"
  assert ml_run.data.params["train.trackers"] == "tensorboard,wandb,mlflow"
  for key in ("loss", "tokens", "val_loss"):
    got = {m.step: m.value for m in client.get_metric_history(ml_run.info.run_id, key)}
    assert got == {s: r[key] for s, r in rows.items() if r.get(key) is not None}, key
  assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path, quiet_wandb):
  workdir = str(tmp_path / "run")
  loop.run(tracked_cfg(tmp_path, trackers="mlflow"), workdir, devices=jax.devices()[:1])
  c = tracked_cfg(tmp_path, trackers="mlflow")
  c.train.steps = 8
  loop.run(c, workdir, devices=jax.devices()[:1])
  client = MlflowClient(f"file://{tmp_path / 'mlruns'}")
  (ml_run,) = client.search_runs([client.get_experiment_by_name("grp").experiment_id])
  steps = [m.step for m in client.get_metric_history(ml_run.info.run_id, "loss")]
  assert sorted(steps) == [2, 3, 4, 6, 8]


@pytest.mark.slow
def test_a_failing_tracker_warns_once_and_training_finishes(tmp_path, quiet_wandb, capsys):
  blocker = tmp_path / "not_a_folder"
  blocker.write_text("a file where the MLflow store should be")
  c = tracked_cfg(tmp_path, trackers="mlflow,tensorboard", mlflow_uri=f"file://{blocker}/x")
  summary = loop.run(c, str(tmp_path / "run"), devices=jax.devices()[:1])
  out = capsys.readouterr().out
  assert out.count("WARNING: tracker mlflow failed") == 1
  assert summary["steps"] == 6 and len(metrics.read(str(tmp_path / "run"))) == 4


@pytest.mark.parametrize("settings, message", [
    ({"trackers": "tensorboard,neptune"}, r"train.trackers: unknown tracker 'neptune'"),
    ({"trackers": "mlflow", "mlflow_uri": ""}, r"train.mlflow_uri: is empty and "
                                               "MLFLOW_TRACKING_URI is not set"),
])
def test_bad_tracker_settings_are_refused_before_compiling(tmp_path, monkeypatch, settings,
                                                           message):
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
  c = tracked_cfg(tmp_path, **settings)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(c, n_devices=1)


def test_a_sweep_groups_its_runs_and_names_each_after_its_overrides(tmp_path):
  path = tmp_path / "lrs.py"
  path.write_text("from configs import tiny\nfrom gptjax import sweep as sweep_lib\n\n\n"
                  "def get_config():\n  return tiny.get_config()\n\n\n"
                  "def sweep():\n  return sweep_lib.grid({'optim.peak_lr': [1e-3, 3e-3]})\n")
  sw = sweep.expand(str(path), n_devices=1)
  assert [(r.config.train.run_name, r.config.train.run_group) for r in sw.runs] == [
      ("peak_lr=1e-3", "lrs"), ("peak_lr=3e-3", "lrs")]
  argv = sweep_run.command(sw, sw.runs[1], "out")
  assert "--config.train.run_name=peak_lr=3e-3" in argv and "--config.train.run_group=lrs" in argv


@pytest.mark.slow
def test_fit_scaling_attaches_its_files_to_the_sweeps_group(tmp_path):
  from test_scaling import REPO, fake_sweep  # pylint: disable=import-outside-toplevel

  root, uri = fake_sweep(tmp_path), f"file://{tmp_path / 'mlruns'}"
  for config in root.glob("*/config.json"):
    c = json.loads(config.read_text())
    c["train"].update(trackers="tensorboard,mlflow", mlflow_uri=uri, run_group="fake")
    config.write_text(json.dumps(c))
  proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "fit_scaling.py"),
                         f"--sweep_dir={root}"], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "to mlflow (run fake-fit, group fake)" in proc.stdout
  client = MlflowClient(uri)
  (run,) = client.search_runs([client.get_experiment_by_name("fake").experiment_id])
  assert run.info.run_name == "fake-fit"
  assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
      "fit.json", "results.csv", "scaling.png"]
  stored = client.download_artifacts(run.info.run_id, "fit.json", str(tmp_path / "dl"))
  assert json.load(open(stored)) == json.load(open(root / "fit.json"))
