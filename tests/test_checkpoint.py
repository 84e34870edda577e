"""Checkpoints: exact resume after preemption, fallback past a corrupt checkpoint, resharding on
restore, the non-finite guard, and bad input that leaves an existing workdir untouched."""

import concurrent.futures
import json
import os

import jax
import numpy as np
import pytest

from gptjax import checkpoint, loop, metrics, run as run_lib, sharding
from gptjax.config import ConfigError
from gptjax.train import Trainer
from test_loop import corpus_cfg


def losses_by_step(workdir):
  return {r["step"]: r["loss"] for r in metrics.read(workdir)}  # a resumed step's last row wins


def ckpt_cfg(tmp_path, **ck):
  c = corpus_cfg(tmp_path, steps=10)
  c.train.update(log_every=1, eval_every=0, sample_tokens=0)
  c.checkpoint.update({"save_every": 3, "keep": 5, **ck})
  return c


def latest_params(cfg, workdir):
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    cfg.model.vocab_size = json.load(f)["model"]["vocab_size"]  # as resolved by the tokenizer
  trainer = Trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  state, meta = checkpoint.Checkpointer(workdir, cfg.checkpoint).restore_latest(
      trainer.abstract_state)
  return state.params, meta


def preempt_at(monkeypatch, step):
  """Makes the loop see a stop request (as after SIGTERM) right after `step`."""
  calls = {"n": 0}

  def agreed(self):
    del self
    calls["n"] += 1
    return calls["n"] == step

  monkeypatch.setattr(loop._StopSignal, "agreed", agreed)


def test_preempted_run_resumes_bit_exactly(tmp_path, monkeypatch):
  one = jax.devices()[:1]
  cfg = ckpt_cfg(tmp_path)
  loop.run(cfg, str(tmp_path / "straight"), devices=one)

  with monkeypatch.context() as m:
    preempt_at(m, 5)
    summary = loop.run(ckpt_cfg(tmp_path), str(tmp_path / "resumed"), devices=one)
  assert summary["preempted"] and summary["steps"] == 5  # stopped between save points: saved at 5
  loop.run(ckpt_cfg(tmp_path), str(tmp_path / "resumed"), devices=one)

  straight, resumed = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "resumed")
  assert sorted(resumed) == list(range(1, 11))
  assert all(straight[s] == resumed[s] for s in range(1, 11)), (straight, resumed)  # bit-exact
  p1, meta1 = latest_params(cfg, str(tmp_path / "straight"))
  p2, meta2 = latest_params(cfg, str(tmp_path / "resumed"))
  assert meta1 == meta2 and meta1["step"] == 10
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  cfg = ckpt_cfg(tmp_path)
  workdir = str(tmp_path / "run")
  loop.run(cfg, workdir, devices=jax.devices()[:1])
  ckdir = os.path.join(workdir, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ckdir) if s.isdigit()) == [3, 6, 9, 10]
  for root, _, files in os.walk(os.path.join(ckdir, "10", "params")):
    for f in files:  # garble every file of the newest checkpoint's params
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  _, meta = latest_params(cfg, workdir)
  assert meta["step"] == 9
  assert "checkpoint at step 10 is unreadable" in capsys.readouterr().out
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "10"))  # kept for inspection


def test_restore_onto_another_mesh_layout_continues_the_same_run(tmp_path, monkeypatch):
  def cfg(data, fsdp, tensor):
    c = ckpt_cfg(tmp_path)
    c.train.steps = 8
    c.model.n_heads = 4
    c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    return c

  loop.run(cfg(1, 8, 1), str(tmp_path / "fsdp"), devices=jax.devices())
  with monkeypatch.context() as m:
    preempt_at(m, 6)
    loop.run(cfg(1, 8, 1), str(tmp_path / "moved"), devices=jax.devices())
  loop.run(cfg(2, 1, 4), str(tmp_path / "moved"), devices=jax.devices())  # resumed, resharded
  a, b = losses_by_step(tmp_path / "fsdp"), losses_by_step(tmp_path / "moved")
  np.testing.assert_allclose([b[7], b[8]], [a[7], a[8]], rtol=1e-5)


@pytest.fixture
def nan_at_step(monkeypatch):
  """Makes the loss of one training step NaN, through the token weights of its batch."""

  def install(bad_step):
    real = loop.feed.HostRows.to_global
    seen = {"train": 0}

    def to_global(self, batch, leading=0):
      batch = dict(batch)
      weights = np.ones(batch["targets"].shape, np.float32)
      if batch["targets"].ndim == 3:  # a training batch [accum, B, L]
        seen["train"] += 1
        if seen["train"] == bad_step:
          weights[...] = np.nan
      batch["weights"] = weights
      return real(self, batch, leading)

    monkeypatch.setattr(loop.feed.HostRows, "to_global", to_global)

  return install


def test_nonfinite_stop_leaves_checkpoints_untouched(tmp_path, nan_at_step):
  cfg = ckpt_cfg(tmp_path)
  workdir = str(tmp_path / "run")
  nan_at_step(5)
  with pytest.raises(loop.NonFiniteError, match="at step 5"):
    loop.run(cfg, workdir, devices=jax.devices()[:1])
  ckdir = os.path.join(workdir, "checkpoints")
  assert sorted(s for s in os.listdir(ckdir) if s.isdigit()) == ["3"]  # step 6 was never saved
  params, meta = latest_params(cfg, workdir)
  assert meta["step"] == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nonfinite_skip_drops_the_update_and_goes_on(tmp_path, nan_at_step):
  cfg = ckpt_cfg(tmp_path)
  cfg.train.nonfinite = "skip"
  nan_at_step(5)
  workdir = str(tmp_path / "run")
  summary = loop.run(cfg, workdir, devices=jax.devices()[:1])
  rows = losses_by_step(workdir)
  assert np.isnan(rows[5]) and all(np.isfinite(rows[s]) for s in rows if s != 5)
  assert summary["steps"] == 10
  params, _ = latest_params(cfg, workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def snapshot(workdir):
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      out[p] = (os.path.getsize(p), os.path.getmtime(p))
  return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("finished")
  cfg = ckpt_cfg(tmp)
  cfg.train.steps = 3
  workdir = str(tmp / "run")
  loop.run(cfg, workdir, devices=jax.devices()[:1])
  return tmp, workdir


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.model.update(d_model=96), r"holds a run of a different model \(model\.d_model"),
    (lambda c: c.model.update(n_heads=5), r"model\.n_heads: 5 heads do not divide"),
    (lambda c: c.mesh.update(data=3), r"mesh: data x fsdp x tensor = 3"),
    (lambda c: c.train.update(seq_len=4096), r"train\.seq_len: 4096 exceeds"),
    (lambda c: c.train.update(global_batch=7) or c.mesh.update(data=2),
     r"train\.micro_batch: the micro-batch of 7 sequences per pass does not split over data x "
     r"fsdp = 2"),
    (lambda c: c.checkpoint.update(restore_from="/nonexistent/run"),
     r"restore_from.*does not exist"),
    (lambda c: c.data.update(paths="/nonexistent/*.txt"), r"data\.paths"),
])
def test_bad_input_fails_clearly_and_changes_nothing(finished_run, edit, message):
  tmp, workdir = finished_run
  cfg = ckpt_cfg(tmp)
  cfg.train.steps = 3
  edit(cfg)
  before = snapshot(workdir)
  with pytest.raises(ValueError, match=message):
    loop.run(cfg, workdir, devices=jax.devices()[:2 if cfg.mesh.data > 1 else 1])
  assert snapshot(workdir) == before


def test_a_checkpoint_of_another_shape_is_refused_not_discarded(finished_run):
  tmp, workdir = finished_run
  cfg = ckpt_cfg(tmp)
  cfg.model.update(d_model=96, n_heads=2)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    cfg.model.vocab_size = json.load(f)["model"]["vocab_size"]
  trainer = Trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  before = snapshot(workdir)
  with pytest.raises(ConfigError, match=r"mismatched parameters: \['layers'\]\['block_0'\]"):
    checkpoint.Checkpointer(workdir, cfg.checkpoint).restore_latest(trainer.abstract_state)
  assert snapshot(workdir) == before  # nothing moved aside as if it were corrupt


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ConfigError, match="is not writable"):
    loop.run(ckpt_cfg(tmp_path), str(blocker / "run"), devices=jax.devices()[:1])


def test_processes_sharing_a_workdir_check_it_without_racing(tmp_path):
  # Every process of a multi-host run checks the shared workdir at the same moment.
  cfg = ckpt_cfg(tmp_path)
  workdir = str(tmp_path / "shared")

  def check_many_times():
    for _ in range(200):
      run_lib.check(cfg, workdir)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for f in [pool.submit(check_many_times) for _ in range(8)]:
      f.result()
  assert os.listdir(workdir) == []  # and no probe is left behind


def test_restore_from_starts_from_another_runs_weights_with_a_fresh_optimizer(finished_run,
                                                                             tmp_path):
  tmp, source = finished_run
  cfg = ckpt_cfg(tmp)
  cfg.train.steps = 3
  cfg.checkpoint.restore_from = source
  workdir = str(tmp_path / "warm")
  with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
    src_cfg_vocab = json.load(f)["model"]["vocab_size"]
  cfg.model.vocab_size = src_cfg_vocab
  trainer = Trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  src_params, _ = latest_params(ckpt_cfg(tmp), source)
  params = checkpoint.restore_params(source, trainer.abstract_state.params)
  jax.tree.map(np.testing.assert_array_equal, params, src_params)
  cfg.train.steps = 2
  cfg.optim.warmup_steps = 1
  summary = loop.run(cfg, workdir, devices=jax.devices()[:1])
  assert summary["steps"] == 2  # a new run (steps 0 -> 2), not a resume of the source's step 3
  with pytest.raises(ConfigError, match="holds no checkpoint"):
    checkpoint.restore_params(str(tmp_path), trainer.abstract_state.params)


def test_resume_data_position_counts_in_the_resolved_micro_batch():
  """With a batch ramp, train.micro_batch=0 resolves to the ramp's start, not the global batch:
  the saved position (in micro-batches) must come back unchanged, not 16 times further."""
  from gptjax import optim  # pylint: disable=import-outside-toplevel
  import configs  # pylint: disable=import-outside-toplevel
  cfg = configs.load("gpt3:small")
  cfg.train.micro_batch = 0
  plan = optim.plan(cfg)
  assert plan.micro_batch == 16 and cfg.train.global_batch == 256
  saved = checkpoint.config_json(cfg)
  step = 5000
  meta = {"step": step, "tokens": plan.tokens_before(step), "data": {"next_index": 100},
          "config": saved}
  assert checkpoint.resume_data_state(meta, cfg, plan) == {"next_index": 100}
  meta["micro_batch"] = 16  # as recorded by the loop since
  assert checkpoint.resume_data_state(meta, cfg, plan) == {"next_index": 100}
