"""Real multi-process runs on localhost (JAX's distributed runtime, gloo collectives): every mesh
trains, evaluates and fine-tunes like one process with the same mesh, whichever mesh axes span the
processes, and resumes with every process on the same checkpoint.

Each run is a script (`scripts/train.py`, `evaluate.py`, `finetune.py`) started as one OS process
per JAX process, as on a cluster.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from gptjax import metrics
from gptjax.data import tokenizer as tokenizer_lib
from test_loop import corpus_cfg

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
RTOL = 1e-5  # float32; only the order of cross-device sums differs
SPAN = "tensor,data,fsdp"  # mesh.order that lays the tensor axis across the processes


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def flags_for(tmp_path, mesh: dict) -> list[str]:
  """scripts/train.py flags for test_loop's small corpus config (tokenizer trained once, cached)."""
  cfg = corpus_cfg(tmp_path, steps=STEPS)
  tokenizer_lib.load_or_train(cfg.data)  # every process then loads the same cached tokenizer
  d, m, t = cfg.data, cfg.model, cfg.train
  out = [f"--config={ROOT}/configs/tiny.py", f"--config.data.source={d.source}",
         f"--config.data.paths={d.paths}", f"--config.data.val_fraction={d.val_fraction}",
         f"--config.data.cache_dir={d.cache_dir}",
         f"--config.data.tokenizer.vocab_size={d.tokenizer.vocab_size}",
         f"--config.model.n_layers={m.n_layers}", f"--config.model.d_model={m.d_model}",
         "--config.model.n_heads=4", f"--config.model.ctx={m.ctx}",
         f"--config.train.global_batch={t.global_batch}", f"--config.train.steps={STEPS}",
         "--config.train.log_every=1", "--config.train.eval_every=3",
         "--config.train.eval_batches=2", "--config.train.sample_tokens=0",
         "--config.train.progress=False",
         "--config.optim.warmup_steps=2", "--config.optim.peak_lr=3e-3",
         "--config.checkpoint.save_every=3"]
  return out + mesh_flags(mesh)


def mesh_flags(mesh: dict) -> list[str]:
  return [f"--config.mesh.{axis}={size}" for axis, size in {"data": 1, **mesh}.items()]


def launch(script: str, args: list[str], processes: int, devices_per_process: int) -> list[str]:
  """Runs scripts/<script> as `processes` cooperating OS processes; returns their outputs."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  cmd = [sys.executable, os.path.join(ROOT, "scripts", script), *args]
  if processes > 1:
    cmd += [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}",
            "--distributed_timeout_s=120"]
  procs = [subprocess.Popen(cmd + ([f"--process_id={i}"] if processes > 1 else []), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(processes)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} of {processes} failed:\n{outputs[i][-4000:]}"
  return outputs


def train(workdir, flags: list[str], processes: int, devices_per_process: int) -> list[str]:
  return launch("train.py", [f"--workdir={workdir}", *flags], processes, devices_per_process)


def losses(workdir) -> dict[int, tuple[float, float | None]]:
  return {r["step"]: (r["loss"], r.get("val_loss")) for r in metrics.read(str(workdir))}


def max_rel_diff(got: dict, want: dict, steps) -> float:
  """The largest relative difference of the train and validation losses over `steps`."""
  diffs = [0.0]
  for s in steps:
    for a, b in zip(got[s], want[s]):
      if b is not None:
        diffs.append(abs(a - b) / abs(b))
  return max(diffs)


def assert_same_losses(got: dict, want: dict, steps) -> None:
  assert sorted(got) == list(steps) and set(steps) <= set(want), (sorted(got), sorted(want))
  for s in steps:
    np.testing.assert_allclose(got[s][0], want[s][0], rtol=RTOL, err_msg=f"train loss, step {s}")
    if want[s][1] is not None:
      np.testing.assert_allclose(got[s][1], want[s][1], rtol=RTOL, err_msg=f"val loss, step {s}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One corpus and tokenizer for the module, so that every run reads the same token stream."""
  return tmp_path_factory.mktemp("corpus")


_REFERENCES: dict[int, dict] = {}


def reference(data_dir, n_devices: int) -> dict:
  """The losses of one process training data-parallel over `n_devices` devices: every mesh of that
  many devices, in one process or several, must reproduce them (layouts only reorder sums)."""
  if n_devices not in _REFERENCES:
    workdir = data_dir / f"one_process_dp{n_devices}"
    train(workdir, flags_for(data_dir, {"data": n_devices}), processes=1,
          devices_per_process=n_devices)
    _REFERENCES[n_devices] = losses(workdir)
  return _REFERENCES[n_devices]


MATRIX = [  # (processes, devices per process, mesh)
    (2, 1, {"tensor": 2}), (2, 1, {"fsdp": 2}),
    (2, 2, {"tensor": 4}), (2, 2, {"fsdp": 2, "tensor": 2, "order": SPAN}),
    (2, 2, {"data": 2, "tensor": 2, "order": SPAN}),
]


@pytest.mark.parametrize("processes, per_process, mesh", MATRIX,
                         ids=["2x1-tp2", "2x1-fsdp2", "2x2-tp4", "2x2-fsdp2xtp2-span",
                              "2x2-dp2xtp2-span"])
def test_every_mesh_trains_across_processes_like_one_process(tmp_path, data_dir, processes,
                                                            per_process, mesh):
  flags = flags_for(data_dir, mesh)
  train(tmp_path / "two", flags, processes=processes, devices_per_process=per_process)
  want, got = reference(data_dir, processes * per_process), losses(tmp_path / "two")
  print(f"max relative loss difference {max_rel_diff(got, want, range(1, STEPS + 1)):.2e}")
  assert_same_losses(got, want, range(1, STEPS + 1))


@pytest.mark.parametrize("mesh", [{"fsdp": 4}, {"data": 2, "tensor": 2}], ids=["fsdp4", "dp2xtp2"])
def test_two_processes_train_and_resume_like_one(tmp_path, data_dir, mesh):
  flags = flags_for(data_dir, mesh)
  two = tmp_path / "two_processes"
  outputs = train(two, flags, processes=2, devices_per_process=2)
  want = reference(data_dir, 4)
  print(f"max relative loss difference {max_rel_diff(losses(two), want, range(1, STEPS + 1)):.2e}")
  assert_same_losses(losses(two), want, range(1, STEPS + 1))
  assert "resuming" not in "".join(outputs)

  # The checkpoint two processes wrote at step 3 resumes in one process, at the same data position.
  resumed = tmp_path / "resumed_in_one_process"
  shutil.copytree(two, resumed)
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))
  os.remove(resumed / "metrics.jsonl")
  train(resumed, flags, processes=1, devices_per_process=4)
  assert_same_losses(losses(resumed), want, range(4, STEPS + 1))

  # Two processes whose latest checkpoint is damaged both fall back to the same one (step 3).
  damaged = tmp_path / "damaged"
  shutil.copytree(two, damaged)
  os.remove(damaged / "metrics.jsonl")
  shutil.rmtree(damaged / "checkpoints" / str(STEPS) / "opt_state" / "d")  # incomplete
  outputs = train(damaged, [*flags, "--config.train.steps=6"], processes=2, devices_per_process=2)
  assert "checkpoint at step 6 is unreadable" in outputs[0]
  assert "resuming from the checkpoint at step 3" in outputs[0]
  assert_same_losses(losses(damaged), want, range(4, STEPS + 1))


def test_evaluation_and_fine_tuning_across_processes_with_tensor_spanning_them(tmp_path, data_dir):
  flags = flags_for(data_dir, {"tensor": 2})
  base = tmp_path / "base"
  train(base, flags, processes=1, devices_per_process=2)
  data = os.path.join(ROOT, "tests", "data")

  results = {}
  for n in (1, 2):  # the run's mesh (tensor=2) over 1 process x 2 devices, then 2 x 1
    workdir = tmp_path / f"eval_{n}"
    shutil.copytree(base, workdir)
    launch("evaluate.py", [f"--workdir={workdir}", "--val_docs=8",
                           f"--tasks=qa:{data}/mc.jsonl:mc,lam:{data}/lambada.jsonl:lambada"],
           processes=n, devices_per_process=2 // n)
    with open(workdir / "eval" / f"step_{STEPS}.json", encoding="utf-8") as f:
      results[n] = json.load(f)["tasks"]
  for task, values in results[1].items():
    for key, value in values.items():
      if isinstance(value, float):
        np.testing.assert_allclose(results[2][task][key], value, rtol=RTOL, err_msg=f"{task}.{key}")
      else:
        assert results[2][task][key] == value, (task, key)

  ft_flags = [f"--config={ROOT}/configs/finetune_gpt1.py:multiple_choice",
              f"--config.finetune.base={base}", f"--config.finetune.train_path={data}/mc.jsonl",
              f"--config.finetune.val_path={data}/mc.jsonl", "--config.finetune.delimiter=",
              "--config.finetune.epochs=0", "--config.finetune.warmup_fraction=0",
              "--config.train.steps=4", "--config.train.global_batch=8",
              "--config.train.log_every=1", "--config.train.progress=False",
              "--config.optim.warmup_steps=1",
              "--config.optim.peak_lr=1e-3", *mesh_flags({"tensor": 2})]
  tuned = {}
  for n in (1, 2):
    workdir = tmp_path / f"finetune_{n}"
    launch("finetune.py", [f"--workdir={workdir}", *ft_flags], processes=n,
           devices_per_process=2 // n)
    tuned[n] = {r["step"]: (r["loss"], r.get("val_loss")) for r in metrics.read(str(workdir))}
  assert_same_losses(tuned[2], tuned[1], range(1, 5))
