"""The accelerator benchmark suite, its HLO kernel search and FLOP counts, the XLA flags module and
the launch recipes that export its settings. The suite itself runs here on CPU with stand-ins."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml

import configs
from gptjax import accounting, bench, plan, sharding, xla_flags
from gptjax.config import ConfigError
from gptjax.model import ModelArgs
from gptjax.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiled HLO lines as XLA prints them (operands shortened), with planted fused kernels.
_QKV = "custom-call(bf16[2,2048,16,128]{3,2,1,0} %q, bf16[2,2048,16,128]{3,2,1,0} %k, %v)"
FAKE_HLO = "\n".join([
    "HloModule jit_train_step, entry_computation_layout={...}",
    f'  %custom-call.1 = (bf16[2,16,2048,128]{{3,2,1,0}}, f32[2,16,2048]{{2,1,0}}) {_QKV}, '
    'custom_call_target="__cudnn$fmhaSoftmax", operand_layout_constraints={...}, '
    'backend_config={"cudnn_fmha_backend_config":{"mask_type":"CAUSAL"}}',
    f'  %custom-call.2 = (bf16[2,2048,16,128]{{3,2,1,0}}, u8[0]{{0}}) {_QKV}, '
    'custom_call_target="__cudnn$fmhaSoftmaxBackward", backend_config={}',
    f'  %custom-call.3 = (bf16[2,2048,16,128]{{3,2,1,0}}, u8[0]{{0}}) {_QKV}, '
    'custom_call_target="__cudnn$fmhaSoftmax", backend_config={}',
    '  %cublas-gemm.4 = (bf16[4096,8192]{1,0}, s8[4194304]{0}) custom-call(%a, %b), '
    'custom_call_target="__cublas$gemm", backend_config={}',
    '  %custom-call.5 = f32[8,128]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", '
    'frontend_attributes={kernel_name="splash_mha_fwd_residuals"}, backend_config="..."',
])


def test_the_kernel_search_finds_planted_custom_calls_and_nothing_else():
  found = bench.find_fused_kernels(FAKE_HLO)
  assert found == {"__cudnn$fmhaSoftmax": 2, "__cudnn$fmhaSoftmaxBackward": 1,
                   "tpu_custom_call:splash_mha_fwd_residuals": 1}  # cuBLAS GEMMs do not count
  assert bench.describe_kernels(found).startswith("__cudnn$fmhaSoftmax x2")
  assert bench.find_fused_kernels("%dot = f32[8,8] dot(%a, %b)") == {}
  assert bench.describe_kernels({}) == bench.NONE_FOUND == "none found"


def test_banded_flops_count_each_banded_layer_over_its_window():
  xl = ModelArgs.from_config(configs.load("gpt3:xl").model)  # 12 dense + 12 banded (w 256)
  n = accounting.param_counts(xl).matmul
  assert bench.flops_per_token_banded(xl, 2048) == 6 * n + 12 * 16 * 128 * (12 * 2048 + 12 * 256)
  assert bench.flops_per_token_banded(xl, 128) == accounting.flops_per_token(xl, 128)  # w >= T
  small = ModelArgs.from_config(configs.load("gpt2:small").model)  # dense: PaLM's count
  assert bench.flops_per_token_banded(small) == accounting.flops_per_token(small)


def test_the_suite_runs_on_cpu_with_stand_ins():
  result = bench.accelerator_suite(steps=2, warmup=1)
  json.dumps(result)  # JSON-ready
  assert result["backend"] == "cpu" and "stand-in" in result["note"]
  assert result["datasheet_peak_flops"] is None and result["gemm"]["tflops"] > 0
  names = [m["preset"] for m in result["models"]]
  assert names == ["gpt2-small-gpu (cpu stand-in)", "gpt3-xl-gpu (cpu stand-in)"]
  for m in result["models"]:
    assert m["micro_batch_from"] == "2 rows per device (stand-in)"
    assert m["dtype"] == "bfloat16" and m["attention_impl"] == "auto"
    assert m["scan_layers"] is False and m["loss_chunk_rows"] == 4096  # the 'gpu' overlay
    assert m["attention_kernel"] == "none found"  # no fused attention kernel on CPU
    assert m["compile_s"] > 0 and m["step_s"] > 0 and np.isfinite(m["loss"])
    assert m["tokens_per_step"] == m["micro_batch"] * m["seq_len"]
    assert m["tokens_per_s"] == pytest.approx(m["tokens_per_step"] / m["step_s"], rel=1e-3)
    assert m["mfu"] is None and m["mfu_banded"] is None  # a CPU has no datasheet peak
    gemm = result["gemm"]["tflops"] * 1e12
    assert m["mfu_vs_gemm"] == pytest.approx(
        m["tokens_per_s"] * m["flops_per_token"] / gemm, rel=1e-2)
    assert m["peak_memory_bytes"] is None and m["compiled_memory_bytes"] > 0
  gpt2, gpt3 = result["models"]
  assert gpt2["flops_per_token_banded"] == gpt2["flops_per_token"]
  assert gpt3["flops_per_token_banded"] < gpt3["flops_per_token"]  # window 32 of 128 tokens
  table = bench.format_suite(result)
  for line in ("tokens/s", "MFU (PaLM) vs datasheet", "MFU (banded) vs GEMM",
               "peak device memory", "compile s", "attention kernel (HLO)", "bf16 GEMM 512^3",
               "stand-in"):
    assert line in table, table


def test_a_model_that_fits_no_device_is_reported_skipped():
  cfg, how = bench.suite_config("gpt2:small", "gpu", 1, memory_limit=77e9)
  assert (cfg.train.micro_batch, cfg.model.remat) == (64, "none") and "64 rows per device" in how
  with pytest.raises(ConfigError, match="no remat policy and micro-batch fit 16.9 GB"):
    bench.suite_config("gpt3:xl", "tpu", 1, memory_limit=16.9e9)  # 21 GB of Adam state alone
  result = {"devices": 1, "device_kind": "TPU v5 lite", "backend": "tpu", "jax": "0", "note": "",
            "gemm": {"n": 8192, "tflops": 150.0, "fraction_of_datasheet": None},
            "datasheet_peak_flops": None, "total_s": 1.0,
            "models": [{"preset": "gpt3:xl", "skipped": "does not fit"}]}
  assert "gpt3:xl: SKIPPED: does not fit" in bench.format_suite(result)


def test_the_loss_chunk_setting_reaches_the_fused_loss():
  cfg = configs.load("tiny")
  with cfg.unlocked():
    cfg.model.update(vocab_size=512, n_layers=2, d_model=64, n_heads=4, ctx=64)
    cfg.train.update(global_batch=8, micro_batch=8)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])

  def lowered(rows):
    cfg.train.loss_chunk_rows = rows
    trainer = Trainer.build(cfg, mesh)
    return trainer.lower_step(plan.abstract_batch(cfg, trainer)).as_text()

  # 8 x 64 = 512 rows: one [512, 512] chunk by default, [48, 512] chunks (padded to 528) with 48.
  assert "tensor<48x512xf32>" in lowered(48) and "tensor<48x512xf32>" not in lowered(512)
  with pytest.raises(ConfigError, match="train.loss_chunk_rows"):
    lowered(0)


# ---- gptjax/xla_flags.py ----------------------------------------------------------------------


def test_apply_appends_to_the_users_flags_and_never_overrides_them(capsys):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                      "--xla_gpu_enable_triton_gemm=true",
         "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.8"}
  added = xla_flags.apply("auto", environ=env, backend="gpu")
  flags = env["XLA_FLAGS"].split()
  assert flags[:2] == ["--xla_force_host_platform_device_count=8",
                       "--xla_gpu_enable_triton_gemm=true"]  # the user's, first and unchanged
  assert "--xla_gpu_enable_triton_gemm=false" not in flags
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  xla = [s for s in xla_flags.GPU if s.var == "XLA_FLAGS"]
  assert len(flags) == 2 + len(xla) - 1 and len(added) == len(xla) - 1
  assert "XLA_CLIENT_MEM_FRACTION" not in env  # the user set its deprecated alias: both = error
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("xla_flags (gpu): added --xla_gpu_")
  assert "already set, kept: --xla_gpu_enable_triton_gemm XLA_CLIENT_MEM_FRACTION" in err[0]
  assert xla_flags.apply("auto", environ=env, backend="gpu") == []  # idempotent


def test_cpu_and_none_add_nothing_and_say_nothing(capsys):
  env = {}
  assert xla_flags.apply("auto", environ=env, backend="cpu") == [] and env == {}
  assert xla_flags.apply("none", environ=env, backend="gpu") == [] and env == {}
  assert capsys.readouterr().err == ""
  with pytest.raises(ValueError, match="--xla_flags='fast'"):
    xla_flags.apply("fast", environ=env)


def test_tpu_flags_go_to_libtpu_init_args():
  env = {"LIBTPU_INIT_ARGS": "--xla_enable_async_all_gather=false"}
  xla_flags.apply("auto", environ=env, backend="tpu")
  args = env["LIBTPU_INIT_ARGS"].split()
  assert args[0] == "--xla_enable_async_all_gather=false" and len(args) == len(xla_flags.TPU)
  assert "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true" in args
  assert "XLA_FLAGS" not in env


def test_the_backend_is_found_without_starting_jax():
  def detect(env, modules=(), devices=()):
    return xla_flags.detect_backend(env, lambda m: m in modules,
                                    lambda pattern: [p for p in devices if p.startswith(
                                        pattern.split("*")[0].split("[")[0])])

  assert detect({"JAX_PLATFORMS": "cuda,cpu"}) == "gpu"
  assert detect({"JAX_PLATFORMS": "cpu"}, ["jax_cuda12_plugin"], ["/dev/nvidia0"]) == "cpu"
  assert detect({}, ["jax_cuda12_plugin"], ["/dev/nvidia0"]) == "gpu"
  assert detect({}, ["jax_cuda12_plugin"], []) == "cpu"  # a plugin but no GPU
  assert detect({}, ["libtpu"], ["/dev/accel0"]) == "tpu"
  assert detect({}, ["libtpu"], ["/dev/vfio/0"]) == "tpu"
  assert detect({}, [], ["/dev/nvidia0"]) == "cpu"  # a GPU but no JAX plugin
  assert xla_flags.detect_backend() == "cpu"  # this machine


def test_applying_after_jax_started_is_an_error():
  jax.devices()  # started
  before = dict(os.environ)
  with pytest.raises(RuntimeError, match="already started"):
    xla_flags.apply("auto", backend="gpu")
  assert dict(os.environ) == before


def test_every_gpu_flag_is_known_to_this_jaxlib_and_scripts_apply_them_in_time():
  """XLA aborts on an unknown XLA_FLAGS entry. The scripts' imports leave JAX's backends unstarted,
  so `apply` (first in main) can still set the flags; JAX then starts with all of them."""
  code = ("from gptjax import bench, cli, distributed, loop, xla_flags\n"
          "added = xla_flags.apply('auto', backend='gpu')\n"
          "import jax, os\n"
          "print(jax.device_count(), len(added), os.environ['XLA_FLAGS'])\n")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "XLA_CLIENT_MEM_FRACTION",
                                                          "XLA_PYTHON_CLIENT_MEM_FRACTION")}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**env, "JAX_PLATFORMS": "cpu"}, check=False, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  count, n, flags = out.stdout.split(maxsplit=2)
  assert count == "1" and int(n) == len(xla_flags.GPU)
  assert flags.split() == [s.text for s in xla_flags.GPU if s.var == "XLA_FLAGS"]
  assert "Unknown flag" not in out.stderr


def test_every_setting_has_a_reason_a_source_and_a_confirmation():
  for s in (*xla_flags.GPU, *xla_flags.TPU):
    assert s.reason and s.source and s.confirmed.startswith("yes"), s
  names = [s.name for s in (*xla_flags.GPU, *xla_flags.TPU)]
  assert len(names) == len(set(names))
  left_out = " ".join(name for name, _, _ in xla_flags.LEFT_OUT)
  assert not any(n in left_out.split() for n in names)
  row = "| `--xla_gpu_enable_latency_hiding_scheduler=true` (XLA_FLAGS) |"
  assert row in xla_flags.table("gpu")


# ---- launch recipes (scripts/launch/) export the settings -----------------------------------


def _render(*flags):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "launch", "render.py"),
                        *flags], capture_output=True, text=True, check=False, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_recipes_export_the_backends_settings(tmp_path):
  gpu = dict(xla_flags.shell_defaults("gpu"))
  slurm = _render("--target=slurm", "--config=configs/gpt3.py:xl,gpu", "--workdir=/r",
                  "--override=mesh.fsdp=8")
  (tmp_path / "job.sbatch").write_text(slurm)
  subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
  assert f'export XLA_FLAGS="${{XLA_FLAGS:-{gpu["XLA_FLAGS"]}}}"' in slurm
  assert "XLA_CLIENT_MEM_FRACTION:-0.9" in slurm and "XLA_PYTHON_CLIENT_MEM_FRACTION" in slurm
  assert "--job-name=gptjax-gpt3-xl-gpu" in slurm  # the comma is no part of a job name
  # The exports, run in bash, keep a user's own XLA_FLAGS whole (scripts/train.py adds the rest).
  exports = "\n".join(line for line in slurm.splitlines() if "XLA" in line and "export" in line)
  script = f'set -eu\n{exports}\necho "$XLA_FLAGS|$XLA_CLIENT_MEM_FRACTION"'
  run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                       env={"PATH": os.environ["PATH"], "XLA_FLAGS": "--mine=1"})
  assert run.stdout.strip() == "--mine=1|0.9"

  tpu = _render("--target=tpu", "--config=configs/gpt3.py:xl,tpu", "--tpu_name=t", "--zone=z",
                "--workdir=/r")
  args = dict(xla_flags.shell_defaults("tpu"))["LIBTPU_INIT_ARGS"]
  assert f'LIBTPU_INIT_ARGS=\\"\\${{LIBTPU_INIT_ARGS:-{args}}}\\" python3 scripts/train.py' in tpu

  k8s = _render("--target=k8s", "--config=configs/gpt3.py:xl,gpu", "--image=i", "--workdir=/r")
  service, job = yaml.safe_load_all(k8s)
  assert service["metadata"]["name"] == "gptjax-gpt3-xl-gpu"
  env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
  assert env["XLA_FLAGS"] == gpu["XLA_FLAGS"] and env["XLA_CLIENT_MEM_FRACTION"] == "0.9"
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env
