"""The same GPT and train step in plain PyTorch (eager, no torch.compile): the speed reference.

A nanoGPT-style implementation written for `scripts/bench.py --reference=torch`: learned token and
position embeddings, pre-LN (or post-LN) blocks with biases, GELU (tanh approximation), causal
attention through `F.scaled_dot_product_attention`, a final LayerNorm, an output projection tied
to the token embedding, float32 cross-entropy, then global-norm clipping and AdamW (decay on
matmul weights only, `fused=False`, default foreach) with the config's hyperparameters.

    step = make_train_step(cfg)   # cfg: a gptjax config; random batch of the configured shape
    step()                        # one forward, backward and optimizer step
"""

import math

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  def __init__(self, d_model: int, n_heads: int, d_head: int, d_ff: int, eps: float,
               pre_ln: bool, window: int | None):
    super().__init__()
    self.n_heads, self.d_head, self.pre_ln, self.window = n_heads, d_head, pre_ln, window
    self.ln_1, self.ln_2 = nn.LayerNorm(d_model, eps=eps), nn.LayerNorm(d_model, eps=eps)
    self.qkv = nn.Linear(d_model, 3 * n_heads * d_head)
    self.out = nn.Linear(n_heads * d_head, d_model)
    self.fc = nn.Linear(d_model, d_ff)
    self.proj = nn.Linear(d_ff, d_model)

  def attn(self, x: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
    if self.window is None:
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # locally banded: query i sees keys i - window < j <= i
      i = torch.arange(t)[:, None]
      j = torch.arange(t)[None, :]
      y = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < self.window))
    return self.out(y.transpose(1, 2).reshape(b, t, self.n_heads * self.d_head))

  def mlp(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(F.gelu(self.fc(x), approximate="tanh"))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.pre_ln:
      x = x + self.attn(self.ln_1(x))
      return x + self.mlp(self.ln_2(x))
    x = self.ln_1(x + self.attn(x))
    return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
  def __init__(self, m: ml_collections.ConfigDict):
    super().__init__()
    d_head = m.d_head or m.d_model // m.n_heads
    d_ff = m.d_ff or 4 * m.d_model
    self.vocab_size = m.vocab_size
    self.padded_vocab = -(-m.vocab_size // m.pad_vocab_to) * m.pad_vocab_to
    self.pre_ln = m.norm == "pre"
    self.wte = nn.Embedding(self.padded_vocab, m.d_model)
    self.wpe = nn.Embedding(m.ctx, m.d_model)
    banded = (False,) if m.attention == "dense" else (False, True)
    self.blocks = nn.ModuleList([
        Block(m.d_model, m.n_heads, d_head, d_ff, m.ln_eps, self.pre_ln,
              m.local_window if banded[i % len(banded)] else None) for i in range(m.n_layers)])
    self.ln_f = nn.LayerNorm(m.d_model, eps=m.ln_eps) if self.pre_ln else nn.Identity()
    self.lm_head = None if m.tie_embeddings else nn.Linear(m.d_model, self.padded_vocab, bias=False)
    resid_std = m.init_std / math.sqrt(2 * m.n_layers)
    for name, p in self.named_parameters():
      if name.endswith("bias"):
        nn.init.zeros_(p)
      elif p.dim() >= 2:
        std = resid_std if name.endswith(("out.weight", "proj.weight")) else m.init_std
        nn.init.normal_(p, 0.0, std)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    x = self.ln_f(x)
    logits = x @ self.wte.weight.T if self.lm_head is None else self.lm_head(x)
    if self.padded_vocab != self.vocab_size:
      logits[..., self.vocab_size:] = float("-inf")
    return logits


def make_train_step(cfg: ml_collections.ConfigDict, seed: int = 0):
  """The reference train step for `cfg` on a fixed random batch; returns a no-argument callable.

  One step is `micro_batch`-sized forward/backward passes summed over the global batch (like
  gptjax's gradient accumulation), global-norm clipping, and one AdamW update at the peak rate.
  """
  if cfg.model.dtype != "float32":
    raise ValueError(f"config.model.dtype: the torch reference runs float32 only, got "
                     f"{cfg.model.dtype!r}. Benchmark it with --config.model.dtype=float32.")
  torch.manual_seed(seed)
  model = GPT(cfg.model)
  model.train()
  o, t = cfg.optim, cfg.train
  decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2
           and (cfg.optim.decay_embeddings or not n.startswith(("wte", "wpe")))]
  rest = [p for p in model.parameters() if all(p is not q for q in decay)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                           {"params": rest, "weight_decay": 0.0}],
                          lr=o.peak_lr, betas=(o.b1, o.b2), eps=o.eps, fused=False)
  # Resolved here, not by gptjax.optim: this reference imports nothing of the package under test.
  seq_len, micro = t.seq_len or cfg.model.ctx, t.micro_batch or t.global_batch
  rng = np.random.default_rng(seed)
  tokens = torch.from_numpy(rng.integers(0, cfg.model.vocab_size,
                                         (t.global_batch // micro, micro, seq_len + 1)))

  def step():
    opt.zero_grad(set_to_none=True)
    for micro_tokens in tokens:
      logits = model(micro_tokens[:, :-1])
      loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(),
                             micro_tokens[:, 1:].reshape(-1), reduction="sum")
      (loss / tokens[..., 1:].numel()).backward()
    if o.clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
    opt.step()

  return step
