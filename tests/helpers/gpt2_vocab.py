"""Trains a realistic GPT-2-format byte-level BPE vocabulary offline, for tests and benchmarks.

`train_vocab(texts, num_merges, out_dir)` runs Hugging Face `tokenizers`' BPE trainer with GPT-2's
byte-level pre-tokenizer and writes `vocab.json` + `merges.txt` that
`gptjax.data.gpt2_bpe.GPT2BPETokenizer.from_dir` reads. `tokenizers` is a test-only dependency
(it comes with the `hf` extra), so import this module only where it is installed.

    import sys; sys.path.insert(0, "tests")
    from helpers import gpt2_vocab
    gpt2_vocab.train_vocab(texts, 16_000, "/tmp/gpt2_16k")
"""

from collections.abc import Iterable
import itertools
import os

from gptjax.data import gpt2_bpe


def corpus_texts(chars: int) -> list[str]:
  """Whole documents of the embedded corpus (`sources.embedded_documents`) until `chars` chars."""
  from gptjax.data import sources  # pylint: disable=import-outside-toplevel

  out, total = [], 0
  for text in sources.embedded_documents():
    if total >= chars:
      break
    out.append(text)
    total += len(text)
  return out


def train_vocab(texts: Iterable[str], num_merges: int, out_dir: str) -> str:
  """Trains a byte-level BPE with up to `num_merges` merges; writes vocab.json and merges.txt.

  The vocabulary holds `<|endoftext|>` (id 0, as the trainer puts special tokens first), the 256
  byte tokens, then one token per merge in merge order: ids follow merges, as in GPT-2's own files.

  Args:
    texts: training documents.
    num_merges: merges to learn (fewer if the texts run out of pairs seen at least twice).
    out_dir: folder to write into (created if needed).

  Returns:
    `out_dir`.
  """
  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=1 + 256 + num_merges, min_frequency=2, show_progress=False,
      special_tokens=[gpt2_bpe.EOS_TOKEN],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  texts = iter(texts)
  tok.train_from_iterator(iter(lambda: list(itertools.islice(texts, 256)), []), trainer=trainer)
  os.makedirs(out_dir, exist_ok=True)
  tok.model.save(out_dir)
  return out_dir
