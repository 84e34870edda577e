"""Data for gptjax: sources -> tokenizer -> token cache -> Grain pipeline.

- `sources`: documents from the embedded corpus (Python's own docs and sources), local
  .txt/.jsonl/.parquet files, or a prepared TFDS dataset; held-out documents for validation.
- `tokenizer`: `load_or_train(cfg.data, workdir)`: SentencePiece, or GPT-2 BPE (`gpt2_bpe`).
- `cache`: each corpus tokenized once into checksummed shards (`shards`), built locally, by
  independent workers (`workers`) or with Apache Beam (`beam_build`), byte-identical whoever
  builds it.
- `pipeline`: `make(...)` / `make_eval(...)`: packed sequences, this host's slice of each batch.
- `mixture`: weighted mixtures of sources with staged weights; `training`: what a pre-training
  run reads (train iterator, validation per source, the stream's fingerprint).
- `stats`: `unigram_entropy(tokens, vocab_size)` and corpus statistics.
- `errors`: `DataError`, the `ValueError` every bad setting or input raises.
"""
