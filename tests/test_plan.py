"""The run planner: the real sharded step compiled for abstract arrays on fake devices, its memory
checked against an independent per-device count, suggestions that fit, and early errors."""

import dataclasses
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import configs
from gptjax import accounting, plan, sharding
from gptjax.config import ConfigError
from gptjax.model import ModelArgs
from gptjax.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(**mesh):
  c = configs.load("tiny")
  with c.unlocked():
    c.model.update(vocab_size=512, n_layers=2, d_model=64, n_heads=4, ctx=64)
    c.train.update(global_batch=16, micro_batch=8)
    c.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
  return c


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs, from their shardings alone."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("mesh", [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"data": 8}],
                         ids=["fsdp8", "fsdp4xtp2", "dp8"])
def test_compiled_arguments_are_the_state_and_batch_shards(mesh):
  cfg = small_cfg(**mesh)
  report = plan.make(cfg, 8, "h100")
  trainer = Trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:8]))
  state = shard_bytes(trainer.abstract_state)
  batch_rows = 8 // (trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"])
  batch = 2 * (2 * batch_rows * 64 * 4)  # inputs and targets: [accum 2, rows, 64] int32
  assert report.compiled["arguments"] == state + batch
  assert report.compiled["aliased"] == state  # the donated state is updated in place
  if mesh.get("data") != 8:  # sharded state: well below the replicated size
    replicated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state))
    assert state < replicated / 3
  assert report.compiled["peak"] >= report.compiled["arguments"]
  assert report.fits and report.compile_s > 0
  assert report.accum == 2 and report.tokens_per_step == 16 * 64


def test_step_time_and_days_follow_the_flops():
  cfg = configs.load("gpt3:xl")
  report = plan.make(cfg, 8, "h100", mfu=0.5, train_tokens=10**9, compile_step=False)
  args = ModelArgs.from_config(cfg.model)
  want = cfg.train.global_batch * 2048 * accounting.flops_per_token(args, 2048) / (8 * 989e12 * 0.5)
  assert report.step_s == pytest.approx(want)
  assert report.days == pytest.approx(10**9 / (cfg.train.global_batch * 2048) * want / 86400)


def test_a_preset_that_does_not_fit_gets_a_suggestion_that_does():
  cfg = configs.load("gpt3:xl")
  with cfg.unlocked():
    cfg.mesh.update(data=8, fsdp=1, tensor=1)  # replicated 1.3B params + Adam, whole-batch backward
    cfg.train.micro_batch, cfg.optim.batch_ramp_tokens = 512, 0
  report = plan.make(cfg, 8, "h100", compile_step=False)
  assert report.fits is False and report.suggestion
  # Apply the suggestion: the estimate now fits.
  for flag in report.suggestion.split():
    key, value = flag.removeprefix("--config.").split("=")
    section, name = key.split(".")
    with cfg.unlocked():
      cfg[section][name] = type(cfg[section][name])(value)
  fixed = plan.make(cfg, 8, "h100", compile_step=False)
  assert fixed.fits, plan.format_report(fixed)


def test_the_report_uses_the_micro_batch_of_the_ramp():
  """GPT-3 presets step in 32k-token micro-batches (the batch ramp's start), and so does the plan."""
  cfg = configs.load("gpt3:small")
  report = plan.make(cfg, 8, "h100", compile_step=False)
  assert (report.micro_batch, report.accum, report.tokens_per_step) == (16, 16, 256 * 2048)
  cfg.train.micro_batch = 0  # resolves to the same 16 sequences
  assert plan.make(cfg, 8, "h100", compile_step=False).micro_batch == 16
  with cfg.unlocked():
    cfg.mesh.update(data=1, fsdp=32)  # 16 sequences cannot split over 32 devices
  with pytest.raises(ConfigError, match=r"train\.micro_batch: the micro-batch of 16 sequences.*"
                                        r"multiple of 32"):
    plan.make(cfg, 32, "h100", compile_step=False)


def test_nothing_fits_says_use_more_devices():
  report = plan.make(configs.load("gpt3:175b"), 8, "h100", compile_step=False)
  assert report.fits is False and report.suggestion is None
  assert "use more devices" in plan.format_report(report)


@pytest.mark.parametrize("mesh, setting", [({"fsdp": 3}, "mesh"), ({"tensor": 8}, "mesh.tensor")])
def test_bad_meshes_fail_before_compiling(mesh, setting):
  with pytest.raises(ConfigError, match=setting):
    plan.make(small_cfg(**mesh), 8, "h100")


def test_too_few_devices_in_this_process():
  cfg = small_cfg(fsdp=16)
  cfg.train.micro_batch = 16
  with pytest.raises(ConfigError, match="xla_force_host_platform_device_count=16"):
    plan.make(cfg, 16, "h100")


def test_script_sets_up_its_own_fake_devices():
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "plan.py"), "--config=configs/tiny.py",
       "--devices=16", "--mesh=fsdp:16", "--config.model.vocab_size=512",
       "--config.train.global_batch=16", "--device_kind=a100"],
      capture_output=True, text=True, check=False, cwd=ROOT,
      env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "on 16 x a100 (mesh data 1 x fsdp 16 x tensor 1)" in out.stdout
  assert "memory per device (compiler, the real sharded step on CPU devices)" in out.stdout
  bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "plan.py"), "--config=configs/tiny.py",
       "--devices=8", "--mesh=fsdp=8"], capture_output=True, text=True, check=False, cwd=ROOT)
  assert bad.returncode != 0 and "is not 'axis:size'" in bad.stderr
