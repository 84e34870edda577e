"""A run killed with SIGKILL and started again continues exactly as if it had never stopped."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from test_checkpoint import latest_params, losses_by_step
from test_loop import corpus_cfg

DRIVER = """
import sys, jax
sys.path.insert(0, {tests!r})
from test_kill_resume import kill_cfg
from gptjax import loop
loop.run(kill_cfg({tmp!r}), sys.argv[1], devices=jax.devices()[:1])
"""


def kill_cfg(tmp):
  import pathlib  # pylint: disable=import-outside-toplevel
  c = corpus_cfg(pathlib.Path(tmp), steps=40)
  c.train.update(log_every=4, eval_every=0, sample_tokens=0)
  c.checkpoint.update(save_every=3, keep=20, async_save=True)
  return c


def start(tmp_path, workdir):
  code = DRIVER.format(tests=os.path.dirname(__file__), tmp=str(tmp_path))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.Popen([sys.executable, "-c", code, workdir], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path):
  straight = str(tmp_path / "straight")
  assert start(tmp_path, straight).wait(timeout=600) == 0

  killed = str(tmp_path / "killed")
  proc = start(tmp_path, killed)
  target = os.path.join(killed, "checkpoints", "9")  # m = 9: not a multiple of log_every = 4
  deadline = time.time() + 600
  while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert os.path.isdir(target), proc.communicate()[0]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_saved = sorted(int(s) for s in os.listdir(os.path.join(killed, "checkpoints")) if s.isdigit())
  assert steps_saved[-1] < 40, "the run finished before it could be killed"

  resumed = start(tmp_path, killed)
  out = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0, out
  assert "resuming from the checkpoint at step" in out

  a, b = losses_by_step(straight), losses_by_step(killed)
  after = [s for s in a if s > steps_saved[-1]]
  assert after and all(a[s] == b[s] for s in after), (a, b)  # identical, bit for bit
  p1, m1 = latest_params(kill_cfg(tmp_path), straight)
  p2, m2 = latest_params(kill_cfg(tmp_path), killed)
  assert m1["step"] == m2["step"] == 40
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  proc = start(tmp_path, workdir)
  first = os.path.join(workdir, "checkpoints", "3")
  deadline = time.time() + 600
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out
  assert "received SIGTERM" in out and "checkpoint saved" in out
  stopped = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert 3 <= stopped < 40 and f"stopped at step {stopped}" in out
  resumed = start(tmp_path, workdir)
  out = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0 and f"resuming from the checkpoint at step {stopped}" in out
