"""The training loop end to end on a small local corpus: files written, metrics sane, samples."""

import json
import os
import random

import numpy as np
import pytest

import configs
from gptjax import loop, metrics, optim, run as run_lib
from gptjax.data import cache, stats, tokenizer as tokenizer_lib, training
from helpers import files

WORDS = ("the cat sat on a mat and the dog ran to it while a bird sang in the tree above them "
         "def return class import value token model data step loss").split()


def corpus_cfg(tmp_path, steps=12):
  rng = random.Random(0)
  files.write_text(tmp_path / "docs.jsonl", "".join(
      json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(10, 80)))}) + "\n"
      for _ in range(300)))
  c = configs.load("tiny")
  c.data.update(source="files", paths=str(tmp_path / "docs.jsonl"), val_fraction=0.1,
                cache_dir=str(tmp_path / "cache"))
  c.data.tokenizer.vocab_size = 320
  c.model.update(n_layers=2, d_model=64, n_heads=2, ctx=64)
  c.train.update(global_batch=8, steps=steps, log_every=4, eval_every=6, eval_batches=2,
                 sample_tokens=8, progress=False)
  c.optim.update(warmup_steps=2, peak_lr=3e-3)
  c.mesh.data = 1
  return c


def test_loop_trains_and_writes_the_workdir(tmp_path):
  cfg = corpus_cfg(tmp_path)
  workdir = str(tmp_path / "run")
  summary = loop.run(cfg, workdir, devices=__import__("jax").devices()[:1])
  for name in ("config.json", "tokenizer.model", "metrics.jsonl", "samples.txt"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
  rows = metrics.read(workdir)
  assert [r["step"] for r in rows] == [4, 6, 8, 12]  # log_every 4, plus the eval at 6
  assert all(r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in rows)
  assert rows[-1]["tokens"] == 12 * 8 * 64
  assert "val_loss" in rows[1] and "val_loss" in rows[-1]
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert rows[-1]["mfu"] is None  # no known peak for a CPU
  resolved = json.load(open(os.path.join(workdir, "config.json"), encoding="utf-8"))
  assert resolved["model"]["vocab_size"] == 320  # set from the trained tokenizer
  assert len(summary["samples"]) == 2 and all(isinstance(s, str) for s in summary["samples"])


@pytest.mark.slow
def test_quickstart_learns_below_the_unigram_entropy(tmp_path):
  """The tiny preset on the embedded corpus, as `make train` runs it, beats a unigram model."""
  cfg = configs.load("tiny")
  cfg.train.progress = False
  workdir = str(tmp_path / "quickstart")
  summary = loop.run(cfg, workdir, devices=__import__("jax").devices()[:1])
  tok = tokenizer_lib.load_or_train(cfg.data, workdir)
  entry = cache.load_or_build(cfg.data, tok)
  h = stats.unigram_entropy(np.asarray(entry.tokens("train")), tok.vocab_size)
  print(f"val loss {summary['val_loss']:.3f} nats/token vs unigram entropy {h:.3f}")
  assert summary["val_loss"] < h


def test_validation_covers_eval_batches_global_batches_or_says_how_many(tmp_path, capsys):
  import jax  # pylint: disable=import-outside-toplevel
  cfg = corpus_cfg(tmp_path)
  cfg.train.update(global_batch=8, micro_batch=4, eval_batches=2)
  tok, _ = loop.prepare(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
  plan = optim.plan(cfg)
  entry = cache.load_or_build(cfg.data, tok)
  available = len(entry.tokens("val")) // (plan.seq_len + 1)  # whole val sequences in the split
  assert available >= 16, available
  stream = training.Stream(cfg.data, tok, seq_len=plan.seq_len, micro_batch=plan.micro_batch,
                           seed=0)

  def batches(eval_batches):
    (v,) = stream.validation(eval_batches * plan.max_accum, np.arange(4), print)
    return len(list(v.batches))

  # 2 global batches of 8 = 4 micro-batches of 4: every asked-for sequence, none repeated.
  assert batches(2) == 4
  assert batches(100) == available // 4
  assert (f"the val split holds {available} sequences of 65 tokens, fewer than "
          "train.eval_batches x train.global_batch = 800; validating on "
          f"{available // 4 * 4} of them") in capsys.readouterr().out


def test_a_tokenizer_vocabulary_unlike_the_config_is_said(tmp_path, capsys):
  import jax  # pylint: disable=import-outside-toplevel
  cfg = corpus_cfg(tmp_path)
  cfg.model.vocab_size = 50257  # a GPT-2 preset's, with a trained SentencePiece tokenizer of 320
  loop.prepare(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
  out = capsys.readouterr().out
  assert "model.vocab_size: the config says 50,257" in out and "has 320 tokens" in out
  assert cfg.model.vocab_size == 320


def test_hosts_with_different_token_streams_are_refused(monkeypatch):
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  # Another host's fingerprint differs from this one's.
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, x + 1]))
  with pytest.raises(loop.ConfigError, match="different token streams"):
    loop._check_same_on_all_hosts("ab" * 32, "token stream", "Give every host the same data.")
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, x]))
  loop._check_same_on_all_hosts("ab" * 32, "token stream", "")


def test_mfu_counts_the_mesh_devices_and_their_own_peak(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from gptjax import accounting, sharding  # pylint: disable=import-outside-toplevel
  peaks = {d.id: 1e12 * (1 + i) for i, d in enumerate(jax.devices())}
  monkeypatch.setattr(accounting, "peak_flops_of", lambda d: peaks[d.id])
  devices = jax.devices()[2:6]  # 4 of the 8 devices, not the first
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {"data": 4, "fsdp": 1, "tensor": 1, "order": "data,fsdp,tensor"}), devices)
  assert loop._mesh_peak_flops(mesh) == sum(peaks[d.id] for d in devices)  # 3 + 4 + 5 + 6 TFLOP/s
  monkeypatch.setattr(accounting, "peak_flops_of", lambda d: None)
  assert loop._mesh_peak_flops(mesh) is None


def test_a_workdir_tokenizer_never_silently_replaces_the_one_asked_for(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  cfg = corpus_cfg(tmp_path)
  workdir = str(tmp_path / "run")
  loop.prepare(cfg, workdir, devices=jax.devices()[:1])  # trains and saves a 320-token tokenizer
  run_lib.write_config(cfg, workdir)
  cfg = corpus_cfg(tmp_path)
  cfg.data.tokenizer.vocab_size = 300
  with pytest.raises(loop.ConfigError, match=r"other tokenizer settings \(data\.tokenizer\."
                     r"vocab_size 320 -> 300\)"):
    loop.prepare(cfg, workdir, devices=jax.devices()[:1])
