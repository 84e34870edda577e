"""A resume never silently starts over: changed optimizer settings resume from the latest checkpoint
with its moments; unreadable checkpoints fall back, read errors stop; a changed token stream or
tokenizer is refused before anything is written.

The reference is one uninterrupted run. A copy interrupted at step 10 (as after SIGTERM) resumes
under each change: the loss logged at step 11 is the loss of the step-10 parameters on batch 11, so
it must equal the reference's bit for bit whatever the optimizer does afterwards.
"""

import errno
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptjax import checkpoint, loop, metrics, optstate, sharding
from gptjax.config import ConfigError
from gptjax.train import Trainer
# nan_at_step is a pytest fixture: pytest finds it by name in this module, so the import stays
# although only a test's parameter of the same name (F811 there) uses it.
from test_checkpoint import nan_at_step  # noqa: F401  pylint: disable=unused-import
from test_checkpoint import preempt_at, snapshot
from test_loop import corpus_cfg

pytestmark = pytest.mark.slow
STEPS, STOP = 15, 10
ONE = jax.devices()[:1]


def cfg_of(tmp):
  c = corpus_cfg(tmp, steps=STEPS)
  c.train.update(log_every=1, eval_every=0, sample_tokens=0)
  c.checkpoint.update(save_every=5, keep=5)
  return c


def rows(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in metrics.read(str(workdir))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(tmp, the uninterrupted run's losses, a run stopped at step 10 with checkpoints 5 and 10)."""
  tmp = tmp_path_factory.mktemp("resume")
  loop.run(cfg_of(tmp), str(tmp / "reference"), devices=ONE)
  with pytest.MonkeyPatch.context() as m:
    preempt_at(m, STOP)
    summary = loop.run(cfg_of(tmp), str(tmp / "stopped"), devices=ONE)
  assert summary["preempted"] and summary["steps"] == STOP
  return tmp, rows(tmp / "reference"), tmp / "stopped"


def copy_of(stopped, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(stopped, workdir)
  return workdir


def moments(tree) -> dict[tuple[str, ...], np.ndarray]:
  """Adam's mu and nu by role (parameter path), whatever the chain around them."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {optstate.role(p): np.asarray(v) for p, v in flat if optstate.role(p)[:1] in (("mu",),
                                                                                      ("nu",))}


@pytest.mark.parametrize("change", [
    {"optim.clip_norm": 0.0},
    {"train.nonfinite": "skip"},
    {"optim.peak_lr": 1e-3, "optim.warmup_steps": 4, "optim.schedule": "linear"},
    {"compress.prune.method": "magnitude", "compress.prune.begin_step": STOP},
], ids=["clip_off", "nonfinite_skip", "lr_schedule", "prune_on"])
def test_changed_optimizer_settings_resume_from_the_latest_checkpoint(runs, tmp_path, change,
                                                                      capsys):
  tmp, reference, stopped = runs
  workdir = copy_of(stopped, tmp_path)
  cfg = cfg_of(tmp)
  for key, value in change.items():
    section, name = key.rsplit(".", 1)
    node = cfg
    for part in section.split("."):
      node = node[part]
    node[name] = value
  saved = checkpoint.Reader(str(workdir)).read_all(STOP, "opt_state")

  # The optimizer state restores by parameter path into the new chain: every moment as saved.
  cfg.model.vocab_size = json.load(open(workdir / "config.json", encoding="utf-8"))["model"][
      "vocab_size"]
  trainer = Trainer.build(cfg, sharding.make_mesh(cfg.mesh, ONE))
  state, meta = checkpoint.Checkpointer(str(workdir), cfg.checkpoint).restore_latest(
      trainer.abstract_state, init_opt_state=trainer.tx.init)
  assert meta["step"] == STOP and int(state.step) == STOP
  want, got = moments(saved), moments(state.opt_state)
  assert set(want) == set(got) and len(want) >= 2 * len(jax.tree.leaves(state.params))
  for role in want:
    np.testing.assert_array_equal(got[role], want[role], err_msg=str(role))
  if "compress.prune.method" in change:  # the fresh pruning state counts from the checkpoint's step
    counts = [int(v) for p, v in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
              if optstate.role(p) == ("count",)]
    assert counts and all(c == STOP for c in counts), counts

  # The loop resumes at step 10 and its first loss continues the interrupted run exactly.
  summary = loop.run(cfg, str(workdir), devices=ONE)
  assert summary["steps"] == STEPS
  got = rows(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))  # no step logged twice: no restart from 0
  assert got[STOP + 1] == reference[STOP + 1]
  out = capsys.readouterr().out
  assert f"resuming from the checkpoint at step {STOP}" in out
  changed = out.split("resuming with changed settings: ")[1].splitlines()[0]
  assert all(key in changed for key in change), changed


def test_nan_stop_then_resume_with_skip(runs, tmp_path, nan_at_step):  # noqa: F811 (the fixture)
  tmp, reference, _ = runs
  workdir = str(tmp_path / "nan")
  nan_at_step(7)  # the 7th training batch of this process gets NaN weights
  with pytest.raises(loop.NonFiniteError, match="set train.nonfinite='skip'"):
    loop.run(cfg_of(tmp), workdir, devices=ONE)
  assert checkpoint.Reader(workdir).steps() == [5]
  cfg = cfg_of(tmp)
  cfg.train.nonfinite = "skip"  # what the error message advises
  loop.run(cfg, workdir, devices=ONE)
  got = rows(workdir)
  assert checkpoint.Reader(workdir).steps()[-1] == STEPS
  assert got[6] == reference[6]  # resumed at step 5 with its parameters and moments


def test_truncated_latest_checkpoint_falls_back_to_the_previous(runs, tmp_path, capsys):
  tmp, reference, stopped = runs
  workdir = copy_of(stopped, tmp_path)
  files = [os.path.join(root, f) for root, _, fs in os.walk(workdir / "checkpoints" / str(STOP)
                                                            / "params") for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  loop.run(cfg_of(tmp), str(workdir), devices=ONE)
  assert "checkpoint at step 10 is unreadable" in capsys.readouterr().out
  assert os.listdir(workdir / "corrupt_checkpoints") == [str(STOP)]
  assert rows(workdir)[6] == reference[6]  # resumed from step 5


def test_a_read_error_stops_the_run_and_leaves_the_checkpoint(runs, tmp_path, monkeypatch):
  tmp, _, stopped = runs
  workdir = copy_of(stopped, tmp_path)
  before = snapshot(str(workdir))
  calls = []

  def failing_restore(self, step, args=None):
    del self, args
    calls.append(step)
    raise OSError(errno.EIO, "Input/output error")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
  monkeypatch.setattr(checkpoint, "READ_RETRY_S", 0.0)
  with pytest.raises(checkpoint.CheckpointReadError, match="could not be read after 3 tries"):
    loop.run(cfg_of(tmp), str(workdir), devices=ONE)
  assert calls == [STOP] * checkpoint.READ_ATTEMPTS  # retried, never fell back to step 5
  assert snapshot(str(workdir)) == before
  assert not os.path.exists(workdir / "corrupt_checkpoints")


def test_all_checkpoints_unreadable_never_restarts_silently(runs, tmp_path):
  tmp, _, stopped = runs
  workdir = copy_of(stopped, tmp_path)
  for step in (5, STOP):
    shutil.rmtree(workdir / "checkpoints" / str(step) / "params" / "d")  # incomplete
  with pytest.raises(ConfigError, match=r"every checkpoint in .* is unreadable .*start_over=True"):
    loop.run(cfg_of(tmp), str(workdir), devices=ONE)
  assert sorted(os.listdir(workdir / "corrupt_checkpoints")) == ["10", "5"]
  cfg = cfg_of(tmp)
  cfg.checkpoint.start_over = True
  cfg.train.steps = 2
  cfg.optim.warmup_steps = 1
  assert loop.run(cfg, str(workdir), devices=ONE)["steps"] == 2  # asked for: from step 0


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(seed=1), r"another token stream \(seed 0 -> 1\)"),
    (lambda c: c.data.update(val_fraction=0.2), r"data\.val_fraction 0\.1 -> 0\.2"),
    (lambda c: c.data.update(max_docs=100), r"data\.max_docs 0 -> 100"),
    (lambda c: c.data.tokenizer.update(vocab_size=300),
     r"holds the tokenizer of a run with other tokenizer settings \(data\.tokenizer\.vocab_size "
     r"320 -> 300\)"),
], ids=["seed", "val_fraction", "max_docs", "tokenizer"])
def test_a_changed_token_stream_is_refused_before_anything_is_written(runs, tmp_path, edit,
                                                                     message):
  tmp, _, stopped = runs
  workdir = copy_of(stopped, tmp_path)
  cfg = cfg_of(tmp)
  edit(cfg)
  before = snapshot(str(workdir))
  with pytest.raises(ConfigError, match=message):
    loop.run(cfg, str(workdir), devices=ONE)
  assert snapshot(str(workdir)) == before


def test_changed_data_behind_the_same_settings_is_refused(runs, tmp_path):
  tmp, _, stopped = runs
  workdir = copy_of(stopped, tmp_path)
  cfg = cfg_of(tmp)  # writes the corpus file again: same text, so it resumes
  other = tmp_path / "other"
  other.mkdir()
  corpus_cfg(other)
  docs = (other / "docs.jsonl").read_text(encoding="utf-8").splitlines()
  (tmp / "docs.jsonl").write_text("\n".join(reversed(docs)) + "\n", encoding="utf-8")
  before = snapshot(str(workdir))
  with pytest.raises(ConfigError, match="was trained on another token stream"):
    loop.run(cfg, str(workdir), devices=ONE)
  assert snapshot(str(workdir)) == before
  cfg_of(tmp)  # puts the corpus back for the other tests


def test_restore_from_a_run_with_another_tokenizer_is_refused(runs, tmp_path):
  tmp, _, stopped = runs
  cfg = cfg_of(tmp)
  cfg.data.tokenizer.vocab_size = 300
  cfg.checkpoint.restore_from = str(stopped)
  with pytest.raises(ConfigError, match="restore_from: .* was trained with another tokenizer"):
    loop.run(cfg, str(tmp_path / "new"), devices=ONE)


def test_keep_best_sees_only_losses_measured_at_the_saved_step(runs, tmp_path):
  tmp, _, _ = runs
  cfg = cfg_of(tmp)
  cfg.train.update(steps=10, eval_every=4, eval_batches=1)
  cfg.checkpoint.update(save_every=2, keep=10, keep_best=1)
  workdir = tmp_path / "best"
  loop.run(cfg, str(workdir), devices=ONE)
  val = {r["step"]: r["val_loss"] for r in metrics.read(str(workdir)) if "val_loss" in r}
  assert sorted(val) == [4, 8, 10]
  tagged = {}
  for step in checkpoint.Reader(str(workdir)).steps():  # the metrics Orbax wrote with each step
    path = workdir / "checkpoints" / str(step) / "metrics" / "metrics"
    tagged[step] = json.loads(path.read_text())["val_loss"] if path.exists() else None
  assert tagged == {2: None, 4: val[4], 6: None, 8: val[8], 10: val[10]}

  # On resume the ranking includes the steps saved before: the best so far survives later saves.
  cfg.train.steps = 14
  cfg.checkpoint.keep = 1
  cfg.optim.update(peak_lr=0.5, schedule="constant")  # make the next validations worse
  loop.run(cfg, str(workdir), devices=ONE)
  after = {r["step"]: r["val_loss"] for r in metrics.read(str(workdir)) if "val_loss" in r}
  assert min(after, key=after.get) == 10, after
  assert checkpoint.Reader(str(workdir)).steps() == [10, 14]  # the best, and the latest
