"""A few-million-parameter GPT that learns real text on a laptop CPU in minutes.

Trains a SentencePiece tokenizer on the embedded corpus (the Python standard library's docs and
sources: no download) and the model on it. Usage: --config=configs/tiny.py
"""

from configs import base


def get_config(arg: str = ""):
  del arg
  c = base.get_config()
  c.name = "tiny"
  c.model.vocab_size = 8192  # replaced by the trained tokenizer's size
  c.model.ctx = 256
  c.model.n_layers = 4
  c.model.d_model = 256
  c.model.n_heads = 4
  c.model.embd_dropout = c.model.attn_dropout = c.model.resid_dropout = 0.0
  c.data.tokenizer.vocab_size = 8192
  c.train.global_batch = 16
  c.train.steps = 100  # 410k tokens: a few minutes on a 2-core CPU
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_batches = 8
  c.checkpoint.save_every = 50
  c.optim.peak_lr = 2e-3
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.1
  c.lock()
  return c
