"""Tokenizes a config's corpus once (training the tokenizer if needed) and prints its statistics.

Usage: python scripts/prepare_data.py --config=configs/tiny.py --workdir=runs/tiny
The tokenizer is saved in the workdir; the token cache goes to data.cache_dir (see configs/base.py).
"""

import time

from absl import flags
from ml_collections import config_flags

from gptjax import cli
from gptjax.data import cache, sources, stats, tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; the tokenizer is saved there.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  d = _CONFIG.value.data
  start = time.perf_counter()
  tok = tokenizer.load_or_train(d, _WORKDIR.value)
  tok_seconds = time.perf_counter() - start
  start = time.perf_counter()
  entry = cache.load_or_build(d, tok)
  cache_seconds = time.perf_counter() - start
  s = stats.describe(entry.meta, entry.tokens(sources.TRAIN), tok.byte_ids)
  rows = [
      ("tokenizer", f"{tok.kind}, {tok.vocab_size} tokens: {tok.origin} ({tok_seconds:.1f} s)"),
      ("token cache", f"{entry.path} (built in {entry.meta['seconds']:.1f} s; "
                      f"ready in {cache_seconds:.1f} s)"),
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
