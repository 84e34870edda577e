"""SentencePiece tokenizers: lossless round trips, caching in the workdir and data cache, errors."""

import os

import pytest

from configs import tiny
from gptjax.data import sources, tokenizer as tokenizer_lib
from gptjax.data.errors import DataError

TEXTS = [
    "Plain English, with punctuation; and (parentheses)!",
    "unicode: héllo wörld, naïve café, 中文字符, Ελληνικά, emoji 😀🚀, combining e\u0301, \u200b",
    "def f(x, *args, **kw):\n    \"\"\"Doc.\"\"\"\n    return {k: v for k, v in kw.items()}  # c\n",
    "\tTabs\tand  double  spaces,   trailing   \n\n\n  leading\r\nCRLF\r\n",
    "   ",
    "",
    "numbers 3.14159 1e-9 0xFF 1_000_000",
    "control \x00\x07\x1b[0m chars and \ufeff BOM",
]


def data_config(tmp_path, **tokenizer):
  d = tiny.get_config().data
  d.cache_dir = str(tmp_path / "cache")
  d.max_docs = 60
  d.tokenizer.vocab_size = 512
  d.tokenizer.train_chars = 200_000
  for key, value in tokenizer.items():
    d.tokenizer[key] = value
  return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tok")
  d = data_config(tmp)
  return d, tokenizer_lib.load_or_train(d, str(tmp / "run"))


@pytest.fixture(scope="module")
def workdir(trained):
  return os.path.join(trained[0].cache_dir, "..", "run")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(trained, text):
  _, tok = trained
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text


def test_batch_methods_and_special_ids(trained):
  _, tok = trained
  assert tok.vocab_size == 512
  assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
  assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
  assert tok.decode_batch(tok.encode_batch(TEXTS)) == TEXTS
  assert tok.decode([tok.eos_id, *tok.encode("ab"), tok.pad_id]) == "ab"  # specials are silent
  assert len(tok.byte_ids) == 256
  assert set(tok.encode("中")) <= set(tok.byte_ids.tolist())  # unseen: byte fallback
  assert tok.encode("\n") == [tok.encode("x\n")[-1]]  # newline is one piece
  assert "trained SentencePiece bpe (512 pieces)" in tok.origin


def test_workdir_copy_wins_on_resume(trained, workdir):
  d, tok = trained
  assert os.path.isfile(os.path.join(workdir, "tokenizer.model"))
  d.tokenizer.vocab_size = 600  # a changed setting must not change a resumed run's tokenizer
  again = tokenizer_lib.load_or_train(d, workdir)
  d.tokenizer.vocab_size = 512
  assert again.fingerprint == tok.fingerprint
  assert again.origin.startswith("loaded from the workdir")


def test_trained_model_is_cached_by_settings(trained, tmp_path):
  d, tok = trained
  cached = tokenizer_lib.load_or_train(d, str(tmp_path / "other_run"))
  assert cached.fingerprint == tok.fingerprint
  assert "cached at" in cached.origin
  d.tokenizer.path = str(tmp_path / "other_run" / "tokenizer.model")
  from_path = tokenizer_lib.load_or_train(d, None)
  d.tokenizer.path = ""
  assert from_path.fingerprint == tok.fingerprint


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_the_same_settings_train_the_same_tokenizer_on_any_machine(tmp_path, monkeypatch,
                                                                   model_type):
  # Hosts of one multi-process run, or a re-run elsewhere, may have different core counts.
  d = data_config(tmp_path, model_type=model_type, vocab_size=800)
  corpus = sources.open_corpus(d)
  fingerprints = set()
  for cores in (1, 4):
    monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
    fingerprints.add(tokenizer_lib.train(corpus, vocab_size=800, model_type=model_type,
                                         train_chars=d.tokenizer.train_chars).fingerprint)
  assert len(fingerprints) == 1


def test_unigram_model(tmp_path):
  d = data_config(tmp_path, model_type="unigram", train_chars=60_000)
  d.max_docs = 20
  tok = tokenizer_lib.load_or_train(d, None)
  assert tok.vocab_size == 512
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text


def test_vocab_too_large_for_the_corpus(tmp_path):
  (tmp_path / "small.txt").write_text("a tiny corpus " * 20)
  d = data_config(tmp_path, vocab_size=5000)
  d.source, d.paths, d.val_fraction = "files", str(tmp_path / "small.txt"), 0.0
  with pytest.raises(DataError, match=r"config.data.tokenizer.vocab_size: 5000 pieces is more than "
                     r"this corpus can fill \(at most \d+ .*Lower data.tokenizer.vocab_size"):
    tokenizer_lib.load_or_train(d, str(tmp_path / "run"))
  d.tokenizer.vocab_size = 100
  with pytest.raises(DataError, match=r"config.data.tokenizer.vocab_size: 100 pieces cannot hold "
                     r".* Use at least 2\d\d\."):
    tokenizer_lib.load_or_train(d, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "tokenizer.model")
  assert not list((tmp_path / "cache").glob("tokenizers/*.model"))


def test_bad_settings(tmp_path):
  d = data_config(tmp_path, path=str(tmp_path / "missing.model"))
  with pytest.raises(DataError, match="config.data.tokenizer.path: .*missing.model' is not a file"):
    tokenizer_lib.load_or_train(d, None)
  (tmp_path / "junk.model").write_bytes(b"not a model")
  d.tokenizer.path = str(tmp_path / "junk.model")
  with pytest.raises(DataError, match="config.data.tokenizer.path: .* not a SentencePiece model"):
    tokenizer_lib.load_or_train(d, None)
  with pytest.raises(DataError, match="config.data.tokenizer.kind: unknown kind 'wordpiece'"):
    tokenizer_lib.load_or_train(data_config(tmp_path, kind="wordpiece"), None)
  with pytest.raises(DataError, match="config.data.tokenizer.model_type: unknown type 'char'"):
    tokenizer_lib.load_or_train(data_config(tmp_path, model_type="char"), None)
  with pytest.raises(DataError, match="config.data.tokenizer.path: is empty but kind='gpt2_bpe'"):
    tokenizer_lib.load_or_train(data_config(tmp_path, kind="gpt2_bpe"), None)
