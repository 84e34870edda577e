"""Weighted mixtures: exact proportions, every source read in its own order without gaps or
repeats across stages, batches a function of (seed, step), per-source validation, clear errors."""

import json
import random

import numpy as np
import pytest

from configs import tiny
from gptjax.data import mixture, pipeline, training
from gptjax.data import tokenizer as tokenizer_lib
from gptjax.data.errors import DataError
from helpers import files

L = 16
WORDS = {"prose": "the of and to in is was for on that with as by it from at this be are".split(),
         "code": "def return class import numpy array value self none true false if".split(),
         "web": "click here home page news login search video free best click page".split()}


def write_source(path, words, n_docs, seed):
  rng = random.Random(seed)
  files.write_text(path, "".join(
      json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(5, 40)))}) + "\n"
      for _ in range(n_docs)))


def mixed_config(tmp, weights=(0.5, 0.3, 0.2), stages=""):
  d = tiny.get_config().data
  for i, name in enumerate(WORDS):
    write_source(tmp / f"{name}.jsonl", WORDS[name], 120 + 40 * i, seed=i)
  d.source, d.paths = "files", ",".join(str(tmp / f"{n}.jsonl") for n in WORDS)
  d.val_fraction, d.cache_dir, d.tokenizer.vocab_size = 0.1, str(tmp / "cache"), 300
  with d.unlocked():  # a mixture is defined in a config file (get_config), before it is locked
    for name, w in zip(WORDS, weights):
      d.mixture[name] = {"weight": w, "paths": str(tmp / f"{name}.jsonl")}
  d.mixture_stages = stages
  return d


def add(d, name, **settings):
  with d.unlocked():
    d.mixture[name].update(settings)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mixture")
  d = mixed_config(tmp)
  return tmp, d, tokenizer_lib.load_or_train(d, None)


@pytest.mark.parametrize("weights", [(1, 1), (5, 3, 2), (0.7, 0.0, 0.3), (1e-3, 1.0), (2, 7, 1, 9)])
def test_counts_are_exact_monotone_and_sum_to_n(weights):
  ints = mixture.integer_weights(weights)
  share = np.asarray(weights) / sum(weights)
  prev = [0] * len(weights)
  for n in range(0, 3000):
    c = mixture.counts(n, ints)
    assert sum(c) == n
    assert all(b >= a for a, b in zip(prev, c))  # a source's count never goes back
    bound = (np.arange(len(weights)) + 1) / 2  # each level of the split rounds by a half
    assert np.all(np.abs(np.asarray(c) - n * share) <= bound + 1e-6), (n, c)
    prev = c


def source_windows(src, tok, seed, n):
  """A source's own shuffled windows, read alone: the order the mixture must follow."""
  ds = pipeline.dataset(src.data, tok, "train", seq_len=L, global_batch=1,
                        seed=mixture.source_seed(seed, src.name))
  return [tuple(np.concatenate([b["inputs"][0], b["targets"][0, -1:]])) for b in
          (ds[i] for i in range(n))]


def attribute(rows, streams):
  """Which source each row came from, checking that it is that source's next unread window."""
  at, out = {name: 0 for name in streams}, []
  for row in rows:
    hits = [name for name, s in streams.items() if s[at[name]] == tuple(row)]
    assert len(hits) == 1, f"row {len(out)} is no source's next window ({hits})"
    at[hits[0]] += 1
    out.append(hits[0])
  return out


def test_a_staged_mixture_reads_each_source_in_order_in_the_stage_proportions(setup):
  tmp, _, tok = setup
  d = mixed_config(tmp, stages="10:prose=0.1,code=0.1,web=0.8; 20:code=1")
  batch, steps = 4, 30
  it = pipeline.make(d, tok, "train", seq_len=L, global_batch=batch, seed=3)
  rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
                         for b in (next(it) for _ in range(steps))])
  streams = {s.name: source_windows(s, tok, 3, len(rows)) for s in mixture.sources(d)}
  names = sorted(streams)
  got = attribute(rows, streams)
  # code, prose, web (sorted): the base weights, then stage 10's, then 20's (code alone changed).
  weights = {0: (0.3, 0.5, 0.2), 10: (0.1, 0.1, 0.8), 20: (1.0, 0.1, 0.8)}
  for first, w in weights.items():
    stage = got[first * batch:(first + 10) * batch]
    share = np.asarray(w) / sum(w)
    for n in range(1, len(stage) + 1):
      counts = np.array([stage[:n].count(name) for name in names])
      assert np.all(np.abs(counts - n * share) <= 1.5 + 1e-6), (first, n, counts)


def test_batches_depend_on_seed_and_step_only_and_resume_exactly(setup):
  tmp, _, tok = setup
  d = mixed_config(tmp, stages="3:web=0")
  a = pipeline.make(d, tok, "train", seq_len=L, global_batch=4, seed=0)
  first = [next(a) for _ in range(6)]
  state = a.get_state()
  rest = [next(a) for _ in range(4)]
  b = pipeline.make(d, tok, "train", seq_len=L, global_batch=4, seed=0)
  b.set_state(json.loads(json.dumps(state)))
  for x, y in zip(rest, [next(b) for _ in range(4)]):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  ds = pipeline.dataset(d, tok, "train", seq_len=L, global_batch=4, seed=0, rows=[1, 3])
  np.testing.assert_array_equal(ds[5]["inputs"], first[5]["inputs"][[1, 3]])  # any host's rows
  other = pipeline.make(d, tok, "train", seq_len=L, global_batch=4, seed=1)
  assert not np.array_equal(next(other)["inputs"], first[0]["inputs"])


def test_validation_is_per_source_with_bits_per_byte(setup):
  tmp, d, tok = setup
  stream = training.Stream(d, tok, seq_len=L, micro_batch=4, seed=0)
  sets = stream.validation(2, np.arange(4), print)
  assert [v.name for v in sets] == ["code", "prose", "web"]
  assert sum(v.weight for v in sets) == pytest.approx(1.0)
  assert [v.weight for v in sets] == pytest.approx([0.3, 0.5, 0.2])
  for v in sets:
    entry = stream.entries()[v.name]
    val = entry.tokens("val")
    texts = [t for t in map(json.loads, open(tmp / f"{v.name}.jsonl"))]
    assert v.bytes_per_token == pytest.approx(
        entry.meta["splits"]["val"]["bytes"] / len(val))
    assert 1.0 < v.bytes_per_token < 8.0 and texts
    first = next(iter(v.batches))["inputs"][0]
    np.testing.assert_array_equal(first, val[:L])  # each source's own val split, in order


def test_fingerprints_follow_each_sources_content(setup):
  tmp, d, tok = setup
  one = training.Stream(d, tok, seq_len=L, micro_batch=4, seed=0).fingerprint()
  assert one == training.Stream(mixed_config(tmp), tok, seq_len=L, micro_batch=4,
                                seed=0).fingerprint()
  other = mixed_config(tmp)
  add(other, "web", max_docs=50)
  assert training.Stream(other, tok, seq_len=L, micro_batch=4, seed=0).fingerprint() != one


@pytest.mark.parametrize("change, message", [
    (lambda d: d.mixture.web.update(weight=-1.0), r"data.mixture.web.weight: must be a number"),
    (lambda d: [d.mixture[n].update(weight=0.0) for n in d.mixture], r"data.mixture: every weight"),
    (lambda d: add(d, "web", tokenizer={}), r"data.mixture.web.tokenizer: is not a per-"),
    (lambda d: add(d, "web", pths="x"), r"data.mixture.web.pths: is not a per-source setting"),
    (lambda d: add(d, "web", weight=float("nan")), r"data.mixture.web.weight: must be a number"),
    (lambda d: setattr(d, "mixture_stages", "5:web=0,code=0,prose=0"),
     r"data.mixture_stages: every weight of stage 5 is zero"),
    (lambda d: setattr(d, "mixture_stages", "5:wiki=1"), r"stage 5 names 'wiki'"),
    (lambda d: setattr(d, "mixture_stages", "5:web=1; 5:web=2"), r"stage 5 does not come after"),
    (lambda d: setattr(d, "mixture_stages", "web=1"), r"cannot read the stage 'web=1'"),
    (lambda d: setattr(d, "mixture_stages", "5:web=x"), r"gives 'web' the weight 'x'"),
])
def test_bad_mixture_settings_are_named(setup, change, message):
  tmp, _, tok = setup
  d = mixed_config(tmp)
  change(d)
  with pytest.raises(DataError, match=message):
    pipeline.make(d, tok, "train", seq_len=L, global_batch=4, seed=0)


def test_a_source_without_documents_is_named(setup, tmp_path):
  _, d, tok = setup
  d = mixed_config(tmp_path)
  (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
  d.mixture.code.paths = str(tmp_path / "empty.jsonl")
  with pytest.raises(DataError, match=r"config.data.mixture.code.paths: the corpus has no "
                     "training documents"):
    pipeline.make(d, tok, "train", seq_len=L, global_batch=4, seed=0)


def test_resuming_may_change_later_stages_only(setup):
  tmp, d, _ = setup
  staged = mixed_config(tmp, stages="10:web=0.9")
  assert training.same_past(staged, mixed_config(tmp, stages="10:web=0.9; 30:web=0"), 20) is None
  assert training.same_past(staged, mixed_config(tmp, stages="12:web=0.9"), 20)
  assert training.same_past(staged, mixed_config(tmp, stages="10:web=0.9"), 20) is None
  assert training.same_past(staged, mixed_config(tmp, weights=(0.4, 0.4, 0.2)), 20)
  assert training.same_past(staged, mixed_config(tmp, stages="8:web=0.9"), 9)
  assert training.same_past(d, d, 5) is None
