"""GPT-2 byte-level BPE on a tiny vocabulary, against HF's implementation as the reference."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from gptjax.data import cache, gpt2_bpe, sources
from gptjax.data import tokenizer as tokenizer_lib
from gptjax.data.errors import DataError

# Ranks matter: 'h' + 'e' comes before 'h' + 'el', and 'l' + 'l' before 'e' + 'l'.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("in", "g"),
          ("o", "n"), ("Ġ", "w"), ("r", "e"), ("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("l", "l"), ("e", "l"),
          ("h", "el"), ("hel", "l"), ("hell", "o"), ("Ġ", "c"), ("o", "d"), ("od", "e"),
          ("Ġc", "ode"), ("1", "2"), ("'", "s"), ("Ċ", "Ċ"), ("Ã", "©")]
TEXTS = [
    "hello the world's code 123 12 12",
    "  indented\n\n\tcode  \n",
    "héllo wörld 😀 中文 x² ½ ⅷ ١٢٣",
    "they're walking... ¿qué? I'll we've 'quoted' don't",
    "a\u00a0b\u2003c   \n  \r\n x",
    "Hello HELLO hello_there hello-there",
    "",
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("gpt2")
  vocab = {c: i for i, c in enumerate(gpt2_bpe.bytes_to_unicode().values())}
  for a, b in MERGES:
    vocab.setdefault(a + b, len(vocab))
  vocab[gpt2_bpe.EOS_TOKEN] = len(vocab)
  (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (path / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def tok(vocab_dir):
  return gpt2_bpe.GPT2BPETokenizer.from_dir(vocab_dir)


def test_bytes_to_unicode_is_gpt2s_table():
  table = gpt2_bpe.bytes_to_unicode()
  assert len(set(table.values())) == 256
  assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_merges_follow_their_ranks(tok):
  def pieces(text):
    return [tok._decoder[i] for i in tok.encode(text)]  # pylint: disable=protected-access

  assert pieces(" the") == ["Ġthe"]  # Ġ+t (rank 0), h+e (1), then Ġt+he (2)
  assert pieces("hello") == ["he", "ll", "o"]  # h+e (1) takes the h, so h+el never applies
  assert pieces("ell") == ["e", "ll"]  # l+l (12) outranks e+l (13)
  assert pieces(" code") == ["Ġcode"]
  assert pieces("    ") == ["ĠĠĠĠ"]  # Ġ+Ġ twice, then ĠĠ+ĠĠ
  assert pieces("    x") == ["ĠĠ", "Ġ", "Ġ", "x"]  # GPT-2 leaves the last space to the word
  assert pieces("123") == ["12", "3"]
  assert pieces("é") == ["Ã©"]  # a merge of the two UTF-8 bytes


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_match_the_hf_reference(tok, vocab_dir, text):
  from transformers import GPT2Tokenizer  # pylint: disable=import-outside-toplevel

  reference = GPT2Tokenizer.from_pretrained(vocab_dir)
  ids = tok.encode(text)
  assert ids == reference.encode(text)
  assert tok.decode(ids) == text


def test_literal_special_text_is_not_a_special_token(tok):
  ids = tok.encode("a<|endoftext|>b")
  assert tok.eos_id not in ids
  assert tok.decode(ids) == "a<|endoftext|>b"
  assert tok.vocab_size == 256 + len(MERGES) + 1
  assert tok.eos_id == tok.bos_id == tok.pad_id == tok.vocab_size - 1


def test_load_or_train_saves_to_the_workdir(vocab_dir, tmp_path):
  d = tiny.get_config().data
  d.tokenizer.kind, d.tokenizer.path = "gpt2_bpe", vocab_dir
  first = tokenizer_lib.load_or_train(d, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "tokenizer")) == ["merges.txt", "vocab.json"]
  d.tokenizer.path = "/nowhere"  # a resumed run reads the workdir copy
  again = tokenizer_lib.load_or_train(d, str(tmp_path))
  assert again.fingerprint == first.fingerprint
  assert again.encode_batch(TEXTS) == first.encode_batch(TEXTS)
  assert again.decode_batch(again.encode_batch(TEXTS)) == TEXTS


def test_token_cache_encodes_in_worker_processes(tok, vocab_dir, tmp_path, monkeypatch):
  docs = [f"{TEXTS[i % len(TEXTS)]} doc {i}" for i in range(40)]
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
  d = tiny.get_config().data
  d.source, d.paths, d.cache_dir = "files", str(tmp_path / "d.jsonl"), str(tmp_path / "cache")
  d.val_fraction, d.tokenizer.kind, d.tokenizer.path = 0.1, "gpt2_bpe", vocab_dir
  monkeypatch.setattr(cache, "_BATCH_CHARS", 300)  # many batches: the process pool is used
  entry = cache.load_or_build(d, tok)
  for split in (sources.TRAIN, sources.VAL):
    texts = list(sources.open_corpus(d).texts(split))
    expected = [i for t in texts for i in tok.encode(t) + [tok.eos_id]]
    np.testing.assert_array_equal(entry.tokens(split), expected)
  assert entry.meta["splits"]["val"]["documents"] == 4


def test_missing_files(tmp_path):
  d = tiny.get_config().data
  d.tokenizer.kind, d.tokenizer.path = "gpt2_bpe", str(tmp_path)
  with pytest.raises(DataError, match=r"config.data.tokenizer.path: .* lacks \['vocab.json', "
                     r"'merges.txt'\]"):
    tokenizer_lib.load_or_train(d, None)
  (tmp_path / "vocab.json").write_text('{"a": 0}')
  (tmp_path / "merges.txt").write_text("")
  with pytest.raises(DataError, match="is not a byte-level vocabulary"):
    tokenizer_lib.load_or_train(d, None)
