"""Real multi-process runs: 2 processes x 2 CPU devices on localhost (JAX's distributed runtime,
gloo collectives) train, checkpoint and resume exactly like 1 process x 4 devices.

Each run is `scripts/train.py` started as a separate OS process per JAX process, as on a cluster.
"""

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


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def flags_for(tmp_path, mesh: dict[str, int]) -> list[str]:
  """scripts/train.py flags for test_loop's small corpus config (tokenizer trained once, cached)."""
  cfg = corpus_cfg(tmp_path, steps=STEPS)
  tokenizer_lib.load_or_train(cfg.data)  # every process then loads the same cached tokenizer
  d, m, t = cfg.data, cfg.model, cfg.train
  out = [f"--config={ROOT}/configs/tiny.py", f"--config.data.source={d.source}",
         f"--config.data.paths={d.paths}", f"--config.data.val_fraction={d.val_fraction}",
         f"--config.data.cache_dir={d.cache_dir}",
         f"--config.data.tokenizer.vocab_size={d.tokenizer.vocab_size}",
         f"--config.model.n_layers={m.n_layers}", f"--config.model.d_model={m.d_model}",
         f"--config.model.n_heads={m.n_heads}", f"--config.model.ctx={m.ctx}",
         f"--config.train.global_batch={t.global_batch}", f"--config.train.steps={STEPS}",
         "--config.train.log_every=1", "--config.train.eval_every=3", "--config.train.eval_batches=2",
         "--config.train.sample_tokens=0", "--config.train.progress=False",
         "--config.optim.warmup_steps=2", "--config.optim.peak_lr=3e-3",
         "--config.checkpoint.save_every=3"]
  out += [f"--config.mesh.{axis}={size}" for axis, size in mesh.items()]
  return out


def train(workdir, flags: list[str], processes: int, devices_per_process: int) -> None:
  """Runs scripts/train.py as `processes` cooperating OS processes; fails with their output."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--workdir={workdir}", *flags]
  if processes > 1:
    port = free_port()
    cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
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


def losses(workdir) -> dict[int, tuple[float, float | None]]:
  return {r["step"]: (r["loss"], r.get("val_loss")) for r in metrics.read(str(workdir))}


def assert_same_losses(got: dict, want: dict, steps) -> None:
  for s in steps:
    np.testing.assert_allclose(got[s][0], want[s][0], rtol=RTOL, err_msg=f"train loss, step {s}")
    if want[s][1] is not None:
      np.testing.assert_allclose(got[s][1], want[s][1], rtol=RTOL, err_msg=f"val loss, step {s}")


@pytest.mark.parametrize("mesh", [{"data": 1, "fsdp": 4}, {"data": 2, "tensor": 2}],
                         ids=["fsdp4", "dp2xtp2"])
def test_two_processes_train_and_resume_like_one(tmp_path, mesh):
  flags = flags_for(tmp_path, mesh)
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  train(one, flags, processes=1, devices_per_process=4)
  train(two, flags, processes=2, devices_per_process=2)
  want = losses(one)
  assert sorted(want) == list(range(1, STEPS + 1))
  assert_same_losses(losses(two), want, range(1, STEPS + 1))

  # The checkpoint two processes wrote at step 3 resumes in one process, at the same data position.
  resumed = tmp_path / "resumed_in_one_process"
  shutil.copytree(two, resumed)
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))
  os.remove(resumed / "metrics.jsonl")
  train(resumed, flags, processes=1, devices_per_process=4)
  got = losses(resumed)
  assert sorted(got) == list(range(4, STEPS + 1))  # started from step 3's checkpoint
  assert_same_losses(got, want, range(4, STEPS + 1))
