"""scripts/prepare_data.py and scripts/bench_data.py run from the repo root on a small corpus."""

import json
import os
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
