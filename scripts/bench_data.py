"""Data benchmarks; each suite prints JSON lines.

Usage:
  python scripts/bench_data.py [--config=configs/tiny.py] [--steps=2000]   # --suite=pipeline
  python scripts/bench_data.py --suite=build [--build_chars=100_000_000]
  python scripts/bench_data.py --suite=mixture
  python scripts/bench_data.py --suite=determinism

- pipeline: tokens/s the input pipeline delivers for a config (its tokenizer and cache built or
  reused first; only the pipeline is timed).
- build: token-cache build tokens/s on a local corpus of --build_chars characters (the embedded
  corpus written out as JSON Lines, repeated to size), with a trained SentencePiece model and a
  16k-merge GPT-2 byte-level BPE (tiktoken), at 1 and 2 worker processes of one thread each, and the
  GPT-2 BPE's plain-Python algorithm (the test oracle, what gptjax used before) as the baseline.
  Every build of one tokenizer must give the same shards (checked through the manifest).
- mixture: tokens/s of a 3-source mixture with a stage change, against the tokens/s the tiny
  preset's training step consumes on this machine.
- determinism: the embedded corpus's token cache built by 1, 2 and 4 local processes, 3
  independent workers and the Beam DirectRunner (3 tasks); one line each with the digest of its
  manifest's shard checksums, which must all be equal.
"""

import itertools
import json
import os
import tempfile
import time

from absl import flags
from ml_collections import config_flags

from gptjax import cli, optim
from gptjax.data import cache, gpt2_bpe, pipeline, sources, tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_SUITE = flags.DEFINE_enum("suite", "pipeline", ["pipeline", "build", "mixture", "determinism"],
                           "What to measure.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory holding the tokenizer ('' = none).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Batches to time.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Batches to take before timing.")
_BUILD_CHARS = flags.DEFINE_integer("build_chars", 100_000_000, "Corpus size of --suite=build.")
_SCRATCH = flags.DEFINE_string("scratch", "", "Folder for corpora and caches ('' = a temporary "
                               "one, removed after).")


def pipeline_rate(d, tok, cfg, steps: int, warmup: int) -> dict:
  seq_len = optim.seq_len(cfg)
  start = time.perf_counter()
  it = pipeline.make(d, tok, "train", seq_len=seq_len, global_batch=cfg.train.global_batch,
                     seed=cfg.seed)
  for _ in range(warmup):
    next(it)
  setup = time.perf_counter() - start
  start = time.perf_counter()
  tokens = sum(next(it)["inputs"].size for _ in range(steps))
  seconds = time.perf_counter() - start
  return {"seq_len": seq_len, "global_batch": cfg.train.global_batch, "steps": steps,
          "tokens_per_s": round(tokens / seconds), "steps_per_s": round(steps / seconds, 1),
          "setup_s": round(setup, 2)}


def suite_pipeline(cfg) -> None:
  tok = tokenizer.load_or_train(cfg.data, _WORKDIR.value)
  print(json.dumps({"config": cfg.name, "worker_count": cfg.data.worker_count,
                    "prefetch": cfg.data.prefetch,
                    **pipeline_rate(cfg.data, tok, cfg, _STEPS.value, _WARMUP.value)}))


class _PlainPythonBPE:
  """GPT-2 BPE encoded by the plain-Python algorithm (`gpt2_bpe.ReferenceBPE`): the baseline."""

  kind, threaded = "gpt2_bpe", False

  def __init__(self, tok: gpt2_bpe.GPT2BPETokenizer):
    self._reference = tok.reference()
    self.vocab_size, self.eos_id = tok.vocab_size, tok.eos_id
    self.fingerprint = "plain-python-" + tok.fingerprint
    self.cache_identity = {"kind": self.kind, "engine": {"library": "plain python"}}

  def encode_batch(self, texts):
    return [self._reference.encode(t) for t in texts]


def _write_corpus(path: str, chars: int) -> int:
  """The embedded corpus as JSON Lines, repeated (each copy's documents numbered) to `chars`."""
  docs, total = list(sources.embedded_documents()), 0
  with open(path, "w", encoding="utf-8") as f:
    for copy in range(1 << 20):
      for text in docs:
        f.write(json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n")
        total += len(text)
        if total >= chars:
          return total
  return total


def suite_build(cfg, scratch: str) -> None:
  corpus = os.path.join(scratch, "corpus.jsonl")
  chars = _write_corpus(corpus, _BUILD_CHARS.value)
  d = cfg.data
  d.source, d.paths, d.val_fraction, d.max_docs = "files", corpus, 0.001, 0
  d.shard_chars = 1 << 23  # ~12 units per 100M characters: both workers stay busy
  vocab = gpt2_bpe.train_vocabulary(  # on the first 6M characters: one copy of the corpus
      itertools.islice((json.loads(line)["text"] for line in open(corpus, encoding="utf-8")),
                       _docs_within(corpus, 6_000_000)), 16_000, os.path.join(scratch, "gpt2_16k"))
  d.tokenizer.train_chars = 20_000_000
  spm = tokenizer.load_or_train(d, None)
  gpt2 = gpt2_bpe.GPT2BPETokenizer.from_dir(vocab)
  plain_chars = min(chars, 20_000_000)  # the plain-Python baseline on a fifth of it
  for name, tok, size in (("sentencepiece", spm, chars), ("gpt2_bpe tiktoken", gpt2, chars),
                          ("gpt2_bpe plain python", _PlainPythonBPE(gpt2), plain_chars)):
    d.max_docs = 0 if size == chars else _docs_within(corpus, size)
    checksums = set()
    for workers in (1, 2):
      d.build_workers = workers
      d.cache_dir = os.path.join(scratch, f"cache-{name.replace(' ', '_')}-{workers}")
      if hasattr(tok, "num_threads"):
        tok.num_threads = 1  # one core per worker: per-core rates
      start = time.perf_counter()
      entry = cache.load_or_build(d, tok)
      seconds = time.perf_counter() - start
      tokens = sum(s["tokens"] for s in entry.meta["splits"].values())
      checksums.add(json.dumps([[s["sha256"] for s in v["shards"]]
                                for v in entry.meta["splits"].values()]))
      print(json.dumps({"suite": "build", "tokenizer": name, "workers": workers,
                        "chars": sum(s["chars"] for s in entry.meta["splits"].values()),
                        "tokens": tokens, "seconds": round(seconds, 1),
                        "tokens_per_s": round(tokens / seconds),
                        "tokens_per_s_per_worker": round(tokens / seconds / workers),
                        "shards": sum(len(v["shards"]) for v in entry.meta["splits"].values())}),
            flush=True)
    print(json.dumps({"suite": "build", "tokenizer": name, "identical_for_1_and_2_workers":
                      len(checksums) == 1}), flush=True)


def _docs_within(path: str, chars: int) -> int:
  n, total = 0, 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      total += len(json.loads(line)["text"])
      n += 1
      if total >= chars:
        break
  return n


def suite_mixture(cfg, scratch: str) -> None:
  import ml_collections  # pylint: disable=import-outside-toplevel
  from gptjax import bench  # pylint: disable=import-outside-toplevel

  corpus = os.path.join(scratch, "corpus.jsonl")
  _write_corpus(corpus, 12_000_000)
  docs = open(corpus, encoding="utf-8").read().splitlines()
  with cfg.unlocked():
    for i, (name, weight) in enumerate((("a", 0.5), ("b", 0.3), ("c", 0.2))):
      path = os.path.join(scratch, f"{name}.jsonl")
      with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(docs[i::3]) + "\n")
      cfg.data.mixture[name] = ml_collections.ConfigDict({"weight": weight, "source": "files",
                                                         "paths": path})
  cfg.data.mixture_stages = f"{_STEPS.value // 2}:a=0.2,b=0.2,c=0.6"
  cfg.data.cache_dir = os.path.join(scratch, "cache")
  tok = tokenizer.load_or_train(cfg.data, None)
  rate = pipeline_rate(cfg.data, tok, cfg, _STEPS.value, _WARMUP.value)
  step, info = bench.make_train_step(_step_config(cfg), None)
  step()  # compile
  start, n = time.perf_counter(), 10
  for _ in range(n):
    step()
  info["loss"]()
  consumed = info["tokens_per_step"] * n / (time.perf_counter() - start)
  print(json.dumps({"suite": "mixture", "sources": 3, **rate,
                    "train_step_tokens_per_s": round(consumed),
                    "ratio": round(rate["tokens_per_s"] / consumed, 1)}))


def _step_config(cfg):
  """The tiny preset's training step as `make_train_step` builds it (the mixture is data only)."""
  step_cfg = cfg.copy_and_resolve_references()
  step_cfg.model.vocab_size = step_cfg.data.tokenizer.vocab_size
  return step_cfg


def suite_determinism(cfg, scratch: str) -> None:
  import hashlib  # pylint: disable=import-outside-toplevel
  from gptjax.data import beam_build, workers  # pylint: disable=import-outside-toplevel

  d = cfg.data
  d.shard_chars = 1 << 20
  tok = tokenizer.load_or_train(d, None)

  def built(how: str) -> cache.TokenCache:
    d.cache_dir = os.path.join(scratch, how.replace(" ", "_"))
    if how.startswith("independent"):
      for i in range(3):
        entry = workers.build_worker(d, tok, 3, i)
      return entry
    if how.startswith("beam"):
      return beam_build.build(d, tok, ["--runner=DirectRunner"], num_tasks=3)
    d.build_workers = int(how.split()[0])
    return cache.load_or_build(d, tok)

  for how in ("1 process", "2 processes", "4 processes", "independent workers x3",
              "beam DirectRunner x3"):
    start = time.perf_counter()
    entry = built(how)
    listing = [[s["sha256"] for s in v["shards"]] for v in entry.meta["splits"].values()]
    print(json.dumps({"suite": "determinism", "build": how,
                      "shards": sum(map(len, listing)),
                      "tokens": sum(s["tokens"] for s in entry.meta["splits"].values()),
                      "checksums_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def main(argv):
  del argv
  cfg = _CONFIG.value
  if _SUITE.value == "pipeline":
    return suite_pipeline(cfg)
  with tempfile.TemporaryDirectory() as tmp:
    scratch = _SCRATCH.value or tmp
    os.makedirs(scratch, exist_ok=True)
    {"build": suite_build, "mixture": suite_mixture,
     "determinism": suite_determinism}[_SUITE.value](cfg, scratch)
  return None


if __name__ == "__main__":
  cli.run(main)
