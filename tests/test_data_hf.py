"""Hugging Face `datasets` as a source: read whole into the token cache, or streamed with resume.

Everything is local: the tests write Parquet, JSON Lines and Arrow files and never reach the Hub.
"""

import json
import random

import numpy as np
import pytest

from configs import tiny
from gptjax.data import cache, hf_source, pipeline, sources, training
from gptjax.data.errors import DataError
from test_data_pipeline import assert_same, take, windows

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

L, B = 24, 4  # sequence length and global batch
W = L + 1
WORDS = ("the of and to in is was for on that with as by it from at this be are an or not have "
         "model token data cache stream batch grain héllo naïve 数据 ✓ shard loss step").split()


class Bytes:
  """A byte-level tokenizer: ids are UTF-8 bytes + 4, EOS is 3. Fast, and obviously exact."""

  kind, threaded, vocab_size = "bytes", False, 260
  pad_id, bos_id, eos_id = 0, 2, 3
  fingerprint = "bytes-v1"
  cache_identity = {"kind": "bytes"}

  def encode(self, text):
    return [b + 4 for b in text.encode("utf-8")]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]


TOK = Bytes()


def go_offline(monkeypatch):
  """No test may reach the Hub: a name not in the local cache fails at once."""
  import huggingface_hub.constants  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  go_offline(monkeypatch)


def make_docs(n, seed):
  rng = random.Random(seed)
  docs = [" ".join(rng.choices(WORDS, k=rng.choice([2, 5, 9, 30, 80]))) for _ in range(n)]
  docs[3], docs[10] = "", "  \n "  # empty documents are skipped everywhere
  return docs


TRAIN_DOCS, VAL_DOCS = make_docs(90, 0), make_docs(12, 1)


def nonempty(docs):
  return [t for t in docs if t and t.strip()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The same documents as Parquet (two files, with a null), JSON Lines and an Arrow file."""
  tmp = tmp_path_factory.mktemp("hf")
  half = len(TRAIN_DOCS) // 2
  (tmp / "pq").mkdir()
  pq.write_table(pa.table({"text": TRAIN_DOCS[:half], "id": list(range(half))}),
                 tmp / "pq" / "train-0.parquet", row_group_size=7)
  pq.write_table(pa.table({"text": TRAIN_DOCS[half:] + [None]}), tmp / "pq" / "train-1.parquet")
  pq.write_table(pa.table({"text": VAL_DOCS}), tmp / "pq" / "val.parquet")
  with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
    for i, text in enumerate(TRAIN_DOCS):
      f.write(json.dumps({"body": text, "n": i}) + "\n")
  with open(tmp / "val.jsonl", "w", encoding="utf-8") as f:
    for text in VAL_DOCS:
      f.write(json.dumps({"body": text}) + "\n")
  datasets.Dataset.from_dict({"text": TRAIN_DOCS}).save_to_disk(str(tmp / "arrow"))
  named = tmp / "named"  # a dataset folder, loaded by name: splits from the file names
  named.mkdir()
  pq.write_table(pa.table({"text": TRAIN_DOCS}), named / "train.parquet")
  pq.write_table(pa.table({"text": VAL_DOCS}), named / "validation.parquet")
  return tmp


def config(tmp, **overrides):
  d = tiny.get_config().data
  d.source, d.val_fraction, d.prefetch = "hf", 0.0, 2
  d.cache_dir, d.hf_cache_dir = str(tmp / "gptjax-cache"), str(tmp / "hf-cache")
  for key, value in overrides.items():
    d[key] = value
  return d


def parquet_config(tmp, **overrides):
  return config(tmp, hf_files=f"{tmp}/pq/train-*.parquet", **overrides)


def streamed(tmp, **overrides):
  return parquet_config(tmp, hf_streaming=True, hf_val_files=f"{tmp}/pq/val.parquet",
                        **overrides)


def split_texts(corpus):
  out = {sources.TRAIN: [], sources.VAL: []}
  for split, text in corpus.documents():
    out[split].append(text)
  return out


def reference_tokens(docs):
  """Each document's tokens followed by EOS, concatenated: what the cache stores."""
  return np.asarray([t for doc in nonempty(docs) for t in TOK.encode(doc) + [TOK.eos_id]],
                    np.int32)


def reference_windows(docs):
  tokens = reference_tokens(docs)
  n = len(tokens) // W
  return tokens[:n * W].reshape(n, W)


def make(d, split="train", **kw):
  return pipeline.make(d, TOK, split, **{"seq_len": L, "global_batch": B, "seed": 0, **kw})


# ---- read whole ---------------------------------------------------------------------------------
def test_files_of_each_format_give_the_documents_of_the_files(files):
  reference = {  # read independently of datasets
      "pq/train-*.parquet": [t for f in ("train-0", "train-1")
                             for t in pq.read_table(files / "pq" / f"{f}.parquet")
                             .column("text").to_pylist()],
      "docs.jsonl": [json.loads(line)["body"] for line in open(files / "docs.jsonl",
                                                               encoding="utf-8")],
      "arrow/*.arrow": [t for f in sorted((files / "arrow").glob("*.arrow"))
                        for t in pa.ipc.open_stream(f).read_all().column("text").to_pylist()],
  }
  for glob, docs in reference.items():
    d = config(files, hf_files=f"{files}/{glob}", text_key="body" if "jsonl" in glob else "text")
    corpus = sources.open_corpus(d)
    assert split_texts(corpus) == {"train": nonempty(docs), "val": []}
    assert nonempty(docs) == nonempty(TRAIN_DOCS)
    assert corpus.fingerprint["source"] == "hf"
    assert corpus.fingerprint["datasets"] == datasets.__version__
    assert [f for f, _, _ in corpus.fingerprint["files"]] == sorted(
        str(p) for p in files.glob(glob))


def test_held_out_and_named_validation_documents(files):
  corpus = sources.open_corpus(parquet_config(files, val_fraction=0.1))
  texts = split_texts(corpus)
  expected = list(sources._hold_out(nonempty(TRAIN_DOCS), 0.1))  # pylint: disable=protected-access
  assert texts["val"] == [t for s, t in expected if s == "val"] and len(texts["val"]) == 8
  assert texts["train"] == [t for s, t in expected if s == "train"]
  assert list(corpus.texts("val")) == texts["val"]
  named = sources.open_corpus(parquet_config(files, hf_val_files=f"{files}/pq/val.parquet",
                                             max_docs=20))
  assert split_texts(named) == {"train": nonempty(TRAIN_DOCS)[:20], "val": nonempty(VAL_DOCS)}
  assert list(named.texts("val")) == nonempty(VAL_DOCS)
  assert named.fingerprint != corpus.fingerprint


def test_a_dataset_name_resolved_by_datasets(files):
  d = config(files, hf_name=str(files / "named"), hf_val_split="validation")
  corpus = sources.open_corpus(d)
  assert split_texts(corpus) == {"train": nonempty(TRAIN_DOCS), "val": nonempty(VAL_DOCS)}
  assert set(corpus.fingerprint["fingerprints"]) == {"train", "val"}
  assert sources.open_corpus(d).fingerprint == corpus.fingerprint
  d.hf_streaming = True  # streamed: identified by the builder's hash, read in order
  corpus = sources.open_corpus(d)
  assert corpus.fingerprint["hash"] and "fingerprints" not in corpus.fingerprint
  assert list(corpus.texts("val")) == nonempty(VAL_DOCS)
  got = np.concatenate([windows(b) for b in take(make(d), 5)])
  np.testing.assert_array_equal(got, reference_windows(TRAIN_DOCS)[:5 * B])
  d.hf_val_split = "test"
  with pytest.raises(DataError, match=r"config.data.hf_val_split: .* has no split 'test' \(it "
                     r"has \['train', 'validation'\]\)"):
    make(d)
  d.hf_streaming = False
  with pytest.raises(DataError, match=r"config.data.hf_val_split: .* has no split 'test' \(it "
                     r"has \['train', 'validation'\]\)"):
    sources.open_corpus(d)


def test_the_token_cache_of_an_hf_source_is_the_tokenized_documents(files):
  d = parquet_config(files, hf_val_files=f"{files}/pq/val.parquet")
  entry = cache.load_or_build(d, TOK)
  np.testing.assert_array_equal(entry.tokens("train"), reference_tokens(TRAIN_DOCS))
  np.testing.assert_array_equal(entry.tokens("val"), reference_tokens(VAL_DOCS))
  assert entry.meta["key"]["corpus"]["source"] == "hf"


def test_a_mixture_source_may_read_hf(files):
  import ml_collections  # pylint: disable=import-outside-toplevel

  d = config(files, source="embedded", max_docs=30)
  with d.unlocked():
    d.mixture.web = ml_collections.ConfigDict({"weight": 0.5, "source": "hf",
                                               "hf_files": f"{files}/pq/train-*.parquet"})
    d.mixture.code = ml_collections.ConfigDict({"weight": 0.5})
  stream = training.Stream(d, TOK, seq_len=L, micro_batch=B, seed=0)
  assert set(stream.entries()) == {"web", "code"}
  batch = next(stream.train(np.arange(B)))
  assert batch["inputs"].shape == (B, L)


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"hf_files": "{tmp}/nothing/*.parquet"}, "config.data.hf_files: the glob .* matches no files"),
    ({"hf_files": "{tmp}/missing.parquet"}, "config.data.hf_files: .*missing.parquet' is not a "
     "file"),
    ({"hf_files": "{tmp}/notes.txt"}, r"config.data.hf_files: .*notes.txt' has no datasets "
     r"builder for its extension. Use .parquet/.json/.jsonl/.arrow files"),
    ({"hf_files": "{tmp}/docs.jsonl,{tmp}/pq/val.parquet"}, "config.data.hf_files: mixes json and "
     "parquet files"),
    ({}, "config.data.hf_name: is empty and so is data.hf_files"),
    ({"hf_files": "{tmp}/docs.jsonl", "hf_name": "x"}, "config.data.hf_files: and data.hf_name "
     "are both set"),
    ({"hf_files": "{tmp}/docs.jsonl", "hf_val_split": "validation"}, "config.data.hf_val_split: "
     "is 'validation' but applies to data.hf_name"),
    ({"hf_name": "no-such-org/no-such-dataset"}, r"config.data.hf_name: datasets cannot load the "
     r"dataset 'no-such-org/no-such-dataset': ConnectionError: .*Hub"),
    ({"hf_files": "{tmp}/docs.jsonl", "hf_streaming": True}, "config.data.hf_val_files: is empty "
     "but data.hf_streaming=True"),
    ({"hf_name": "x", "hf_streaming": True}, "config.data.hf_val_split: is empty but "
     "data.hf_streaming=True"),
    ({"hf_files": "{tmp}/docs.jsonl", "hf_shuffle_buffer": -1}, "config.data.hf_shuffle_buffer"),
])
def test_bad_settings_name_the_setting(files, overrides, message):
  (files / "notes.txt").write_text("text")
  d = config(files, **{k: v.format(tmp=files) if isinstance(v, str) else v
                       for k, v in overrides.items()})
  with pytest.raises(DataError, match=message):
    sources.open_corpus(d)


def test_a_missing_text_column_lists_the_columns(files):
  for d in (parquet_config(files, text_key="body"), config(files, hf_files=f"{files}/docs.jsonl")):
    corpus = sources.open_corpus(d)
    with pytest.raises(DataError, match=r"config.data.text_key: the train split of the (parquet|"
                       r"json) files of data.hf_files has no column '(body|text)' \(it has "):
      list(corpus.documents())
  with pytest.raises(DataError, match=r"config.data.text_key: .* has no column 'body' \(it has "
                     r"\['id', 'text'\]\)"):
    make(streamed(files, text_key="body"))
  d = config(files, hf_files=f"{files}/docs.jsonl", hf_val_files=f"{files}/val.jsonl",
             hf_streaming=True)
  with pytest.raises(DataError, match=r"config.data.text_key: .* has no column 'text' \(it has "
                     r"\['body', 'n'\]\)"):
    next(make(d))


def test_streaming_cannot_be_cached_mixed_or_split_over_workers(files):
  import ml_collections  # pylint: disable=import-outside-toplevel

  d = streamed(files)
  with pytest.raises(DataError, match="config.data.hf_streaming: is True but this reads a token "
                     "cache"):
    pipeline.dataset(d, TOK, "train", seq_len=L, global_batch=B)
  with pytest.raises(DataError, match="config.data.hf_streaming"):
    training.Stream(d, TOK, seq_len=L, micro_batch=B, seed=0).entries()
  d.worker_count = 2
  with pytest.raises(DataError, match="config.data.worker_count: is 2 but a streamed source"):
    make(d)
  mixed = config(files, source="embedded")
  with mixed.unlocked():
    mixed.mixture.web = ml_collections.ConfigDict({
        "weight": 1.0, "source": "hf", "hf_streaming": True, "hf_files": d.hf_files,
        "hf_val_files": d.hf_val_files})
  with pytest.raises(DataError, match="config.data.mixture.web.hf_streaming: is True but a "
                     "mixture reads its sources at random"):
    next(make(mixed))


# ---- streamed -----------------------------------------------------------------------------------
def epoch_batches():
  return len(reference_windows(TRAIN_DOCS)) // B


def test_streamed_windows_are_the_cache_windows(files):
  expected = reference_windows(TRAIN_DOCS)
  assert (expected == TOK.eos_id).sum() > 50  # documents pack across windows
  cached = cache.load_or_build(parquet_config(files), TOK).tokens("train")
  np.testing.assert_array_equal(cached[:expected.size].reshape(expected.shape), expected)
  for d in (streamed(files), config(files, hf_files=f"{files}/docs.jsonl", text_key="body",
                                    hf_val_files=f"{files}/val.jsonl", hf_streaming=True)):
    n = epoch_batches()
    batches = take(make(d), n + 2)
    for b in batches:
      assert set(b) == {"inputs", "targets"} and b["inputs"].dtype == np.int32
      assert b["inputs"].shape == (B, L)
    got = np.concatenate([windows(b) for b in batches])
    np.testing.assert_array_equal(got[:n * B], expected[:n * B])  # in stream order
    np.testing.assert_array_equal(got[len(expected):], expected[:len(got) - len(expected)])


@pytest.mark.parametrize("rows", [[0, 1], [2, 3], [3], [0, 2], [1, 3, 0]])
def test_a_host_keeps_its_rows_of_the_same_global_batches(files, rows):
  d = streamed(files, hf_shuffle_buffer=6)
  full, mine = take(make(d), 6), take(make(d, rows=rows), 6)
  for a, b in zip(full, mine):
    for k in a:
      np.testing.assert_array_equal(b[k], a[k][rows])


def test_the_shuffle_is_a_seeded_permutation_within_blocks(files):
  expected = reference_windows(TRAIN_DOCS)
  plain = np.concatenate([windows(b) for b in take(make(streamed(files)), 6)])
  np.testing.assert_array_equal(plain, expected[:6 * B])
  unprefetched = take(make(streamed(files, prefetch=0)), 6)  # read in the caller's thread
  np.testing.assert_array_equal(np.concatenate([windows(b) for b in unprefetched]), plain)
  d = streamed(files, hf_shuffle_buffer=8)
  a, b, c = (np.concatenate([windows(x) for x in take(make(d, seed=s), 6)]) for s in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and not np.array_equal(a, plain)
  for start in range(0, 24, 8):  # each block of 8 is a permutation of the same 8 windows
    assert sorted(map(tuple, a[start:start + 8])) == sorted(map(tuple, expected[start:start + 8]))


def document_at(token):
  """(document number, offset in it) of token `token` of the reference stream."""
  for j, doc in enumerate(nonempty(TRAIN_DOCS)):
    n = len(TOK.encode(doc)) + 1
    if token < n:
      return j, token
    token -= n
  raise AssertionError("past the end")


@pytest.mark.parametrize("shuffle, d_fn", [
    (0, streamed),
    (5, streamed),
    (0, lambda tmp, **kw: config(tmp, hf_files=f"{tmp}/docs.jsonl", text_key="body",
                                 hf_val_files=f"{tmp}/val.jsonl", hf_streaming=True, **kw)),
    (7, lambda tmp, **kw: config(tmp, hf_files=f"{tmp}/arrow/*.arrow", hf_streaming=True,
                                 hf_val_files=f"{tmp}/arrow/*.arrow", **kw)),
])
def test_resume_continues_at_the_same_document_and_token(files, shuffle, d_fn):
  d = d_fn(files, hf_shuffle_buffer=shuffle, document_mask=True)
  n = epoch_batches()
  total = n + 3  # past the end of the first epoch
  uninterrupted = take(make(d), total)
  offsets = []
  for k in (0, 1, 2, 5, 9, n // 2, n - 1, n, n + 1):
    it = make(d)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    offsets.append(state["at"]["offset"])
    if not shuffle and k < n:  # the position is the document and token of the next window
      assert (state["at"]["doc"], state["at"]["offset"]) == document_at(k * B * W)
      assert state["epoch"] == 0 and state["window"] == k * B
    resumed = make(d)
    resumed.set_state(state)
    assert_same(take(resumed, total - k), uninterrupted[k:])
  assert any(offsets)  # some positions are inside a document


def test_resume_refuses_another_shuffle_buffer_or_sequence_length(files):
  it = make(streamed(files, hf_shuffle_buffer=4))
  take(it, 3)
  state = it.get_state()
  with pytest.raises(DataError, match="config.data.hf_shuffle_buffer: the stream position was "
                     "saved with shuffle_buffer=4"):
    make(streamed(files, hf_shuffle_buffer=8)).set_state(state)
  with pytest.raises(DataError, match="config.train.seq_len"):
    make(streamed(files, hf_shuffle_buffer=4), seq_len=L + 1).set_state(state)
  with pytest.raises(DataError, match="config.data.hf_files: the saved data position"):
    make(streamed(files)).set_state({"next_index": 3})


def test_streamed_validation_is_the_first_batches_of_the_val_split(files):
  d = streamed(files)
  expected = reference_windows(VAL_DOCS)
  ev = pipeline.make_eval(d, TOK, seq_len=L, global_batch=2, num_batches=3)
  first, second = list(ev), list(ev)
  assert len(first) == 3
  assert_same(first, second)
  np.testing.assert_array_equal(np.concatenate([windows(b) for b in first]), expected[:6])
  many = len(expected) // 2 + 2  # more than the split holds: it repeats, as the cache path's
  got = np.concatenate([windows(b) for b in pipeline.make_eval(d, TOK, seq_len=L, global_batch=2,
                                                               num_batches=many)])
  np.testing.assert_array_equal(got[len(expected):], expected[:len(got) - len(expected)])


def test_the_stream_a_run_reads(files):
  d = streamed(files)
  stream = training.Stream(d, TOK, seq_len=L, micro_batch=B, seed=0)
  logs = []
  (v,) = stream.validation(eval_batches=2, rows=[0, 1], log=logs.append)
  assert (v.name, v.weight) == ("", 1.0) and not logs
  batches = list(v.batches)
  assert len(batches) == 2 and batches[0]["inputs"].shape == (2, L)
  val = nonempty(VAL_DOCS)  # bytes per token of the documents that fill 2 x 4 windows
  tokens, size, i = 0, 0, 0
  while tokens < 2 * B * W:
    tokens, size, i = tokens + len(TOK.encode(val[i])) + 1, size + len(val[i].encode()), i + 1
  assert v.bytes_per_token == pytest.approx(size / tokens)
  (short,) = stream.validation(eval_batches=100, rows=[0, 1], log=logs.append)
  assert "validating on" in logs[0]
  assert len(list(short.batches)) == len(reference_windows(VAL_DOCS)) // B
  fingerprint = stream.fingerprint()
  assert fingerprint == training.Stream(streamed(files), TOK, seq_len=L, micro_batch=B,
                                        seed=1).fingerprint()
  assert fingerprint != training.Stream(streamed(files, text_key="id"), TOK, seq_len=L,
                                        micro_batch=B, seed=0).fingerprint()
  assert_same(take(stream.train(np.arange(B)), 3), take(make(d), 3))


def test_a_streamed_corpus_reads_each_split_in_order(files):
  corpus = sources.open_corpus(streamed(files, max_docs=15))
  assert split_texts(corpus) == {"train": nonempty(TRAIN_DOCS)[:15],
                                 "val": nonempty(VAL_DOCS)}
  assert list(corpus.texts("val")) == nonempty(VAL_DOCS)  # without reading train first
  assert hf_source.streaming(streamed(files)) and not hf_source.streaming(parquet_config(files))


@pytest.mark.slow
def test_a_streamed_run_trains_and_resumes_bit_exactly(tmp_path, monkeypatch):
  """loop.run on a stream: tokenizer trained from it, validation, checkpoints with the stream
  position; a run stopped at step 6 resumes with the losses of the uninterrupted one."""
  import jax  # pylint: disable=import-outside-toplevel

  from gptjax import checkpoint, loop, metrics  # pylint: disable=import-outside-toplevel
  from test_checkpoint import preempt_at  # pylint: disable=import-outside-toplevel
  from test_loop import corpus_cfg  # pylint: disable=import-outside-toplevel

  c = corpus_cfg(tmp_path, steps=10)
  docs = [json.loads(line)["text"] for line in open(tmp_path / "docs.jsonl", encoding="utf-8")]
  pq.write_table(pa.table({"text": docs[:270]}), tmp_path / "train.parquet", row_group_size=50)
  pq.write_table(pa.table({"text": docs[270:]}), tmp_path / "val.parquet")
  c.data.update(source="hf", hf_files=str(tmp_path / "train.parquet"), hf_streaming=True,
                hf_val_files=str(tmp_path / "val.parquet"), hf_shuffle_buffer=16,
                hf_cache_dir=str(tmp_path / "hf"))
  c.train.update(log_every=1, eval_every=5, sample_tokens=0)
  c.checkpoint.update(save_every=3, keep=5)
  one = jax.devices()[:1]
  loop.run(c, str(tmp_path / "reference"), devices=one)
  preempt_at(monkeypatch, 6)
  assert loop.run(c, str(tmp_path / "stopped"), devices=one)["preempted"]
  monkeypatch.undo()
  go_offline(monkeypatch)  # undone with the rest
  loop.run(c, str(tmp_path / "stopped"), devices=one)
  losses = lambda run: {r["step"]: r["loss"] for r in metrics.read(str(tmp_path / run))}
  reference, resumed = losses("reference"), losses("stopped")
  assert set(reference) == set(range(1, 11)) and "val_loss" in metrics.read(
      str(tmp_path / "reference"))[-1]
  assert {s: resumed[s] for s in range(7, 11)} == {s: reference[s] for s in range(7, 11)}
  steps = [r["step"] for r in metrics.read(str(tmp_path / "stopped")) if "loss" in r]
  assert steps == list(range(1, 11))  # resumed at step 7, not started over
  state = checkpoint.Reader(str(tmp_path / "stopped")).meta(9)["data"]
  assert state["batches"] == 9 and state["window"] == 9 * 8 and state["at"]["hf"]


def test_a_streamed_source_is_never_tokenized_into_the_cache(files):
  with pytest.raises(DataError, match="config.data.hf_streaming: is True but this reads a token "
                     "cache"):
    cache.load_or_build(streamed(files), TOK)
