"""The token cache: exact token streams, keyed reuse, and nothing half-written on failure."""

from concurrent import futures
import json
import os
import random

import numpy as np
import pytest

from configs import tiny
from gptjax.data import cache, sources, stats
from gptjax.data import tokenizer as tokenizer_lib
from gptjax.data.errors import DataError

WORDS = ("the of and to in is was for on that with as by it from at this be are an or not have "
         "model token data cache stream batch grain jax device mesh shard loss step seed host "
         "sequence document python code def return class import numpy array value").split()


def write_jsonl(path, n_docs, seed=0):
  rng = random.Random(seed)
  docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) + "\n" * (i % 3)
          for i in range(n_docs)]
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
  return docs


def data_config(tmp_path, paths, **overrides):
  d = tiny.get_config().data
  d.source, d.paths, d.val_fraction, d.cache_dir = "files", str(paths), 0.1, str(tmp_path / "cache")
  d.tokenizer.vocab_size = 400
  for key, value in overrides.items():
    d[key] = value
  return d


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cache")
  docs = write_jsonl(tmp / "docs.jsonl", 150)
  d = data_config(tmp, tmp / "docs.jsonl")
  return tmp, docs, d, tokenizer_lib.load_or_train(d, None)


def entries(d):
  folder = os.path.join(cache.root(d), "tokens")
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_streams_are_the_documents_each_followed_by_eos(setup):
  _, docs, d, tok = setup
  entry = cache.load_or_build(d, tok)
  corpus = sources.open_corpus(d)
  for split in (sources.TRAIN, sources.VAL):
    tokens = entry.tokens(split)
    assert tokens.dtype == np.uint16 and entry.meta["dtype"] == "uint16"
    expected = list(corpus.texts(split))
    assert tokens[-1] == tok.eos_id and (tokens == tok.eos_id).sum() == len(expected)
    pieces = np.split(np.asarray(tokens), np.flatnonzero(tokens == tok.eos_id) + 1)[:-1]
    assert [tok.decode(p[:-1]) for p in pieces] == expected
    assert entry.meta["splits"][split] == {"documents": len(expected), "tokens": len(tokens),
                                           "chars": sum(map(len, expected))}
  assert entry.meta["splits"]["val"]["documents"] == 15
  train, val = set(corpus.texts(sources.TRAIN)), set(corpus.texts(sources.VAL))
  assert not train & val and len(train | val) == len(set(docs))


def test_reuse_and_keys(setup):
  tmp, _, d, tok = setup
  first = cache.load_or_build(d, tok)
  mtime = os.stat(first.file("train")).st_mtime_ns
  again = cache.load_or_build(d, tok)
  assert again.path == first.path and os.stat(again.file("train")).st_mtime_ns == mtime
  d.val_fraction = 0.2
  other_split = cache.load_or_build(d, tok)
  d.val_fraction = 0.1
  assert other_split.path != first.path
  other_tok = tokenizer_lib.load_or_train(data_config(tmp, d.paths, max_docs=100), None)
  assert cache.load_or_build(d, other_tok).path not in (first.path, other_split.path)
  assert os.path.basename(first.path).startswith("files-")


def test_failure_leaves_no_entry_and_no_temporary_files(setup, tmp_path):
  _, docs, _, tok = setup
  bad = tmp_path / "bad.jsonl"
  bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs) + '{"txt": "late"}\n')
  d = data_config(tmp_path, bad)
  with pytest.raises(DataError, match=r"config.data.text_key: .*bad.jsonl:151 has no field"):
    cache.load_or_build(d, tok)
  assert entries(d) == []


def test_a_killed_build_is_never_trusted(setup, tmp_path):
  _, _, d, tok = setup
  d = data_config(tmp_path, d.paths)
  entry = cache.load_or_build(d, tok)
  leftover = entry.path + ".tmp-999-deadbeef"  # what a build killed before its rename leaves
  os.makedirs(leftover)
  np.save(os.path.join(leftover, "train.npy"), np.zeros(3, np.uint16))
  os.remove(os.path.join(entry.path, cache.META))  # and an entry without meta is incomplete
  rebuilt = cache.load_or_build(d, tok)
  assert rebuilt.path == entry.path and len(rebuilt.tokens("train")) > 3


def test_processes_building_the_same_entry_at_once_all_get_it_whole(setup, tmp_path):
  # The processes of a multi-host run share the cache directory and start together.
  _, _, d, tok = setup
  d = data_config(tmp_path, d.paths)
  with futures.ThreadPoolExecutor(4) as pool:
    built = list(pool.map(lambda _: cache.load_or_build(d, tok), range(4)))
  assert len({b.path for b in built}) == 1 and entries(d) == [os.path.basename(built[0].path)]
  for b in built:
    np.testing.assert_array_equal(b.tokens("train"), built[0].tokens("train"))


def test_empty_corpus(setup, tmp_path):
  _, _, _, tok = setup
  for i in range(3):
    (tmp_path / f"{i}.txt").write_text(" \n\t\n")
  d = data_config(tmp_path, tmp_path / "*.txt", val_fraction=0.0)
  with pytest.raises(DataError, match="config.data.paths: the corpus has no training documents"):
    tokenizer_lib.load_or_train(d, None)
  with pytest.raises(DataError, match="config.data.paths: the corpus has no training documents"):
    cache.load_or_build(d, tok)
  assert entries(d) == []


class CharTokenizer:
  """A tokenizer with ids above 65535, to check the uint32 streams."""

  kind, threaded, vocab_size, bos_id, eos_id, pad_id = "chars", True, 70_000, 0, 1, 0
  fingerprint = "chars-v1"

  def encode_batch(self, texts):
    return [[60_000 + ord(c) % 9_000 for c in t] for t in texts]


def test_large_vocabularies_use_uint32(tmp_path):
  (tmp_path / "a.txt").write_text("abc")
  d = data_config(tmp_path, tmp_path / "a.txt", val_fraction=0.0)
  entry = cache.load_or_build(d, CharTokenizer())
  tokens = entry.tokens("train")
  assert tokens.dtype == np.uint32
  assert tokens.tolist() == [60_000 + ord(c) % 9_000 for c in "abc"] + [1]
  assert cache.token_dtype(65_536) == np.uint16 and cache.token_dtype(65_537) == np.uint32


def test_unigram_entropy_and_statistics(setup):
  _, _, d, tok = setup
  assert stats.unigram_entropy(np.array([3, 3, 3]), 5) == 0.0
  assert stats.unigram_entropy(np.array([[0, 1], [2, 3]]), 4) == pytest.approx(np.log(4))
  assert stats.unigram_entropy(np.array([0, 0, 0, 1]), 2) == pytest.approx(
      -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
  entry = cache.load_or_build(d, tok)
  s = stats.describe(entry.meta, entry.tokens("train"), tok.byte_ids)
  assert s["unigram_entropy_bits"] == pytest.approx(s["unigram_entropy_nats"] / np.log(2))
  assert 0 < s["unigram_entropy_nats"] < np.log(tok.vocab_size)
  assert s["byte_fallback_rate"] == 0.0  # every character of this corpus is in the vocabulary
  assert s["train_documents"] == 135 and s["tokens_per_document"] > 3
