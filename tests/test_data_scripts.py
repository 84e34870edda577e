"""scripts/prepare_data.py and scripts/bench_data.py run from the repo root on a small corpus."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMALL = ["--config=configs/tiny.py", "--config.data.max_docs=40",
         "--config.data.tokenizer.vocab_size=600", "--config.data.tokenizer.train_chars=100000",
         "--config.data.val_fraction=0.1"]


def run(script, *args):
  out = subprocess.run([sys.executable, f"scripts/{script}", *SMALL, *args], cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=120)
  return out.stdout


def test_prepare_data_prints_statistics_and_saves_the_tokenizer(tmp_path):
  out = run("prepare_data.py", f"--workdir={tmp_path / 'run'}",
            f"--config.data.cache_dir={tmp_path / 'cache'}")
  assert os.path.isfile(tmp_path / "run" / "tokenizer.model")
  for row in ("documents         train 36, val 4", "tokens/document", "unigram entropy",
              "bits/token", "nats/token", "byte fallback",
              "trained SentencePiece bpe (600 pieces)"):
    assert row in out, out


def test_bench_data_prints_one_json_line(tmp_path):
  out = run("bench_data.py", "--steps=50", f"--config.data.cache_dir={tmp_path / 'cache'}")
  result = json.loads(out.strip().splitlines()[-1])
  assert result["config"] == "tiny" and result["tokens_per_s"] > 0 and result["steps"] == 50


def test_prepare_data_with_independent_workers(tmp_path):
  """Two worker processes started at once (as two SLURM array tasks), then the final commit."""
  flags = [*SMALL, f"--config.data.cache_dir={tmp_path / 'cache'}",
           "--config.data.shard_chars=20000", "--num_workers=2"]
  run("prepare_data.py", f"--workdir={tmp_path / 'run'}")  # the tokenizer; the local build
  procs = [subprocess.Popen([sys.executable, "scripts/prepare_data.py", *flags,
                             f"--workdir={tmp_path / 'run'}", f"--worker_index={i}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  committed = [out for out, _ in outs if "token cache" in out]
  assert len(committed) in (1, 2)  # the last to finish commits (both, if they end together)
  assert "documents         train 36, val 4" in committed[0]
  assert int(re.search(r": (\d+) shards", committed[0]).group(1)) > 2
  again = subprocess.run([sys.executable, "scripts/prepare_data.py", *flags, "--commit",
                          f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
  assert "documents         train 36, val 4" in again
