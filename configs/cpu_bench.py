"""The fixed CPU benchmark configuration (scripts/bench.py's default).

6 layers, d_model 384, 6 heads, context 256, batch 8, vocab 50,304, float32, no dropout, one
AdamW step (clip 1.0, weight decay 0.1) per batch: about 187 MFLOPs per token, small enough to
time on a 2-core CPU, with the GPT-2-sized vocabulary that makes the output layer a third of
the work. Usage: --config=configs/cpu_bench.py
"""

from configs import base


def get_config(arg: str = ""):
  del arg
  c = base.get_config()
  c.name = "cpu_bench"
  c.model.update(n_layers=6, d_model=384, n_heads=6, ctx=256, vocab_size=50304, pad_vocab_to=128,
                 embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0, dtype="float32")
  c.train.update(global_batch=8, micro_batch=0, seq_len=256, steps=1000)
  c.optim.update(clip_norm=1.0, weight_decay=0.1, warmup_steps=0)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.lock()
  return c
