"""Spec of gptjax.cli: every script ends a configuration or data error with its message alone (one
line on stderr, status 2, no traceback); other exceptions and absl's usage errors are unchanged.

Each bad input below fails before anything compiles (JAX_PLATFORMS=cpu, a few seconds each).
"""

import os
import pathlib
import subprocess
import sys

import pytest

from gptjax import cli

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "scripts").rglob("*.py"))


def _run(args: list[str], cwd=REPO) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                        env=env, check=False, timeout=300)


def _assert_clean_error(proc: subprocess.CompletedProcess, *names: str) -> None:
  out = proc.stdout + proc.stderr
  assert "Traceback" not in out, out[-3000:]
  assert proc.returncode == cli.EXIT_STATUS, out[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  for name in names:
    assert name in lines[0], lines[0]


def test_every_script_starts_through_cli_run():
  mains = [p for p in SCRIPTS if '__name__ == "__main__"' in p.read_text()]
  assert len(mains) >= 18, mains  # train, finetune, evaluate, sample, ..., launch/render
  for path in mains:
    text = path.read_text()
    assert "cli.run(main" in text and "app.run(" not in text, path


def test_train_config_error(tmp_path):
  proc = _run(["scripts/train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
               "--config.optim.peak_lr=-1"])
  _assert_clean_error(proc, "config.optim.peak_lr", "must be > 0")
  assert not (tmp_path / "run").exists()


def test_train_distributed_error(tmp_path):
  proc = _run(["scripts/train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
               "--num_processes=2"])
  _assert_clean_error(proc, "coordinator_address", "process_id")


def test_prepare_data_data_error(tmp_path):
  proc = _run(["scripts/prepare_data.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
               "--config.data.tokenizer.kind=gpt2_bpe", f"--config.data.tokenizer.path={tmp_path}"])
  _assert_clean_error(proc, "config.data.tokenizer.path", "vocab.json")


def test_evaluate_on_a_folder_that_is_not_a_run(tmp_path):
  proc = _run(["scripts/evaluate.py", f"--workdir={tmp_path}", "--val_docs=1"])
  _assert_clean_error(proc, "--workdir", "config.json")


@pytest.mark.parametrize("script", ["sample.py", "inspect_checkpoint.py"])
def test_readers_on_a_missing_workdir(tmp_path, script):
  proc = _run([f"scripts/{script}", f"--workdir={tmp_path / 'missing'}"])
  _assert_clean_error(proc, str(tmp_path / "missing"))


def test_convert_refuses_a_used_out_folder_with_status_2(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "file").write_text("x")
  proc = _run(["scripts/convert.py", "from_hf", f"--hf_dir={tmp_path}",
               f"--out={tmp_path / 'out'}"])
  _assert_clean_error(proc, "--out=", "not an empty folder")


def test_plan_mesh_error():
  proc = _run(["scripts/plan.py", "--config=configs/tiny.py", "--mesh=rows:2", "--nocompile"])
  _assert_clean_error(proc, "--mesh", "axis:size")


def test_sweep_error(tmp_path):
  path = tmp_path / "bad_sweep.py"
  path.write_text("from configs import tiny\n\n\ndef get_config():\n  return tiny.get_config()\n"
                  "\n\ndef sweep():\n  return [{'optim.peak_rl': 1e-3}]\n")
  proc = _run(["scripts/sweep.py", f"--config={path}", f"--workdir={tmp_path / 'runs'}"])
  _assert_clean_error(proc, "optim.peak_rl")


@pytest.fixture
def tiny_main(tmp_path):
  """Writes a script whose main raises `raise_expr`; returns its path."""

  def write(raise_expr: str) -> pathlib.Path:
    path = tmp_path / "main.py"
    path.write_text("from absl import app\nfrom gptjax import cli\n\n\n"
                    f"def main(argv):\n  raise {raise_expr}\n\n\ncli.run(main)\n")
    return path

  return write


def test_other_exceptions_keep_their_traceback(tiny_main):
  proc = _run([tiny_main("KeyError('not a project error')")])
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  assert "KeyError: 'not a project error'" in proc.stderr


def test_absl_usage_errors_are_left_to_absl(tiny_main):
  proc = _run([tiny_main("app.UsageError('give --x')")])
  assert proc.returncode == 1 and "give --x" in proc.stderr and "Traceback" not in proc.stderr
  proc = _run([tiny_main("SystemExit(0)"), "--no_such_flag=1"])
  assert proc.returncode == 1 and "no_such_flag" in proc.stderr
