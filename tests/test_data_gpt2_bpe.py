"""GPT-2 byte-level BPE (tiktoken) against the plain-Python oracle and HF's GPT-2 tokenizer."""

import io
import json
import logging
import os
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm
import tiktoken

from configs import tiny
from gptjax.data import cache, gpt2_bpe, sources
from gptjax.data import tokenizer as tokenizer_lib
from gptjax.data.errors import DataError
from helpers import gpt2_vocab

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
# Scripts, emoji sequences, combining marks, digits of other scripts, Unicode spaces, control
# separators (U+001C..U+001F are whitespace to Python's `\s` but not to GPT-2's regex), line ends,
# long pieces, contractions and literal special-token text.
UNICODE_TEXTS = TEXTS + [
    "emoji 😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈 ok 🙂🙂🙂",
    "中文字符和日本語のテキスト、한국어 텍스트。",
    "e\u0301 a\u0308 n\u0303\u0323 ḁ̶̧ cafe\u0301",
    "١٢٣ ٤٥٦ ۱۲۳ १२३ ١٢٣abc x²³ ① ⅷ",
    "a\u00a0b\u00a0\u00a0c \u202f \u3000x \u2028\u2029\x85",
    "line\r\nline\r\n\r\n  \r\n",
    " " * 300 + "x" + " " * 17,
    "\t" * 40 + "\n" * 20 + "\x0b\x0c",
    "x" * 2000 + " " + "1" * 700 + " " + "!" * 500,
    "a<|endoftext|>b <|endoftext|>\n<|endoftext|>",
    "\x1c\x1d\x1e\x1f sep\x1cx \x1f\x1fy",
    "'s 't 're 've 'm 'll 'd 'S 'T don't I'M we'VE",
    "ǅungla ǈ ʰ ˆ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0001d7ce",
    "Ελληνικά русский עברית العربية हिन्दी ไทย",
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


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
  """A realistic vocabulary: 4,000 merges trained by HF tokenizers on 1M characters."""
  return gpt2_bpe.train_vocabulary(gpt2_vocab.corpus_texts(1_000_000), 4000,
                                str(tmp_path_factory.mktemp("trained")))


@pytest.fixture(scope="module")
def permuted_dir(trained_dir, tmp_path_factory):
  """`trained_dir` with its ids shuffled: they no longer follow the merges' order."""
  path = tmp_path_factory.mktemp("permuted")
  with open(os.path.join(trained_dir, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  ids = list(vocab.values())
  random.Random(0).shuffle(ids)
  (path / "vocab.json").write_text(json.dumps(dict(zip(vocab, ids)), ensure_ascii=False),
                                   encoding="utf-8")
  with open(os.path.join(trained_dir, "merges.txt"), encoding="utf-8") as f:
    (path / "merges.txt").write_text(f.read(), encoding="utf-8")
  return str(path)


def write_vocab(path, merges):
  """Writes a byte-level vocabulary whose merged tokens take ids in merge order; returns `path`."""
  vocab = {c: i for i, c in enumerate(gpt2_bpe.bytes_to_unicode().values())}
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  vocab[gpt2_bpe.EOS_TOKEN] = len(vocab)
  path.mkdir(exist_ok=True)
  (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (path / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  return str(path)


def hf_ids(path, texts):
  """HF's GPT-2 tokenizer on `texts`, `<|endoftext|>` in them kept as literal text."""
  from transformers import GPT2Tokenizer  # pylint: disable=import-outside-toplevel

  reference = GPT2Tokenizer.from_pretrained(path, split_special_tokens=True)
  return [reference.encode(t, add_special_tokens=False) for t in texts]


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


def test_token_cache_encodes_in_worker_processes(tok, vocab_dir, tmp_path):
  docs = [f"{TEXTS[i % len(TEXTS)]} doc {i}" for i in range(40)]
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
  d = tiny.get_config().data
  d.source, d.paths, d.cache_dir = "files", str(tmp_path / "d.jsonl"), str(tmp_path / "cache")
  d.val_fraction, d.tokenizer.kind, d.tokenizer.path = 0.1, "gpt2_bpe", vocab_dir
  d.shard_chars, d.build_workers = 300, 2  # many units over two spawned processes
  entry = cache.load_or_build(d, tok)
  assert entry.meta["units"] > 4
  assert entry.meta["key"]["tokenizer_library"]["engine"]["library"] == "tiktoken"
  reference = tok.reference()
  for split in (sources.TRAIN, sources.VAL):
    texts = list(sources.open_corpus(d).texts(split))
    expected = [i for t in texts for i in reference.encode(t) + [tok.eos_id]]
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


@pytest.mark.parametrize("which", ["tiny", "trained", "permuted"])
def test_tiktoken_ids_equal_the_oracle_and_hf_on_varied_unicode(which, request):
  path = request.getfixturevalue({"tiny": "vocab_dir", "trained": "trained_dir",
                                  "permuted": "permuted_dir"}[which])
  tok = gpt2_bpe.GPT2BPETokenizer.from_dir(path)
  ids = tok.encode_batch(UNICODE_TEXTS)
  assert ids == [tok.encode(t) for t in UNICODE_TEXTS]
  assert ids == [tok.reference().encode(t) for t in UNICODE_TEXTS]
  assert ids == hf_ids(path, UNICODE_TEXTS)
  assert tok.decode_batch(ids) == UNICODE_TEXTS
  assert all(tok.eos_id not in seq for seq in ids)


def test_tiktoken_ids_equal_the_oracle_on_the_corpus(trained_dir):
  texts = gpt2_vocab.corpus_texts(300_000)
  tok = gpt2_bpe.GPT2BPETokenizer.from_dir(trained_dir)
  reference = tok.reference()
  assert tok.encode_batch(texts) == [reference.encode(t) for t in texts]


def test_ids_out_of_merge_order_are_mapped_back_exactly(trained_dir, permuted_dir, caplog):
  """tiktoken ranks by merged token, GPT-2 by merge: a renumbered vocabulary still gives GPT-2's
  ids (tiktoken runs on merge-order ranks and its output is mapped back), with one log line."""
  with caplog.at_level(logging.INFO):
    tok = gpt2_bpe.GPT2BPETokenizer.from_dir(permuted_dir)
  assert [r.getMessage() for r in caplog.records if "merge order" in r.getMessage()] == [
      "GPT-2 BPE: vocab.json's ids do not follow merges.txt's order, so tiktoken merges by merge "
      "order and its output is mapped back to vocab.json's ids (exact, a little slower)"]
  text = " ".join(UNICODE_TEXTS)
  ordered = gpt2_bpe.GPT2BPETokenizer.from_dir(trained_dir)
  assert tok.decode(tok.encode(text)) == text
  assert [tok._decoder[i] for i in tok.encode(text)] == [  # pylint: disable=protected-access
      ordered._decoder[i] for i in ordered.encode(text)]  # pylint: disable=protected-access
  assert tok.encode(text) == tok.reference().encode(text) == hf_ids(permuted_dir, [text])[0]


def test_a_token_merges_never_make_from_its_bytes_is_never_produced(tmp_path):
  # 'hel' is made from h + el, but h + e (rank 0) always takes the h first: GPT-2 gives he, l.
  # tiktoken with 'hel' in its table would merge he + l (concatenation in table); it is left out.
  path = write_vocab(tmp_path, [("h", "e"), ("e", "l"), ("h", "el")])
  tok = gpt2_bpe.GPT2BPETokenizer.from_dir(path)
  pieces = lambda ids: [tok._decoder[i] for i in ids]  # pylint: disable=protected-access
  assert pieces(tok.encode("hel")) == ["he", "l"]
  assert pieces(tok.encode("el hel")) == ["el", "Ġ", "he", "l"]
  assert tok.encode("hel hello") == tok.reference().encode("hel hello") == hf_ids(
      path, ["hel hello"])[0]


@pytest.mark.parametrize("merges, problem", [
    ([("h", "e"), ("e", "l"), ("he", "l"), ("h", "el")], "merges 2 and 3 both make 'hel'"),
    ([("he", "l"), ("h", "e")], "merge 0 \\('he l'\\) uses 'he' before the merge that makes it"),
    ([("<|endoftext", "|>")], "merge 0 .* makes <\\|endoftext\\|>, so a document .* fake"),
])
def test_merges_no_engine_reproduces_are_a_data_error(tmp_path, merges, problem):
  path = write_vocab(tmp_path, merges)
  with pytest.raises(DataError, match=f"config.data.tokenizer.path: {problem}"):
    gpt2_bpe.GPT2BPETokenizer.from_dir(path)
  with pytest.raises(DataError, match=f"config.--hf_dir: {problem}"):
    gpt2_bpe.GPT2BPETokenizer.from_dir(path, "--hf_dir")


@pytest.mark.parametrize("which", ["trained", "permuted"])
def test_pickle_round_trip_encodes_identically(which, request):
  tok = gpt2_bpe.GPT2BPETokenizer.from_dir(request.getfixturevalue(f"{which}_dir"))
  again = pickle.loads(pickle.dumps(tok))
  assert again.threaded and again.fingerprint == tok.fingerprint
  assert again.encode_batch(UNICODE_TEXTS) == tok.encode_batch(UNICODE_TEXTS)
  assert again.decode_batch(tok.encode_batch(UNICODE_TEXTS)) == UNICODE_TEXTS


def test_encode_batch_uses_threads(tok):
  assert tok.threaded and tok.num_threads == (os.cpu_count() or 1)
  tok.num_threads = 2
  assert tok.encode_batch(TEXTS * 5) == [tok.encode(t) for t in TEXTS * 5]


def test_cache_identity_records_the_library_and_version(tok):
  identity = tok.cache_identity
  assert identity == {"kind": "gpt2_bpe", "fingerprint": tok.fingerprint,
                      "engine": {"library": "tiktoken", "version": tiktoken.__version__}}
  assert json.loads(json.dumps(identity)) == identity
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=model,
                                 vocab_size=120, model_type="bpe", minloglevel=2)
  sp = tokenizer_lib.SentencePieceTokenizer(model.getvalue())
  assert sp.cache_identity == {"kind": "sentencepiece", "fingerprint": sp.fingerprint,
                               "engine": {"library": "sentencepiece", "version": spm.__version__}}


def test_control_separators_are_not_whitespace(tmp_path):
  """GPT-2's regex (and tiktoken, HF) treat U+001C..U+001F as punctuation; Python's `\\s` would
  take them as whitespace, which the oracle must not."""
  sep = gpt2_bpe.bytes_to_unicode()[0x1c]
  path = write_vocab(tmp_path, [(sep, sep)])
  tok = gpt2_bpe.GPT2BPETokenizer.from_dir(path)
  text = "a \x1c\x1cx\x1c\x1c"
  assert [tok._decoder[i] for i in tok.encode(text)] == [  # pylint: disable=protected-access
      "a", "Ġ", sep * 2, "x", sep * 2]
  assert tok.encode(text) == tok.reference().encode(text) == hf_ids(path, [text])[0]
