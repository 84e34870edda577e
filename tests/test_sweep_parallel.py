"""`scripts/sweep.py --parallel`: runs at once on disjoint device subsets, as real concurrent
processes on CPU; each sees only its devices; finished runs are skipped on a second pass."""

import pytest

from gptjax import sweep, sweep_parallel
from gptjax.errors import ConfigError
from test_sweep import tiny_sweep


@pytest.mark.slow
def test_two_runs_train_at_once_each_on_its_own_device(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  slots = sweep_parallel.slots(2, "cpu")
  assert [s.n_devices for s in slots] == [1, 1]
  sw = sweep.expand(tiny_sweep(tmp_path), n_devices=1, backend="cpu")
  workdir, lines = str(tmp_path / "runs"), []
  outcome = sweep_parallel.run_parallel(sw, workdir, slots, log=lines.append)
  assert outcome == {r.name: "trained" for r in sw.runs}
  # both started before either finished: they ran at the same time, one per slot
  assert [("starting" in l, "finished" in l) for l in lines] == [(True, False)] * 2 + [
      (False, True)] * 2, lines
  assert {l.split(" on ")[-1].split(" (")[0] for l in lines[:2]} == {"CPU slot 0", "CPU slot 1"}
  for run in sw.runs:
    log = open(tmp_path / "runs" / "logs" / f"{run.name}.log", encoding="utf-8").read()
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in log, log  # one device each
  assert sweep_parallel.run_parallel(sw, workdir, slots, log=lines.append) == {
      r.name: "skipped" for r in sw.runs}


def test_device_groups_split_evenly_or_say_why(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
  assert [s.env for s in sweep_parallel.slots(2, "gpu")] == [
      {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
  with pytest.raises(ConfigError, match=r"--parallel=3: the 4 GPUs \(0, 1, 2, 3\) do not split"):
    sweep_parallel.slots(3, "gpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/x")
  slot = sweep_parallel.slots(4, "cpu")[0]
  assert slot.env["XLA_FLAGS"] == "--xla_dump_to=/x --xla_force_host_platform_device_count=2"
  with pytest.raises(ConfigError, match="TPU chips"):
    sweep_parallel.slots(2, "tpu")
