"""The embedded corpus (Python's own docs and sources) is big enough to train the tiny preset."""

import time

from configs import tiny
from gptjax.data import cache, sources, stats
from gptjax.data import tokenizer as tokenizer_lib


def test_embedded_corpus_gives_five_million_tokens_with_an_8k_vocabulary(tmp_path):
  d = tiny.get_config().data  # cache_dir '' = $GPTJAX_CACHE: built once (~15 s), then reused
  assert (d.source, d.tokenizer.vocab_size) == ("embedded", 8192)
  start = time.perf_counter()
  tok = tokenizer_lib.load_or_train(d, str(tmp_path))
  entry = cache.load_or_build(d, tok)
  seconds = time.perf_counter() - start
  assert tok.vocab_size == 8192
  train, val = entry.meta["splits"]["train"], entry.meta["splits"]["val"]
  assert train["tokens"] >= 5_000_000, train
  assert val["documents"] >= 10 and val["tokens"] >= 50_000, val
  s = stats.describe(entry.meta, entry.tokens(sources.TRAIN), tok.byte_ids)
  assert s["byte_fallback_rate"] < 0.01 and s["tokens_used"] > 7000
  assert 2.5 < s["chars_per_token"] < 5.0
  assert seconds < 90, f"tokenizer + cache took {seconds:.0f} s"
  doc = next(sources.open_corpus(d).texts(sources.TRAIN))
  assert tok.decode(tok.encode(doc)) == doc
