"""The run planner: the real sharded step compiled for abstract arrays on fake devices, its memory
checked against an independent per-device count, suggestions that fit, and early errors."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import configs
from gptjax import accounting, bench, plan, sharding
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


def closed_form(layers, d, vocab, ctx):
  """GPT-2 parameters: per block 12 d^2 + 13 d, token and position embeddings, the final LN."""
  return layers * (12 * d * d + 13 * d) + (vocab + ctx) * d + 2 * d


@pytest.fixture
def teacher_dir(tmp_path):
  """A teacher run's folder as far as planning reads it (config.json): 3 x 128, same vocabulary."""
  t = small_cfg()
  with t.unlocked():
    t.model.update(n_layers=3, d_model=128, n_heads=4)
  (tmp_path / "config.json").write_text(t.to_json_best_effort())
  return str(tmp_path)


def test_a_distillation_plan_holds_the_teacher(teacher_dir):
  """The planned step is the one training runs: the teacher's parameters are in the state."""
  plain, kd = small_cfg(fsdp=8), small_cfg(fsdp=8)
  kd.compress.distill.teacher = teacher_dir
  without, with_teacher = plan.make(plain, 8, "h100"), plan.make(kd, 8, "h100")
  n = closed_form(3, 128, 512, 64)  # 668,800
  assert with_teacher.teacher_params == n and without.teacher_params == 0
  # float32, FSDP-sharded over 8 devices, except the qkv and MLP biases: they lie on the heads and
  # mlp axes, which only tensor parallelism shards, so every device holds them whole.
  biases = 3 * (3 * 128 + 4 * 128)
  teacher_bytes = 4 * (n - biases) / 8 + 4 * biases  # 343,808 (4 n / 8 = 334,400)
  assert with_teacher.compiled["arguments"] - without.compiled["arguments"] == teacher_bytes
  # The teacher rides in the donated state: its output buffer is its input buffer.
  assert with_teacher.compiled["aliased"] - without.compiled["aliased"] == teacher_bytes
  assert with_teacher.estimate["params"] - without.estimate["params"] == 4 * n / 8
  assert "frozen 668,800-param teacher" in plan.format_report(with_teacher)


def test_a_qat_plan_lowers_the_qat_step():
  plain, qat = small_cfg(fsdp=8), small_cfg(fsdp=8)
  qat.compress.qat.enabled = True
  text = {name: plan.lower_step(c, jax.devices()[:8]).as_text()
          for name, c in (("plain", plain), ("qat", qat))}
  # Fake quantization rounds each Linear's weights to the int8 grid; the plain step rounds nothing.
  assert text["qat"].count("round_nearest_even") > 0 == text["plain"].count("round_nearest_even")


def test_document_mask_adds_segment_ids_and_positions_to_the_planned_batch():
  plain, masked = small_cfg(fsdp=8), small_cfg(fsdp=8)
  masked.data.document_mask = True
  lowered = plan.lower_step(masked, jax.devices()[:8])
  state_info, batch_info = lowered.args_info[0]
  assert sorted(batch_info) == ["inputs", "positions", "segment_ids", "targets"]
  assert batch_info["segment_ids"].shape == (2, 8, 64)  # [accum, micro_batch, seq_len]
  grown = (plan.make(masked, 8, "h100").compiled["arguments"]
           - plan.make(plain, 8, "h100").compiled["arguments"])
  assert grown == 2 * 2 * 64 * 4  # two rows of 64 int32 per device and micro-batch


def test_the_benchmark_times_the_training_step(teacher_dir):
  cfg = small_cfg(fsdp=8)
  cfg.data.document_mask = True
  cfg.compress.distill.teacher = teacher_dir
  batch = bench.random_batch(cfg)
  assert sorted(batch) == ["inputs", "positions", "segment_ids", "targets"]
  assert batch["inputs"].shape == (2, 8, 64)
  step, info = bench.make_train_step(cfg, jax.devices()[:8])
  frozen = info["trainer"].abstract_state.frozen
  assert sum(x.size for x in jax.tree.leaves(frozen)) == closed_form(3, 128, 512, 64)
  step()
  assert np.isfinite(info["loss"]())


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
  """GPT-3 presets step in 32k-token micro-batches (the batch ramp's start) and so does the plan."""
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


@pytest.mark.parametrize("spec", ["gpt2:small,gpu", "gpt3:xl,gpu"])
def test_accelerator_presets_lower_with_the_planner(spec):
  """The GPU overlays as written fit 8 H100s by the estimate, and the real sharded step lowers for
  them on 8 fake devices (compiling it is what `scripts/plan.py` adds; see README, Accelerators)."""
  cfg = configs.load(spec)
  report = plan.make(cfg, 8, "h100", compile_step=False)
  assert report.fits and report.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
  assert report.dtype == "bfloat16" and report.accum * report.micro_batch == cfg.train.global_batch
  text = plan.lower_step(cfg, jax.devices()[:8]).as_text()
  rows = cfg.train.micro_batch // 8
  assert f"tensor<{rows}x{cfg.model.ctx}x" in text  # each device's rows of the micro-batch
  assert "bf16" in text


_LOWER_256 = """
import sys
import jax
import configs
from gptjax import config as config_lib, plan
cfg = configs.load(sys.argv[1])
cfg.train.micro_batch = 256  # one sequence per device
config_lib.validate(cfg, n_devices=256)
text = plan.lower_step(cfg, jax.devices()[:256]).as_text()
print("ROWS", f"tensor<1x{cfg.model.ctx}x" in text, "BF16", "bf16" in text, "DEVICES",
      jax.device_count())
"""


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["gpt3:xl,gpu", "gpt2:small,tpu"])
def test_accelerator_presets_lower_for_256_devices(spec):
  """The overlays validate and the real sharded step lowers on 256 fake devices (FSDP over all of
  them, one sequence each), in a process of its own that sets up the devices."""
  out = subprocess.run([sys.executable, "-c", _LOWER_256, spec], capture_output=True, text=True,
                       check=False, cwd=ROOT, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
                            "XLA_FLAGS": "--xla_force_host_platform_device_count=256"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ROWS True BF16 True DEVICES 256" in out.stdout, out.stdout
