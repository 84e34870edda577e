"""A run killed with SIGKILL and started again continues exactly as if it had never stopped: same
losses, parameters and optimizer state, bit for bit, with dropout on and along a batch-size ramp."""

import itertools
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gptjax import checkpoint, metrics, optim, sharding
from gptjax.data import tokenizer as tokenizer_lib, training
from gptjax.train import Trainer
from test_checkpoint import latest_params, losses_by_step
from test_loop import corpus_cfg
import test_data_mixture

DRIVER = """
import sys, jax
sys.path.insert(0, {tests!r})
import test_kill_resume
from gptjax import loop, storage
if {hang!r} is not None:  # the marker sits beside the workdir (beside its local copy for a URL)
  where = storage.local_path(sys.argv[1]) if storage.is_url(sys.argv[1]) else sys.argv[1]
  test_kill_resume.hang_before_step({hang!r}, where + ".hung")
cfg = getattr(test_kill_resume, {make!r})({tmp!r}, **{options!r})
loop.run(cfg, sys.argv[1], devices=jax.devices()[:1])
"""


def kill_cfg(tmp):
  c = corpus_cfg(pathlib.Path(tmp), steps=40)
  c.train.update(log_every=4, eval_every=0, sample_tokens=0)
  c.checkpoint.update(save_every=3, keep=20, async_save=True)
  return c


def dropout_cfg(tmp, rate=0.1):
  """12 steps, every loss logged, a checkpoint every 4 steps; all three dropouts at `rate`."""
  c = corpus_cfg(pathlib.Path(tmp), steps=12)
  c.model.update(embd_dropout=rate, attn_dropout=rate, resid_dropout=rate)
  c.train.update(log_every=1, eval_every=0, sample_tokens=0)
  c.checkpoint.update(save_every=4, keep=5, async_save=True)
  return c


def ramp_cfg(tmp):
  """12 steps of at most 8 sequences of 64 tokens, the first 8 on a GPT-3 batch ramp.

  The micro-batch (0) resolves to the ramp's start, 128 tokens = 2 sequences, so a step takes 1 to
  4 micro-batches; the ramp grows over 1536 tokens in 4 sizes (1, 2, 3, 4 micro-batches).
  """
  c = corpus_cfg(pathlib.Path(tmp), steps=12)
  c.train.update(global_batch=8, micro_batch=0, log_every=1, eval_every=0, sample_tokens=0)
  c.optim.update(batch_ramp_start=2 * 64, batch_ramp_tokens=1536, batch_ramp_buckets=4)
  c.checkpoint.update(save_every=5, keep=5, async_save=True)
  return c


def mixture_cfg(tmp):
  """12 steps over three sources whose weights change at step 6, every loss logged."""
  c = corpus_cfg(pathlib.Path(tmp), steps=12)
  with c.unlocked():
    for i, (name, words) in enumerate(test_data_mixture.WORDS.items()):
      path = pathlib.Path(tmp) / f"{name}.jsonl"
      test_data_mixture.write_source(path, words, 150, seed=i)
      c.data.mixture[name] = {"weight": (0.5, 0.3, 0.2)[i], "paths": str(path)}
  c.data.mixture_stages = "6:prose=0.1,code=0.8,web=0.1"
  c.train.update(log_every=1, eval_every=6, sample_tokens=0)
  c.checkpoint.update(save_every=4, keep=5, async_save=True)
  return c


def hang_before_step(step, marker):
  """Makes this process hang before optimizer step `step` (0-based) of a fresh run, its batch
  already read, after creating the file `marker`: a test then kills it at a known point."""
  real, calls = Trainer.step, itertools.count()

  def hanging_step(self, state, batch):
    if next(calls) == step:
      open(marker, "w", encoding="utf-8").close()
      while True:
        time.sleep(60)
    return real(self, state, batch)

  Trainer.step = hanging_step


def start(tmp_path, workdir, make="kill_cfg", hang=None, **options):
  code = DRIVER.format(tests=os.path.dirname(__file__), tmp=str(tmp_path), make=make, hang=hang,
                       options=options)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.Popen([sys.executable, "-c", code, workdir], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def launch(tmp_path):
  """`start` for this test's tmp_path; a run still going when the test ends is killed."""
  procs = []

  def launch_(workdir, **kwargs):
    procs.append(start(tmp_path, workdir, **kwargs))
    return procs[-1]

  yield launch_
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.communicate()


def finish(proc):
  """Waits for a run started by `start`; returns its output."""
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out
  return out


def kill_when_hung(proc, workdir, saved_step):
  """SIGKILLs a run started with `hang` once it hangs and its checkpoint `saved_step` is on disk."""
  marker, saved = workdir + ".hung", os.path.join(workdir, "checkpoints", str(saved_step))
  deadline = time.time() + 600
  while not (os.path.exists(marker) and os.path.isdir(saved)) and proc.poll() is None and (
      time.time() < deadline):
    time.sleep(0.05)
  running = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate()[0]
  assert running and os.path.exists(marker) and os.path.isdir(saved), out
  assert proc.returncode == -signal.SIGKILL


def saved_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def latest_state(cfg, workdir):
  """The whole train state (step, params, optimizer state) of the run's latest checkpoint."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    cfg.model.vocab_size = json.load(f)["model"]["vocab_size"]  # as resolved by the tokenizer
  trainer = Trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  return checkpoint.Checkpointer(workdir, cfg.checkpoint).restore_latest(trainer.abstract_state)


def assert_same_run(cfg, straight, killed):
  """Every row `killed` logged, before its kill and after its resume, has the loss and tokens of
  the same step of `straight`, bit for bit, and both end in the same train state and meta."""
  a = {r["step"]: r for r in metrics.read(straight)}
  rows = metrics.read(killed)
  assert sorted(a) == list(range(1, cfg.train.steps + 1)), sorted(a)
  for key in ("loss", "tokens"):
    got, want = [r[key] for r in rows], [a[r["step"]][key] for r in rows]
    first = next((r["step"] for r, g, w in zip(rows, got, want) if g != w), None)
    np.testing.assert_array_equal(got, want, err_msg=f"{key} of the rows logged at steps "
                                  f"{[r['step'] for r in rows]}; first differing step: {first}")
  (s1, m1), (s2, m2) = latest_state(cfg, straight), latest_state(cfg, killed)
  assert m1 == m2 and m1["step"] == cfg.train.steps
  jax.tree.map(np.testing.assert_array_equal, s1, s2)


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
  steps_saved = sorted(int(s) for s in os.listdir(os.path.join(killed, "checkpoints"))
                       if s.isdigit())
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


@pytest.mark.slow
def test_sigkill_with_dropout_on_resumes_bit_exactly(tmp_path, launch):
  """Dropout masks come from (seed, step), not from anything a restart loses: a run killed three
  steps after its checkpoint at 4 and resumed draws the masks of the uninterrupted run."""
  straight, killed, plain = (str(tmp_path / n) for n in ("straight", "killed", "no_dropout"))
  others = [launch(straight, make="dropout_cfg"), launch(plain, make="dropout_cfg", rate=0.0)]
  kill_when_hung(launch(killed, make="dropout_cfg", hang=7), killed, saved_step=4)
  assert saved_steps(killed) == [4]  # steps 5-7 were done and are lost
  out = finish(launch(killed, make="dropout_cfg"))
  assert "resuming from the checkpoint at step 4 " in out
  for p in others:
    finish(p)

  assert [r["step"] for r in metrics.read(killed)] == [*range(1, 8), *range(5, 13)]
  assert_same_run(dropout_cfg(tmp_path), straight, killed)
  a, b = losses_by_step(straight), losses_by_step(plain)
  differ = [s for s in a if a[s] != b[s]]
  assert differ == list(range(1, 13)), (a, b)  # dropout is on: every loss moves without it


@pytest.mark.slow
def test_sigkill_mid_batch_ramp_resumes_bit_exactly(tmp_path, launch):
  """Killed two steps after its checkpoint at step 5, in the middle of the batch ramp, a run
  resumes with the ramp's batch sizes and data position and ends as the uninterrupted run."""
  plan = optim.plan(ramp_cfg(tmp_path))
  assert plan.micro_batch == 2 and plan.total_steps == 12
  assert [a for _, a in plan.ramp] == [1, 2, 3, 4]
  saved, hang = 5, 7
  assert plan.accum(0) < plan.accum(saved) < plan.accum(hang) < plan.max_accum == 4  # mid-ramp
  assert plan.ramp[-1][0] < plan.total_steps  # and the run reaches the full batch
  per_step = [plan.accum(s) * 2 * 64 for s in range(12)]  # micro-batches x sequences x tokens

  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  other = launch(straight, make="ramp_cfg")
  kill_when_hung(launch(killed, make="ramp_cfg", hang=hang), killed, saved_step=saved)
  assert saved_steps(killed) == [saved]
  out = finish(launch(killed, make="ramp_cfg"))
  assert f"resuming from the checkpoint at step {saved} ({sum(per_step[:saved]):,} tokens" in out
  finish(other)

  tokens = {r["step"]: r["tokens"] for r in metrics.read(straight)}
  assert [tokens[s] for s in range(1, 13)] == list(itertools.accumulate(per_step))
  assert [r["step"] for r in metrics.read(killed)] == [*range(1, hang + 1), *range(saved + 1, 13)]
  assert_same_run(ramp_cfg(tmp_path), straight, killed)


@pytest.mark.slow
def test_sigkill_across_a_mixture_stage_resumes_bit_exactly(tmp_path, launch):
  """Three sources, their weights changing at step 6: killed at step 7 with its checkpoint at 4,
  the run resumes before the stage change, crosses it again, and ends as the uninterrupted run;
  validation reports each source."""
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  other = launch(straight, make="mixture_cfg")
  kill_when_hung(launch(killed, make="mixture_cfg", hang=7), killed, saved_step=4)
  out = finish(launch(killed, make="mixture_cfg"))
  assert "resuming from the checkpoint at step 4 " in out
  finish(other)
  assert [r["step"] for r in metrics.read(killed)] == [*range(1, 8), *range(5, 13)]
  assert_same_run(mixture_cfg(tmp_path), straight, killed)
  cfg = mixture_cfg(tmp_path)
  tok = tokenizer_lib.load_or_train(cfg.data, straight)
  entries = training.Stream(cfg.data, tok, seq_len=64, micro_batch=8, seed=0).entries()
  evals = [r for r in metrics.read(straight) if "val_loss" in r]
  assert [r["step"] for r in evals] == [6, 12]
  for r in evals:
    per_source = {n: r[f"eval/{n}/val_loss"] for n in ("code", "prose", "web")}
    assert r["val_loss"] == pytest.approx(
        0.3 * per_source["code"] + 0.5 * per_source["prose"] + 0.2 * per_source["web"])
    for n, loss in per_source.items():  # bits/byte = nats/token / ln 2 x tokens / UTF-8 bytes
      val = entries[n].meta["splits"]["val"]
      assert r[f"eval/{n}/bits_per_byte"] == pytest.approx(
          loss / math.log(2) * val["tokens"] / val["bytes"])
