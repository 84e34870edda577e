"""Tokenizes a config's corpus once into the sharded token cache and prints its statistics.

Usage:
  python scripts/prepare_data.py --config=configs/tiny.py --workdir=runs/tiny
  # N independent workers (SLURM array tasks, the hosts of a run), sharing data.cache_dir:
  python scripts/prepare_data.py --config=... --workdir=... --num_workers=N --worker_index=$i
  python scripts/prepare_data.py --config=... --workdir=... --num_workers=N --commit
  # an Apache Beam pipeline (pip install 'gptjax[beam]'); runner options after --:
  python scripts/prepare_data.py --config=... --workdir=... --beam -- --runner=DirectRunner

The tokenizer is saved in the workdir; the token cache goes to data.cache_dir (see configs/base.py).
With --num_workers, worker i builds every N-th unit of the corpus; the last worker to finish checks
every shard and commits the manifest (or run --commit once all have finished). A failed worker is
run again: the units it finished are kept.
"""

import time

from absl import flags
from ml_collections import config_flags

from gptjax import cli, storage
from gptjax.data import cache, sources, stats, tokenizer, workers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; the tokenizer is saved there.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Independent workers of the build (0 = "
                                    "build here, with data.build_workers processes).")
_WORKER_INDEX = flags.DEFINE_integer("worker_index", -1, "This worker's index, 0 to N - 1.")
_COMMIT = flags.DEFINE_bool("commit", False, "Check the finished workers' shards and commit.")
_BEAM = flags.DEFINE_bool("beam", False, "Build with an Apache Beam pipeline (arguments after "
                          "-- go to Beam, e.g. --runner=DirectRunner).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  with storage.mirrored(_WORKDIR.value, delete_steps=False) as workdir:  # a URL: its local copy
    _prepare(argv, workdir)


def _prepare(argv, workdir):
  d = _CONFIG.value.data
  start = time.perf_counter()
  tok = tokenizer.load_or_train(d, workdir)
  tok_seconds = time.perf_counter() - start
  start = time.perf_counter()
  if _BEAM.value:
    from gptjax.data import beam_build  # pylint: disable=import-outside-toplevel
    entry = beam_build.build(d, tok, argv[1:])
  elif _NUM_WORKERS.value and _COMMIT.value:
    entry = workers.commit_workers(d, tok, _NUM_WORKERS.value)
  elif _NUM_WORKERS.value:
    entry = workers.build_worker(d, tok, _NUM_WORKERS.value, _WORKER_INDEX.value)
    if entry is None:
      print(f"worker {_WORKER_INDEX.value} of {_NUM_WORKERS.value} done in "
            f"{time.perf_counter() - start:.1f} s; the last worker to finish commits")
      return
  else:
    entry = cache.load_or_build(d, tok)
  cache_seconds = time.perf_counter() - start
  s = stats.describe(entry.meta, entry.stream(sources.TRAIN), tok.byte_ids)
  shard_count = sum(len(v["shards"]) for v in entry.meta["splits"].values())
  rows = [
      ("tokenizer", f"{tok.kind}, {tok.vocab_size} tokens: {tok.origin} ({tok_seconds:.1f} s)"),
      ("token cache", f"{entry.path}: {shard_count} shards (ready in {cache_seconds:.1f} s)"),
      ("documents", f"train {s['train_documents']:,}, val {s['val_documents']:,}"),
      ("tokens", f"train {s['train_tokens']:,}, val {s['val_tokens']:,}"),
      ("tokens/document", f"{s['tokens_per_document']:,.1f}"),
      ("characters/token", f"{s['chars_per_token']:.3f}"),
      ("unigram entropy", f"{s['unigram_entropy_bits']:.4f} bits/token = "
                          f"{s['unigram_entropy_nats']:.4f} nats/token"),
      ("byte fallback", f"{100 * s['byte_fallback_rate']:.4f}% of tokens"),
      ("vocabulary used", f"{s['tokens_used']:,} of {s['vocab_size']:,} ids"),
  ]
  for name, value in rows:
    print(f"{name:<17} {value}")


if __name__ == "__main__":
  cli.run(main)
