"""Whole documents of the embedded corpus, for tests that train a realistic GPT-2 vocabulary
offline (`gptjax.data.gpt2_bpe.train_vocabulary`, which needs the `hf` extra's `tokenizers`)."""

from gptjax.data import sources


def corpus_texts(chars: int) -> list[str]:
  """Whole documents of the embedded corpus (`sources.embedded_documents`) until `chars` chars."""
  out, total = [], 0
  for text in sources.embedded_documents():
    if total >= chars:
      break
    out.append(text)
    total += len(text)
  return out
