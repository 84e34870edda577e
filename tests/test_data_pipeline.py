"""The Grain pipeline: packing, order, resume, host rows, evaluation batches."""

import json
import random

import numpy as np
import pytest

from configs import tiny
from gptjax.data import cache, pipeline
from gptjax.data import tokenizer as tokenizer_lib
from gptjax.data.errors import DataError

L, B = 16, 4  # sequence length and global batch of most tests
WORDS = ("the of and to in is was for on that with as by it from at this be are an or not have "
         "model token data cache stream batch grain jax device mesh shard loss step seed host "
         "sequence document python code def return class import numpy array value").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pipeline")
  rng = random.Random(0)
  with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
    for _ in range(160):
      f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 50)))}) + "\n")
  d = tiny.get_config().data
  d.source, d.paths, d.val_fraction = "files", str(tmp / "docs.jsonl"), 0.05
  d.cache_dir, d.tokenizer.vocab_size = str(tmp / "cache"), 400
  tok = tokenizer_lib.load_or_train(d, None)
  return d, tok, cache.load_or_build(d, tok)


def make(d, tok, split="train", **kw):
  args = {"seq_len": L, "global_batch": B, "seed": 0, **kw}
  return pipeline.make(d, tok, split, **args)


def take(it, n):
  return [next(it) for _ in range(n)]


def windows(batch):
  """The L + 1 token windows a batch was cut from."""
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_an_epoch_uses_every_packed_window_exactly_once(setup):
  d, tok, entry = setup
  stream = np.asarray(entry.tokens("train"))
  n = len(stream) // (L + 1)
  expected = stream[:n * (L + 1)].reshape(n, L + 1).astype(np.int32)
  assert (expected == tok.eos_id).sum() > n // 4  # documents pack across sequence boundaries
  batches = take(make(d, tok), 2 * n // B + 2)
  for b in batches:
    assert set(b) == {"inputs", "targets"}
    assert b["inputs"].shape == b["targets"].shape == (B, L) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  rows = np.concatenate([windows(b) for b in batches])
  first, second = rows[:n], rows[n:2 * n]
  for epoch in (first, second):  # a permutation of all windows: none lost, none repeated
    np.testing.assert_array_equal(np.unique(epoch, axis=0), np.unique(expected, axis=0))
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, expected))
  assert not np.array_equal(first, expected)  # shuffled
  assert not np.array_equal(first, second)  # and reshuffled each epoch


def test_segment_ids_and_positions_restart_at_each_document(setup):
  d, tok, _ = setup
  d.document_mask = True
  try:
    batch = next(make(d, tok, seq_len=64))
  finally:
    d.document_mask = False
  seg, pos = batch["segment_ids"], batch["positions"]
  assert seg.shape == pos.shape == (B, 64) and seg.dtype == pos.dtype == np.int32
  for row, ids, places in zip(batch["inputs"], seg, pos):
    expected, expected_pos, doc, at = [], [], 1, 0
    for token in row:
      expected.append(doc)
      expected_pos.append(at)
      doc, at = (doc + 1, 0) if token == tok.eos_id else (doc, at + 1)  # the next one starts anew
    assert ids.tolist() == expected
    assert places.tolist() == expected_pos
  assert seg.max() > 1


def test_same_seed_same_batches_other_seed_other_batches(setup):
  d, tok, _ = setup
  a, b, c = (take(make(d, tok, seed=s), 5) for s in (0, 0, 1))
  assert_same(a, b)
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
  ds = pipeline.dataset(d, tok, "train", seq_len=L, global_batch=B, seed=0)
  assert_same([ds[k] for k in range(5)], a)  # batch k depends only on (seed, k)


def test_resume_from_state_continues_exactly(setup):
  d, tok, _ = setup
  uninterrupted = take(make(d, tok), 10)
  it = make(d, tok)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {"next_index": 4}
  resumed = make(d, tok)
  resumed.set_state(state)
  assert_same(take(resumed, 6), uninterrupted[4:])


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [4, 5, 6, 7], [1, 5], [0, 2, 4, 6], [7],
                                  list(range(8))])
def test_a_host_reads_exactly_its_rows_of_the_same_global_batch(setup, rows):
  """Any subset (contiguous or not, shared with other hosts or not): what a mesh assigns."""
  d, tok, _ = setup
  single = take(make(d, tok, global_batch=8), 6)
  mine = take(make(d, tok, global_batch=8, rows=rows), 6)
  for whole, part in zip(single, mine):
    for key in whole:
      np.testing.assert_array_equal(part[key], whole[key][rows])


def test_eval_batches_are_the_val_split_in_order_repeating(setup):
  d, tok, entry = setup
  val = np.asarray(entry.tokens("val"))
  n = len(val) // (L + 1)
  num_batches = n // B + 3  # longer than the split: it repeats
  ds = pipeline.make_eval(d, tok, seq_len=L, global_batch=B, num_batches=num_batches)
  first, second = list(ds), list(ds)
  assert len(first) == num_batches
  assert_same(first, second)
  rows = np.concatenate([windows(b) for b in first])
  in_order = val[:n * (L + 1)].reshape(n, L + 1)
  np.testing.assert_array_equal(rows[:n], in_order)
  np.testing.assert_array_equal(rows[n:2 * n][:len(rows) - n], in_order[:len(rows) - n])
  halves = [list(pipeline.make_eval(d, tok, seq_len=L, global_batch=B, num_batches=2,
                                    rows=rows)) for rows in ([0, 1], [2, 3])]
  np.testing.assert_array_equal(np.concatenate([h[1]["inputs"] for h in halves]),
                                first[1]["inputs"])


def test_worker_processes_give_the_same_batches_and_resume(setup):
  d, tok, _ = setup
  expected = take(make(d, tok), 8)
  d.worker_count = 2
  try:
    it = make(d, tok)
    assert_same(take(it, 4), expected[:4])
    state = json.loads(json.dumps(it.get_state()))
    resumed = make(d, tok)
    resumed.set_state(state)
    assert_same(take(resumed, 4), expected[4:])
  finally:
    d.worker_count = 0


def test_bad_sizes(setup):
  d, tok, _ = setup
  with pytest.raises(ValueError, match="rows must be non-empty indices of a 6-row batch"):
    make(d, tok, global_batch=6, rows=[6])
  with pytest.raises(DataError, match="config.data.val_fraction: the val split has .* tokens, less "
                     "than one sequence"):
    make(d, tok, "val", seq_len=100_000)
