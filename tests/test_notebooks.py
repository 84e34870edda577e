"""Every notebook runs top to bottom in a fresh kernel of this interpreter, in reduced mode."""

import os
import sys
import time

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from gptjax import metrics, scaling

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
KERNEL = "gptjax-test"


def execute(name: str, tmp_path, monkeypatch, timeout: int = 600) -> nbformat.NotebookNode:
  """Runs notebooks/<name> in reduced mode, its runs under tmp_path; returns it executed."""
  monkeypatch.setenv("GPTJAX_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("GPTJAX_NOTEBOOK_RUNS", str(tmp_path / "runs"))
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device unless the notebook asks for more
  # A kernel spec naming this interpreter, so the notebook imports the gptjax under test.
  write_kernel_spec(tmp_path / "kernels" / KERNEL, overrides={"display_name": KERNEL})
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  assert specs.get_kernel_spec(KERNEL).argv[0] == sys.executable
  with open(os.path.join(NOTEBOOKS, name), encoding="utf-8") as f:
    nb = nbformat.read(f, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      f"{name} is committed with outputs; clear them (Cell > All Output > Clear) before saving"
  km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
  start = time.perf_counter()
  NotebookClient(nb, km=km, timeout=timeout,
                 resources={"metadata": {"path": NOTEBOOKS}}).execute()
  print(f"{name}: {time.perf_counter() - start:.1f}s")
  return nb


def text_of(nb: nbformat.NotebookNode) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      out.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
  return "".join(out)


def test_quickstart_trains_plots_and_samples(tmp_path, monkeypatch):
  nb = execute("01_quickstart.ipynb", tmp_path, monkeypatch)
  rows = metrics.read(str(tmp_path / "runs" / "quickstart-fast"))
  assert rows[-1]["step"] == 60 and rows[-1]["loss_avg"] < rows[0]["loss_avg"] - 0.5
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
  assert (tmp_path / "runs" / "quickstart-fast" / "samples.txt").read_text().strip()


@pytest.mark.slow  # 40 s; the slow CI step runs it
def test_sharding_notebook_shows_layouts_and_equal_losses(tmp_path, monkeypatch):
  nb = execute("02_sharding.ipynb", tmp_path, monkeypatch)
  text = text_of(nb)
  assert "all layouts agree to 1e-5" in text
  for spec in ("('tensor', 'fsdp')", "('fsdp', None, 'tensor', None)", "(('data', 'fsdp'), None)"):
    assert spec in text, spec
  assert "CPU 7" in text  # the pictures name the devices


@pytest.mark.slow  # 60 s; the slow CI step runs it
def test_scaling_notebook_runs_a_size_sweep_and_fits_it(tmp_path, monkeypatch):
  nb = execute("03_scaling_laws.ipynb", tmp_path, monkeypatch)
  workdir = tmp_path / "runs" / "model_size-smoke"
  rows = scaling.read_csv(str(workdir / "results.csv"))
  assert len(rows) == 4 and all(r["finished"] for r in rows)
  assert (workdir / "scaling.png").stat().st_size > 10_000
  assert "L(N) = " in text_of(nb)


@pytest.mark.slow  # about a minute; the slow CI step runs it
def test_mup_notebook_shows_the_coordinate_check_and_transfer(tmp_path, monkeypatch):
  nb = execute("04_mup.ipynb", tmp_path, monkeypatch)
  text = text_of(nb)
  assert "µP: block_1 after the last step" in text and "| µP | 64 |" in text
  assert (tmp_path / "runs" / "coord_check.png").stat().st_size > 10_000
  assert (tmp_path / "runs" / "mup_transfer-smoke" / "transfer.png").stat().st_size > 10_000
