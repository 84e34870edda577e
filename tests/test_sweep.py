"""Sweeps: expansion, names, strict overrides, launch scripts, the local runner's skip/resume."""

import dataclasses
import json
import os
import random
import subprocess
import sys

import jax
import pytest
from absl import flags
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import config_flags

import configs
from gptjax import loop, metrics, sweep, sweep_run
from gptjax.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FILES = ["lr_tiny", "lr_tiny:random", "model_size", "model_size:cpu", "model_size:smoke",
               "isoflop", "isoflop:cpu", "mup_transfer", "mup_transfer:cpu", "mup_transfer:smoke"]


def write_sweep(tmp_path, body: str, name: str = "s.py") -> str:
  path = tmp_path / name
  path.write_text("from configs import tiny\nfrom gptjax import sweep as sweep_lib\n\n"
                  "def get_config(arg=''):\n  return tiny.get_config()\n\n" + body)
  return str(path)


def test_grid_zipped_product_and_random_search_build_the_right_lists():
  g = sweep.grid({"optim.peak_lr": [1e-3, 2e-3, 4e-3], "train.steps": [10, 20]})
  assert len(g) == 6 and g[0] == {"optim.peak_lr": 1e-3, "train.steps": 10}
  z = sweep.zipped({"model.n_layers": [2, 4], "model.d_model": [128, 256]})
  assert z == [{"model.n_layers": 2, "model.d_model": 128},
               {"model.n_layers": 4, "model.d_model": 256}]
  with pytest.raises(sweep.SweepError, match="differ in length"):
    sweep.zipped({"a.b": [1, 2], "c.d": [1]})
  assert len(sweep.product(g, z)) == 12
  with pytest.raises(sweep.SweepError, match="more than one"):
    sweep.product(g, g)
  space = {"optim.peak_lr": sweep.LogUniform(1e-4, 1e-2), "optim.weight_decay": [0.0, 0.1],
           "optim.b2": sweep.Uniform(0.9, 0.99)}
  a, b = sweep.random_search(space, 6, seed=1), sweep.random_search(space, 6, seed=1)
  assert a == b and a != sweep.random_search(space, 6, seed=2) and len(a) == 6
  assert all(1e-4 <= r["optim.peak_lr"] <= 1e-2 and 0.9 <= r["optim.b2"] <= 0.99 for r in a)
  family = sweep.sizes_by_aspect_ratio([2, 4], aspect_ratio=64, d_head=64)
  assert family[1] == {"model.n_layers": 4, "model.d_model": 256, "model.n_heads": 4}


@pytest.mark.parametrize("spec", SWEEP_FILES)
def test_every_sweep_file_expands_to_unique_stable_names_with_overrides_applied(spec):
  sw = sweep.expand(spec, n_devices=1)
  names = [r.name for r in sw.runs]
  assert len(set(names)) == len(names)
  assert names == [r.name for r in sweep.expand(spec, n_devices=1).runs]  # stable
  module, _, arg = sweep.load(spec)
  raw = module.sweep(arg) if arg else module.sweep()
  assert len(sw.runs) == len(raw)
  for run, overrides in zip(sw.runs, raw):
    assert run.name == sweep.run_name(overrides)
    for key, value in overrides.items():
      if key.startswith(sweep.META):
        assert run.meta[key.removeprefix(sweep.META)] == value
      else:
        section, leaf = key.rsplit(".", 1)
        assert run.config[section][leaf] == value, (run.name, key)
    assert all(ch.isalnum() or ch in "._,=+-" for ch in run.name), run.name
  if spec.startswith("lr_tiny"):
    assert len(sw.runs) == {"lr_tiny": 5, "lr_tiny:random": 8}[spec]


def test_size_family_spans_1m_to_50m_params_and_isoflop_runs_spend_their_budget():
  sizes = [sweep.param_count(r.config) for r in sweep.expand("model_size", n_devices=1).runs]
  assert sizes == sorted(sizes) and 1e6 <= sizes[0] <= 2e6 and 4.5e7 <= sizes[-1] <= 6e7
  for run in sweep.expand("isoflop:cpu", n_devices=1).runs:
    c, t = run.config, run.config.train
    spent = 6 * sweep.param_count(c) * t.steps * t.global_batch * (t.seq_len or c.model.ctx)
    assert abs(spent / run.meta["budget"] - 1) < 0.05, run.name  # rounded to whole steps


def test_run_names_are_short_exact_and_filesystem_safe():
  assert sweep.format_value(3e-4) == "3e-4" and sweep.format_value(0.00232) == "0.00232"
  assert sweep.format_value(20_000_000) == "2e7" and sweep.format_value(123_456_789) == "123456789"
  assert sweep.format_value(1e15) == "1e15" and sweep.format_value(True) == "True"
  assert sweep.run_name({"optim.peak_lr": 3e-4, "model.d_model": 256}) == "peak_lr=3e-4,d_model=256"
  # Two keys with the same last part keep their full paths.
  assert sweep.run_name({"model.vocab_size": 8, "data.tokenizer.vocab_size": 8}) == \
      "model.vocab_size=8,data.tokenizer.vocab_size=8"
  unsafe = sweep.run_name({"data.paths": "/data/a b/*.txt"})
  assert "/" not in unsafe and " " not in unsafe and "*" not in unsafe
  long_a = sweep.run_name({f"k{i}.x{i}": "v" * 20 for i in range(20)})
  long_b = sweep.run_name({f"k{i}.x{i}": "v" * 20 + "w" for i in range(20)})
  assert len(long_a) <= 200 and long_a != long_b


def test_an_unknown_key_fails_before_any_run_starts(tmp_path):
  path = write_sweep(tmp_path, "def sweep(arg=''):\n  return [{'optim.peak_lr': 1e-3}, "
                     "{'optim.peak_rl': 2e-3}]\n")
  with pytest.raises(sweep.SweepError, match=r"run 1 .*unknown key 'optim.peak_rl'.*peak_lr"):
    sweep.expand(path)
  with pytest.raises(sweep.SweepError, match="unknown key 'nope.x'"):
    sweep.apply(configs.load("tiny"), {"nope.x": 1}, "here")
  with pytest.raises(sweep.SweepError, match="is a section"):
    sweep.apply(configs.load("tiny"), {"optim": 1}, "here")
  # Through the script: it fails, and no run folder was made.
  workdir = tmp_path / "sweep"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "sweep.py"),
                         f"--config={path}", f"--workdir={workdir}"], capture_output=True,
                        text=True, cwd=REPO, check=False)
  assert proc.returncode != 0 and "optim.peak_rl" in proc.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("overrides, message", [
    ({"train.steps": 1.5}, "is a float, but the setting is a int"),
    ({"optim.peak_lr": "3e-4"}, "is a str, but the setting is a float"),
    ({"train.progress": 1}, "is a int, but the setting is a bool"),
    ({"model.n_layers": True}, "is a bool, but the setting is a int"),
])
def test_a_wrong_type_fails(overrides, message):
  with pytest.raises(sweep.SweepError, match=message):
    sweep.apply(configs.load("tiny"), overrides, "here")


def test_ints_widen_to_floats_and_the_base_stays_untouched():
  base = configs.load("tiny")
  cfg = sweep.apply(base, {"optim.peak_lr": 1}, "here")
  assert cfg.optim.peak_lr == 1.0 and isinstance(cfg.optim.peak_lr, float)
  assert base.optim.peak_lr == 2e-3
  with pytest.raises(AttributeError):  # the copy is locked like the base
    cfg.optim.new_key = 1


@pytest.mark.parametrize("body, error, message", [
    ("", sweep.SweepError, r"defines no sweep\(\)"),
    ("def sweep(arg=''):\n  return {'optim.peak_lr': 1e-3}\n", sweep.SweepError, "list of"),
    ("def sweep(arg=''):\n  return [{'optim.peak_lr': 1e-3}, {'optim.peak_lr': 1e-3}]\n",
     sweep.SweepError, "same overrides"),
    ("def sweep(arg=''):\n  return [{'model.n_heads': 3}]\n", ConfigError,
     r"run 0 \(n_heads=3\).*n_heads"),
    ("def sweep(arg=''):\n  return [{'train.steps': 10, 'optim.warmup_steps': 50}]\n", ConfigError,
     "warmup"),
    ("def sweep(arg=''):\n  return sweep_lib.isoflop(get_config(), [1e9], "
     "sweep_lib.sizes_by_aspect_ratio([1, 2]))\n", sweep.SweepError,
     "budget of 1e.09 FLOPs is too small for the smallest model"),
])
def test_bad_sweep_files_fail_with_clear_errors(tmp_path, body, error, message):
  with pytest.raises(error, match=message):
    sweep.expand(write_sweep(tmp_path, body))


def test_missing_sweep_file_names_the_way_to_fix_it():
  with pytest.raises(sweep.SweepError, match="not found.*configs/sweeps"):
    sweep.expand("configs/sweeps/no_such_sweep.py")


def test_isoflop_leaves_out_sizes_too_big_for_a_budget():
  base = sweep.load("isoflop:cpu")[0].get_config("cpu")
  family = sweep.sizes_by_aspect_ratio([1, 2, 3, 4])
  runs = sweep.isoflop(base, [1e12], family, min_steps=20)
  assert [r["model.n_layers"] for r in runs] == [1, 2, 3]  # 4 layers would get 15 steps
  with pytest.raises(sweep.SweepError, match="train.tokens"):
    base.train.tokens = 1000
    sweep.isoflop(base, [1e12], family)


def test_shell_commands_and_slurm_script_parse_back_into_the_same_configs(tmp_path):
  sw = sweep.expand("lr_tiny:random", n_devices=1)
  workdir = str(tmp_path / "runs")
  lines = sweep_run.commands(sw, workdir)
  assert len(lines) == len(sw.runs)
  for run in sw.runs:  # what scripts/train.py would build from each command
    argv = sweep_run.command(sw, run, workdir)[1:]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(argv)
    assert holder.value.to_dict() == run.config.to_dict()
    assert fv.workdir == os.path.join(workdir, run.name)
  script = sweep_run.slurm_script(sw, workdir, sbatch=["--time=01:00:00", "--gres=gpu:1"],
                                  max_parallel=2)
  path = tmp_path / "sweep.sbatch"
  path.write_text(script)
  subprocess.run(["bash", "-n", str(path)], check=True)
  assert f"#SBATCH --array=0-{len(sw.runs) - 1}%2" in script and "#SBATCH --gres=gpu:1" in script
  assert all(f"  {i}) exec {line} ;;" in script for i, line in enumerate(lines))


def test_dry_run_table_lists_params_tokens_flops_and_time():
  sw = sweep.expand("model_size:cpu", n_devices=1)
  text = sweep_run.table(sw.runs, flops_per_s=1e10)
  assert all(r.name in text for r in sw.runs)
  row = sweep_run.plan_row(sw.runs[0], 1e10)
  assert row["tokens"] == 150 * 16 * 128 and row["params"] == sweep.param_count(sw.runs[0].config)
  assert row["est_s"] == pytest.approx(row["flops"] / 1e10)
  assert "5 runs" in text.splitlines()[-1]


# ---- the local runner ---------------------------------------------------------------------------

WORDS = "the cat sat on a mat and a dog ran to it def return class import value".split()


def tiny_sweep(tmp_path) -> str:
  rng = random.Random(0)
  corpus = tmp_path / "docs.jsonl"
  with open(corpus, "w", encoding="utf-8") as f:
    for _ in range(200):
      f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))}) + "\n")
  return write_sweep(tmp_path, (
      "def get_config(arg=''):\n"
      "  c = tiny.get_config()\n"
      f"  c.data.update(source='files', paths={str(corpus)!r}, val_fraction=0.1,\n"
      f"                cache_dir={str(tmp_path / 'cache')!r})\n"
      "  c.data.tokenizer.vocab_size = 300\n"
      "  c.model.update(n_layers=1, d_model=32, n_heads=2, ctx=32)\n"
      "  c.train.update(global_batch=4, steps=6, log_every=2, eval_every=0, eval_batches=1,\n"
      "                 sample_tokens=0, progress=False)\n"
      "  c.checkpoint.save_every = 0\n"
      "  c.optim.warmup_steps = 1\n"
      "  return c\n\n"
      "def sweep(arg=''):\n"
      "  return sweep_lib.grid({'seed': [0, 1]})\n"))  # one compiled step serves both


@pytest.fixture
def compile_once(tmp_path):
  """A persistent compilation cache for one test: runs of the same shapes compile once."""
  keys = {"jax_compilation_cache_dir": str(tmp_path / "xla_cache"),
          "jax_persistent_cache_min_compile_time_secs": 0.0,
          "jax_persistent_cache_min_entry_size_bytes": 0}
  old = {k: jax.config.values[k] for k in keys}
  for k, v in keys.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def test_local_runner_resumes_unfinished_runs_and_skips_finished_ones(tmp_path, monkeypatch,
                                                                      compile_once):
  sw = sweep.expand(tiny_sweep(tmp_path), n_devices=1)
  workdir = str(tmp_path / "runs")
  one = jax.devices()[:1]
  first, second = (os.path.join(workdir, r.name) for r in sw.runs)
  with monkeypatch.context() as m:  # a stop request (as after SIGTERM) after step 3 of run 1
    calls = {"n": 0}

    def agreed(self):
      del self
      calls["n"] += 1
      return calls["n"] == 3

    m.setattr(loop._StopSignal, "agreed", agreed)
    outcome = sweep_run.run_local(sw, workdir, devices=one, log=lambda s: None)
  assert outcome == {sw.runs[0].name: "stopped"}  # the sweep stops with it
  assert sweep_run.status(sw.runs[0], workdir) == ("partial", 3)
  assert sweep_run.status(sw.runs[1], workdir) == ("new", 0) and not os.path.exists(second)
  assert json.load(open(os.path.join(workdir, "sweep.json")))["runs"][1]["name"] == sw.runs[1].name

  lines = []
  outcome = sweep_run.run_local(sw, workdir, devices=one, log=lines.append)
  assert outcome == {r.name: "trained" for r in sw.runs}
  assert "unfinished (logged to step 3), resuming" in lines[0]
  steps = [r["step"] for r in metrics.read(first)]
  assert steps == [2, 3, 4, 6]  # logged to step 3, stopped, resumed from its checkpoint at 3
  assert sweep_run.status(sw.runs[1], workdir) == ("done", 6)

  monkeypatch.setattr(loop, "run", lambda *a, **k: pytest.fail("a finished run was started"))
  outcome = sweep_run.run_local(sw, workdir, devices=one, log=lines.append)
  assert outcome == {r.name: "skipped" for r in sw.runs}

  # The sweep file changed a shared setting: its old run folders are refused, not reused.
  changed = sweep.Sweep(sw.name, sw.path, sw.arg, [
      dataclasses.replace(r, config=sweep.apply(r.config, {"train.steps": 8}, "test"))
      for r in sw.runs])
  with pytest.raises(sweep.SweepError, match="train.steps: 6 there, 8 now"):
    sweep_run.run_local(changed, workdir, devices=one, log=lines.append)
