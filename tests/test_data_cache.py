"""The token cache: exact token streams over shards, keyed reuse, byte-identical parallel builds,
checked shards, and nothing half-written on failure."""

from concurrent import futures
import json
import os
import random

import numpy as np
import pytest

from configs import tiny
from gptjax.data import cache, pipeline, shards, sources, stats, workers
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
  d.tokenizer.vocab_size, d.shard_chars = 400, 3000  # about 8 shards of the 150 documents
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
    listed = entry.meta["splits"][split]
    assert {k: listed[k] for k in ("documents", "tokens", "chars", "bytes")} == {
        "documents": len(expected), "tokens": len(tokens), "chars": sum(map(len, expected)),
        "bytes": sum(len(t.encode()) for t in expected)}
    assert sum(s["tokens"] for s in listed["shards"]) == len(tokens)
  assert len(entry.meta["splits"]["train"]["shards"]) > 4  # the stream crosses shards
  key = entry.meta["key"]
  assert key["unicode"] == __import__("unicodedata").unidata_version
  assert key["tokenizer_library"]["engine"] == {"library": "sentencepiece",
                                                "version": __import__("sentencepiece").__version__}
  assert entry.meta["splits"]["val"]["documents"] == 15
  train, val = set(corpus.texts(sources.TRAIN)), set(corpus.texts(sources.VAL))
  assert not train & val and len(train | val) == len(set(docs))


def test_reuse_and_keys(setup):
  tmp, _, d, tok = setup
  first = cache.load_or_build(d, tok)
  shard = os.path.join(first.path, first.meta["splits"]["train"]["shards"][0]["file"])
  mtime = os.stat(shard).st_mtime_ns
  again = cache.load_or_build(d, tok)
  assert again.path == first.path and os.stat(shard).st_mtime_ns == mtime
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
  np.save(os.path.join(leftover, "train-000000.npy"), np.zeros(3, np.uint16))
  os.remove(os.path.join(entry.path, shards.MANIFEST))  # an entry without manifest is incomplete
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
  s = stats.describe(entry.meta, entry.stream("train"), tok.byte_ids)
  assert s["unigram_entropy_bits"] == pytest.approx(s["unigram_entropy_nats"] / np.log(2))
  assert 0 < s["unigram_entropy_nats"] < np.log(tok.vocab_size)
  assert s["byte_fallback_rate"] == 0.0  # every character of this corpus is in the vocabulary
  assert s["train_documents"] == 135 and s["tokens_per_document"] > 3


def test_a_stream_reads_its_shards_as_one_array(tmp_path):
  rng = np.random.default_rng(0)
  parts = [rng.integers(0, 60_000, n).astype(np.uint16) for n in (5, 1, 0, 17, 3)]
  paths = [str(tmp_path / f"{i}.npy") for i in range(len(parts))]
  for path, part in zip(paths, parts):
    np.save(path, part)
  whole = np.concatenate(parts)
  stream = shards.Stream(paths, [len(p) for p in parts], np.uint16)
  assert len(stream) == len(whole)
  for a in range(len(whole) + 1):
    for b in (a, a + 1, a + 6, a + 20, len(whole) + 3):
      np.testing.assert_array_equal(stream[a:b], whole[a:b])
  np.testing.assert_array_equal(np.asarray(stream), whole)
  with pytest.raises(TypeError, match="contiguous slices"):
    stream[::2]  # pylint: disable=pointless-statement


def test_npy_bytes_are_the_split_saved_as_one_npy_file(setup, tmp_path):
  """Run fingerprints (first and last MiB of each split) keep their format-1 values."""
  _, _, d, tok = setup
  entry = cache.load_or_build(d, tok)
  np.save(tmp_path / "train.npy", entry.tokens("train"))
  data = (tmp_path / "train.npy").read_bytes()
  for head in (100, 1000, 5000, len(data), 1 << 20):
    assert entry.npy_bytes("train", head) == data[:head] + data[max(0, len(data) - head):]


def checksums(entry):
  return {split: [(s["file"], s["tokens"], s["sha256"]) for s in info["shards"]]
          for split, info in entry.meta["splits"].items()}


def test_builds_are_byte_identical_for_any_number_of_workers(setup, tmp_path):
  """One, two and four processes, and three independent workers (as SLURM tasks would run, one
  of them failing and run again) give the same shards, compared through the manifest."""
  _, _, d, tok = setup
  reference = cache.load_or_build(d, tok)
  assert reference.meta["units"] > 4
  for n in (2, 4):
    local = data_config(tmp_path / str(n), d.paths, build_workers=n)
    assert checksums(cache.load_or_build(local, tok)) == checksums(reference)

  shared = data_config(tmp_path / "three", d.paths)
  assert workers.build_worker(shared, tok, 3, 1) is None  # others have not finished
  with pytest.raises(DataError, match=r"workers \[0, 2\] of 3 have not finished"):
    workers.commit_workers(shared, tok, 3)
  staging = workers.staging_path(shared, sources.open_corpus(shared))
  built = sorted(os.listdir(staging))
  assert "unit-000001.json" in built and "unit-000000.json" not in built
  assert workers.build_worker(shared, tok, 3, 0) is None
  entry = workers.build_worker(shared, tok, 3, 2)  # the last one commits
  assert entry is not None and not os.path.exists(staging)
  assert checksums(entry) == checksums(reference)
  assert sorted(os.listdir(entry.path)) == sorted(
      [cache.BUILD, shards.MANIFEST] + [s[0] for v in checksums(entry).values() for s in v])
  assert workers.commit_workers(shared, tok, 3).path == entry.path  # done: the entry, again


def test_workers_that_disagree_on_settings_are_stopped(setup, tmp_path):
  _, _, d, tok = setup
  first = data_config(tmp_path, d.paths)
  assert workers.build_worker(first, tok, 2, 0) is None
  other = data_config(tmp_path, d.paths, val_fraction=0.2)
  with pytest.raises(DataError, match=r"config.data: this worker's settings differ .*"
                     r"key.corpus.val_fraction: 0.1 \(first\) vs 0.2 \(this worker\)"):
    workers.build_worker(other, tok, 2, 1)
  with pytest.raises(DataError, match=r"num_workers: 2 \(first\) vs 3"):
    workers.build_worker(first, tok, 3, 1)
  with pytest.raises(DataError, match=r"config.data.build_workers: worker 2 of 2 does not exist"):
    workers.build_worker(first, tok, 2, 2)


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_damaged_shard_is_refused(setup, tmp_path, damage):
  _, _, d, tok = setup
  d = data_config(tmp_path, d.paths)
  entry = cache.load_or_build(d, tok)
  name = entry.meta["splits"]["train"]["shards"][2]["file"]
  path = os.path.join(entry.path, name)
  data = bytearray(open(path, "rb").read())
  if damage == "flip":
    data[-3] ^= 1
    open(path, "wb").write(data)
  elif damage == "truncate":
    open(path, "wb").write(data[:-2])
  else:
    os.remove(path)
  with pytest.raises(DataError, match=rf"config.data.cache_dir: shard {name} .* it is refused"):
    cache.load_or_build(d, tok)
  with pytest.raises(DataError, match="it is refused"):
    pipeline.make(d, tok, "train", seq_len=16, global_batch=2, seed=0)
  if damage == "flip":  # sizes alone cannot see a flipped bit; the opt-out says so in the log
    d.verify_shards = False
    assert cache.load_or_build(d, tok).path == entry.path


def test_a_beam_build_is_byte_identical_to_a_local_one(setup, tmp_path):
  """The Apache Beam pipeline (DirectRunner here; Dataflow, Flink or Spark elsewhere)."""
  from gptjax.data import beam_build  # pylint: disable=import-outside-toplevel
  _, _, d, tok = setup
  reference = cache.load_or_build(d, tok)
  beam_d = data_config(tmp_path, d.paths)
  entry = beam_build.build(beam_d, tok, ["--runner=DirectRunner"], num_tasks=3)
  assert checksums(entry) == checksums(reference)
  assert json.load(open(os.path.join(entry.path, cache.BUILD)))["workers"] == 3
