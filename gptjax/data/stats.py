"""Statistics of a tokenized corpus: sizes, unigram entropy, byte-fallback rate.

The unigram entropy H = -sum_v p(v) log p(v) of the token distribution is the cross-entropy of the
best model that ignores context. A language model that learns anything beyond token frequencies
must reach a validation loss below it, which makes it the baseline a training test checks against.
"""

import math
from typing import Any

import numpy as np


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
  """Occurrences of each id in `tokens` (int64 [vocab_size]); reads memory maps in chunks."""
  counts = np.zeros(vocab_size, np.int64)
  for start in range(0, len(tokens), chunk):
    counts += np.bincount(np.asarray(tokens[start:start + chunk]), minlength=vocab_size)
  return counts


def entropy(counts: np.ndarray) -> float:
  """Entropy in nats of the distribution proportional to `counts`."""
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Unigram entropy of a token stream, in nats per token.

  Args:
    tokens: int array of token ids, any shape (flattened).
    vocab_size: ids are in [0, vocab_size).

  Returns:
    -sum_v p(v) ln p(v) with p the empirical token frequencies: the loss, in nats, of the best
    context-free predictor, which a trained model's loss on the same text should beat.
  """
  return entropy(token_counts(np.ravel(tokens), vocab_size))


def describe(meta: dict[str, Any], train_tokens: np.ndarray,
             byte_ids: np.ndarray) -> dict[str, Any]:
  """Corpus statistics for a report.

  Args:
    meta: a token cache's `meta` (per-split documents, tokens, chars).
    train_tokens: the train token stream.
    byte_ids: the tokenizer's byte-fallback ids (empty if it has none).

  Returns:
    A flat dict: documents/tokens/chars per split, tokens per document, characters per token,
    unigram entropy of the train split in nats and bits per token, and the byte-fallback rate (the
    fraction of train tokens that are raw bytes, i.e. characters the vocabulary lacked).
  """
  counts = token_counts(train_tokens, meta["vocab_size"])
  nats = entropy(counts)
  out: dict[str, Any] = {}
  for split, s in meta["splits"].items():
    out[f"{split}_documents"] = s["documents"]
    out[f"{split}_tokens"] = s["tokens"]
    out[f"{split}_chars"] = s["chars"]
  train = meta["splits"]["train"]
  out["tokens_per_document"] = train["tokens"] / max(train["documents"], 1)
  out["chars_per_token"] = train["chars"] / max(train["tokens"], 1)
  out["unigram_entropy_nats"] = nats
  out["unigram_entropy_bits"] = nats / math.log(2)
  out["byte_fallback_rate"] = float(counts[byte_ids].sum() / max(counts.sum(), 1))
  out["tokens_used"] = int((counts > 0).sum())
  out["vocab_size"] = meta["vocab_size"]
  return out
