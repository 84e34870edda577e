"""Portable checkpoints: restore across scan layouts, remat and dtypes; elastic resume on another
mesh; conversion to and from HF GPT-2 (checked by logits); params-only exports; inspection.

One 8-device FSDP run (scanned layers, fp32) is trained once and shared by every test.
"""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from gptjax import checkpoint, convert, layout, loop, metrics, optim, run, safetensors_io, sharding
from gptjax.config import ConfigError
from gptjax.data import pipeline, tokenizer as tokenizer_lib
from gptjax.model import GPT, ModelArgs
from gptjax.train import Trainer
from test_loop import corpus_cfg

ROOT = os.path.join(os.path.dirname(__file__), "..")
STEPS, SAVED = 8, 3  # the shared run's length, and the checkpoint the resumes start from


def run_cfg(tmp, **model):
  c = corpus_cfg(tmp, steps=STEPS)
  c.train.update(log_every=1, eval_every=0, eval_batches=1, sample_tokens=0)
  c.checkpoint.update(save_every=SAVED, keep=5)
  c.mesh.update(data=1, fsdp=8, tensor=1)
  c.model.update(model)
  return c


def losses_by_step(workdir):
  return {r["step"]: r["loss"] for r in metrics.read(workdir)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(tmp, workdir, losses) of an uninterrupted 8-step run on 8 devices, FSDP 8, scanned."""
  tmp = tmp_path_factory.mktemp("portable")
  workdir = str(tmp / "fsdp8")
  loop.run(run_cfg(tmp), workdir, devices=jax.devices())
  return tmp, workdir, losses_by_step(workdir)


def trainer(tmp, workdir, n_devices=1, **model):
  """A Trainer for the shared run's model (with `model` overrides) on `n_devices` (pure DP)."""
  c = run_cfg(tmp, **model)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    c.model.vocab_size = json.load(f)["model"]["vocab_size"]
  c.mesh.update(data=n_devices, fsdp=1)
  return Trainer.build(c, sharding.make_mesh(c.mesh, jax.devices()[:n_devices]))


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def random_batch(t: Trainer, seed):
  rng = np.random.default_rng(seed)
  b = {k: rng.integers(0, t.model.args.vocab_size, (1, 8, 64), dtype=np.int32)
       for k in ("inputs", "targets")}
  return {k: jax.device_put(v, t.batch_sharding(leading=1)) for k, v in b.items()}


# ---- layouts --------------------------------------------------------------------------------


def assert_same_layers(stacked, unrolled, n_layers=2):
  """Layer l of a scanned tree (index l of layers/block_0) is block_l of an unrolled one."""
  for l in range(n_layers):
    assert_trees_equal(jax.tree.map(lambda x, l=l: x[l], stacked["layers"]["block_0"]),
                       unrolled[f"block_{l}"])
  assert_trees_equal({k: v for k, v in stacked.items() if k != "layers"},
                     {k: v for k, v in unrolled.items() if not k.startswith("block_")})


def adam(opt_state):
  """Adam's state in (clip, inject_hyperparams((adam, decay mask, schedule))), as a state or as
  the dict tree Orbax stores."""
  inject = opt_state[1]
  return (inject["inner_state"] if isinstance(inject, dict) else inject.inner_state)[0]


def test_scan_and_unrolled_checkpoints_restore_into_each_other(trained, tmp_path):
  tmp, workdir, _ = trained
  scan, unrolled = trainer(tmp, workdir), trainer(tmp, workdir, scan_layers=False)
  ck = run_cfg(tmp).checkpoint
  state_s, meta_s = checkpoint.Checkpointer(workdir, ck).restore_latest(scan.abstract_state)
  state_u, meta_u = checkpoint.Checkpointer(workdir, ck).restore_latest(unrolled.abstract_state)
  assert meta_s == meta_u and meta_s["step"] == STEPS
  assert layout.is_scanned(state_s.params) and not layout.is_scanned(state_u.params)
  # Params and both Adam moments: layer l of the saved stacked arrays, as Orbax stored them.
  reader = checkpoint.Reader(workdir)
  stored_params, stored_opt = reader.read_all(STEPS), reader.read_all(STEPS, "opt_state")
  assert_same_layers(stored_params, host(state_u.params))
  for moment in ("mu", "nu"):
    assert_same_layers(adam(stored_opt)[moment], host(getattr(adam(state_u.opt_state), moment)))
  assert int(adam(state_u.opt_state).count) == STEPS

  # Scan -> unrolled, fp32: the same next-step loss and the same update (which reads the restored
  # Adam moments), up to the summation order of the two compiled programs.
  batch = random_batch(scan, 0)
  state_s, m_s = scan.step(state_s, batch)
  state_u, m_u = unrolled.step(state_u, batch)
  np.testing.assert_allclose(float(m_u["loss"]), float(m_s["loss"]), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               layout.convert_tree(host(state_s.params), False, 1), host(state_u.params))

  # Unrolled -> scan: save the unrolled state, restore it into the scanned model.
  cku = checkpoint.Checkpointer(str(tmp_path / "unrolled"), ck)
  cku.save(STEPS + 1, state_u, {**meta_u, "step": STEPS + 1})
  cku.close()
  saved_u = host((state_u.params, state_u.opt_state))
  back, _ = checkpoint.Checkpointer(str(tmp_path / "unrolled"), ck).restore_latest(
      scan.abstract_state)
  assert_same_layers(host(back.params), saved_u[0])
  for moment in ("mu", "nu"):
    assert_same_layers(host(getattr(adam(back.opt_state), moment)),
                       getattr(adam(saved_u[1]), moment))
  batch = random_batch(scan, 1)
  back, m_s = scan.step(back, batch)
  state_u, m_u = unrolled.step(state_u, batch)
  np.testing.assert_allclose(float(m_s["loss"]), float(m_u["loss"]), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               layout.convert_tree(host(back.params), False, 1), host(state_u.params))

  # Remat policy and compute dtype leave the tree alone: the same arrays come back.
  other = trainer(tmp, workdir, scan_layers=False, remat="full", dtype="bfloat16")
  state_o, _ = checkpoint.Checkpointer(workdir, ck).restore_latest(other.abstract_state)
  assert_same_layers(stored_params, host(state_o.params))


@pytest.mark.parametrize("model, mismatch", [
    (dict(d_model=96),
     r"\['block_0'\]\['attn'\]\['out'\]\['bias'\]: stored \(64,\), model \(96,\)"),
    (dict(n_layers=3), r"\['block_2'\]\['attn'\]\['out'\]\['bias'\]: stored None, model \(64,\)"),
])
def test_a_model_of_other_sizes_is_refused_across_layouts(trained, model, mismatch):
  tmp, workdir, _ = trained
  t = trainer(tmp, workdir, scan_layers=False, **model)
  with pytest.raises(ConfigError, match="saved with model.scan_layers=True.*" + mismatch):
    checkpoint.Checkpointer(workdir, run_cfg(tmp).checkpoint).restore_latest(t.abstract_state)
  with pytest.raises(ConfigError, match=mismatch):
    checkpoint.restore_params(workdir, t.abstract_state.params)


# ---- elastic resume -------------------------------------------------------------------------


def test_data_order_depends_only_on_seed_and_step(trained):
  tmp, workdir, _ = trained
  cfg = run_cfg(tmp)
  tok = tokenizer_lib.load_or_train(cfg.data, workdir)

  def sequences(global_batch, steps, hosts=1, seed=0):
    rows = []
    for k in range(steps):
      for h in range(hosts):
        part = global_batch // hosts  # host h's rows, as a data-parallel mesh assigns them
        ds = pipeline.dataset(cfg.data, tok, "train", seq_len=64, global_batch=global_batch,
                              seed=seed, rows=range(h * part, (h + 1) * part))
        rows.append(ds[k]["inputs"])
    return np.concatenate(rows)

  one = sequences(8, 3)
  np.testing.assert_array_equal(sequences(8, 3, hosts=2), one)  # 2 hosts x 4 rows per step
  np.testing.assert_array_equal(sequences(4, 6), one)  # micro-batches of 4
  np.testing.assert_array_equal(sequences(2, 12, hosts=2), one)
  assert not np.array_equal(sequences(8, 3, seed=1), one)


def test_fsdp8_checkpoint_resumes_on_dp2_tp2_with_the_same_losses(trained):
  tmp, workdir, straight = trained
  moved = tmp / "moved"
  os.makedirs(moved / "checkpoints")
  shutil.copytree(os.path.join(workdir, "checkpoints", str(SAVED)),
                  moved / "checkpoints" / str(SAVED))
  for f in ("config.json", "tokenizer.model"):
    shutil.copy(os.path.join(workdir, f), moved / f)
  cfg = run_cfg(tmp)
  cfg.mesh.update(data=2, fsdp=1, tensor=2)
  cfg.train.micro_batch = 4  # 2 micro-batches per step: the global batch of 8 is kept
  summary = loop.run(cfg, str(moved), devices=jax.devices()[:4])
  resumed = losses_by_step(moved)
  assert summary["steps"] == STEPS and sorted(resumed) == list(range(SAVED + 1, STEPS + 1))
  # fp32: sharding and accumulation change only the summation order.
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [straight[s] for s in sorted(resumed)], rtol=1e-5)


def test_resume_moves_the_data_position_or_refuses_clearly(trained):
  tmp, workdir, _ = trained
  reader = checkpoint.Reader(workdir)
  meta = reader.meta(SAVED)
  assert meta["data"] == {"next_index": SAVED} and meta["config"]["train"]["global_batch"] == 8
  cfg = run_cfg(tmp)
  cfg.train.micro_batch = 2
  assert checkpoint.resume_data_state(meta, cfg, optim.plan(cfg)) == {"next_index": 4 * SAVED}
  cfg.train.update(global_batch=16, micro_batch=0)
  with pytest.raises(ConfigError, match=r"train\.global_batch.*trained with 8 sequences x 64 "
                     r"tokens per step.*asks for 16 x 64"):
    checkpoint.resume_data_state(meta, cfg, optim.plan(cfg))
  cfg.train.update(global_batch=8, seq_len=32)
  with pytest.raises(ConfigError, match=r"Keep train\.global_batch=8 and train\.seq_len=64"):
    checkpoint.resume_data_state(meta, cfg, optim.plan(cfg))


# ---- conversion -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained):
  tmp, workdir, _ = trained
  out = str(tmp / "hf")
  err = convert.to_hf(workdir, None, out)
  return workdir, out, err


def gptjax_model(workdir):
  reader = checkpoint.Reader(workdir)
  step = reader.resolve(None)
  params = reader.read_all(step)
  return convert.model_args(run.checkpoint_config(reader, step)[0], params), params


def test_export_loads_in_transformers_with_the_same_logits_and_generations(exported):
  workdir, out, err = exported
  assert err <= 1e-4
  with safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
    assert "lm_head.weight" not in f.keys()  # tied: transformers ties it to wte on load
    assert f.get_tensor("transformer.wte.weight").shape == (320, 64)  # padding rows dropped
  model = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
  args, params = gptjax_model(workdir)
  apply = jax.jit(GPT(args).apply)
  tokens = np.random.default_rng(5).integers(0, 320, (3, 24), dtype=np.int32)
  ours = np.asarray(apply({"params": params}, tokens))[..., :320]
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  assert theirs.std() > 0.1
  assert np.abs(ours - theirs).max() <= 1e-4

  prompt = tokens[:1, :6]
  with torch.no_grad():
    hf_ids = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=10,
                            do_sample=False, pad_token_id=0).numpy()[0, 6:]
  ids = np.zeros((1, 16), np.int32)  # greedy, recomputing the sequence: causal, so the zeros
  ids[0, :6] = prompt[0]               # after position t do not change its logits
  for t in range(6, 16):
    ids[0, t] = np.argmax(np.asarray(apply({"params": params}, ids))[0, t - 1, :320])
  assert list(hf_ids) == list(ids[0, 6:])


def test_a_corrupted_conversion_is_caught(trained, tmp_path, monkeypatch):
  _, workdir, _ = trained
  real = safetensors_io.SafetensorsWriter.write

  def write(self, name, x):  # transpose one square matrix: shapes stay valid, the model does not
    real(self, name, x.T if name == "transformer.h.1.attn.c_proj.weight" else x)

  monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", write)
  with pytest.raises(convert.ConversionError, match=r"max abs logit error .* > tolerance"):
    convert.to_hf(workdir, None, str(tmp_path / "bad"))


def test_bfloat16_export_is_checked_against_rounded_weights(trained, tmp_path):
  _, workdir, _ = trained
  out = str(tmp_path / "bf16")
  assert convert.to_hf(workdir, None, out, dtype="bfloat16") <= 1e-4
  with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
    assert f.get_tensor("transformer.h.0.mlp.c_fc.weight").dtype == torch.bfloat16


def test_import_from_hf_round_trips_into_either_layout(exported, trained, tmp_path):
  tmp, _, _ = trained
  workdir, out, _ = exported
  imported = str(tmp_path / "imported")
  assert convert.from_hf(out, imported, scan_layers=False) <= 1e-4
  saved = json.load(open(os.path.join(imported, "config.json"), encoding="utf-8"))
  assert saved["model"]["scan_layers"] is False and saved["model"]["d_model"] == 64
  # Restored into the scanned training model (cross-layout restore_params): the trained weights,
  # except the padded vocabulary rows, which HF does not keep (they come back as zeros).
  t = trainer(tmp, workdir)
  params = host(checkpoint.restore_params(imported, t.abstract_state.params))
  _, source = gptjax_model(workdir)
  np.testing.assert_array_equal(params["wte"]["embedding"][320:], 0.0)
  params["wte"]["embedding"] = np.concatenate([params["wte"]["embedding"][:320],
                                               source["wte"]["embedding"][320:]])
  assert_trees_equal(params, source)


def test_params_only_bfloat16_export_serves_but_does_not_resume(trained, tmp_path):
  tmp, workdir, _ = trained
  serve = str(tmp_path / "serve")
  assert convert.params_only(workdir, None, serve, dtype="bfloat16") == 0.0
  reader = checkpoint.Reader(serve)
  assert reader.steps() == [STEPS] and not reader.has(STEPS, "opt_state")
  assert reader.tree(STEPS)["wte"]["embedding"].dtype == ml_dtypes.bfloat16
  assert reader.size_on_disk(STEPS) < checkpoint.Reader(workdir).size_on_disk(STEPS) / 4
  t = trainer(tmp, workdir, scan_layers=False)
  params = host(checkpoint.restore_params(serve, t.abstract_state.params))
  _, source = gptjax_model(workdir)
  rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), source)
  assert_trees_equal(params, layout.convert_tree(rounded, False, 1))
  with pytest.raises(ConfigError, match="holds parameters only.*restore_from"):
    checkpoint.Checkpointer(serve, run_cfg(tmp).checkpoint).restore_latest(t.abstract_state)


def unrepresentable(tmp_path, **model):
  """A params-only checkpoint of a small model GPT-2 cannot express."""
  cfg = run_cfg(tmp_path, n_layers=2, d_model=32, n_heads=2, ctx=16, vocab_size=50, **model)
  args = ModelArgs.from_config(cfg.model)
  shapes = jax.eval_shape(lambda: GPT(args).init(jax.random.key(0), np.zeros((1, 4), np.int32)))
  workdir = str(tmp_path / "run")  # zeros: the refusal comes before any value is read
  checkpoint.save_params(workdir, 1, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                                  nn.meta.unbox(shapes["params"])),
                         {"step": 1, "tokens": 0, "config": checkpoint.config_json(cfg)})
  return workdir


@pytest.mark.parametrize("model, why", [
    (dict(norm="post"), r"norm='post': HF GPT-2 is pre-LN only"),
    (dict(attention="alternating", local_window=4), r"attention='alternating'.*no locally banded"),
])
def test_unrepresentable_models_are_refused_before_writing(tmp_path, model, why):
  workdir = unrepresentable(tmp_path, **model)
  with pytest.raises(ValueError, match=f"cannot be represented as a Hugging Face GPT-2[^$]*{why}"):
    convert.to_hf(workdir, None, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_convert_script_exits_nonzero_with_the_reason(tmp_path):
  workdir = unrepresentable(tmp_path, norm="post")
  out = subprocess.run([sys.executable, "scripts/convert.py", "to_hf", f"--workdir={workdir}",
                        f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1 and "convert: FAILED" in out.stderr and "norm='post'" in out.stderr


def test_inspect_checkpoint_lists_steps_tree_config_and_data_position(trained):
  _, workdir, _ = trained
  out = subprocess.run([sys.executable, "scripts/inspect_checkpoint.py", f"--workdir={workdir}",
                        f"--step={SAVED}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=True).stdout
  for want in ("checkpoints in", "3  ", "6  ", "8  ", "MiB", "params, opt_state, meta",
               f"data position: step {SAVED}, {SAVED * 8 * 64:,} tokens seen (= {SAVED * 8:,} "
               "sequences of 64 tokens)", '{"next_index": 3}',
               "layout scanned", "layers/block_0/attn/qkv/kernel", "(2, 64, 3, 2, 32)", "float32",
               # Adam's mu and nu for 16 parameters, three step counts (Adam, schedule, hyperparams)
               # and the traced hyperparameters
               f"opt_state: {2 * 16 + 3 + len(optim.HYPERPARAMS)} arrays", '"d_model": 64',
               '"fsdp": 8'):
    assert want in out, (want, out)
