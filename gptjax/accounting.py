"""Parameter, FLOP, MFU and memory accounting for GPT configs, without allocating anything.

FLOPs follow the PaLM paper's model-FLOPs definition (Chowdhery et al. 2022, appendix B):
training costs 6N + 12·L·H·Q·T FLOPs per token, where N counts matmul weights (blocks plus the
output projection; embedding lookups are free), L layers, H heads, Q head width, T sequence length.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import loss as loss_lib, model as model_lib

# Dense bf16 peak FLOP/s per device (vendor data sheets; H100/H200 SXM without sparsity).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu-v4": 275e12,
    "tpu-v5e": 197e12,
    "tpu-v5p": 459e12,
    "tpu-v6e": 918e12,
}


def peak_flops_of(device) -> float | None:
  """Dense bf16 peak FLOP/s of a known accelerator kind (`PEAK_FLOPS`), else None (e.g. CPUs)."""
  kind = device.device_kind.lower().replace(" ", "").replace("-", "")
  for name, peak in PEAK_FLOPS.items():
    if name.replace("-", "") in kind:
      return peak
  return None


def abstract_params(args: model_lib.ModelArgs, seq_len: int = 8):
  """Parameter shapes as `jax.ShapeDtypeStruct`s (boxed with logical axes) from `jax.eval_shape`."""
  model = model_lib.GPT(args)
  tokens = jax.ShapeDtypeStruct((1, min(seq_len, args.ctx)), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int  # every parameter as built (padded vocab included)
  embedding: int  # token + position tables
  matmul: int  # weights of matrix multiplies, the N of the FLOP formula (untied head counted once)

  @property
  def non_embedding(self) -> int:
    return self.total - self.embedding


def param_counts(args: model_lib.ModelArgs) -> ParamCounts:
  """Exact counts from the model's own parameter shapes (no memory allocated)."""
  # Remat, compute dtype and dropout do not change the parameters: one trace per architecture.
  return _param_counts(dataclasses.replace(args, remat="none", dtype=jnp.float32, embd_dropout=0.0,
                                           attn_dropout=0.0, resid_dropout=0.0))


@functools.lru_cache(maxsize=64)
def _param_counts(args: model_lib.ModelArgs) -> ParamCounts:
  params = nn.meta.unbox(abstract_params(args))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  total = embedding = matmul = 0
  for path, leaf in flat:
    names = [getattr(k, "key", str(k)) for k in path]
    size = math.prod(leaf.shape)
    total += size
    if names[0] in ("wte", "wpe"):
      embedding += size
    elif names[-1] == "kernel" or names[0] == "lm_head":
      matmul += size
  # The output projection is a matmul whether or not it is tied to the token embedding.
  matmul += args.padded_vocab * args.d_model if args.tie_embeddings else 0
  return ParamCounts(total=total, embedding=embedding, matmul=matmul)


def flops_per_token(args: model_lib.ModelArgs, seq_len: int | None = None) -> float:
  """Training FLOPs per token (forward + backward), PaLM definition."""
  t = seq_len or args.ctx
  n = param_counts(args).matmul
  return 6.0 * n + 12.0 * args.n_layers * args.n_heads * args.d_head * t


def mfu(tokens_per_s: float, flops_token: float, peak_flops: float, n_devices: int = 1) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
  return tokens_per_s * flops_token / (peak_flops * n_devices)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device during a training step."""

  params: float
  grads: float
  optimizer: float
  activations: float

  @property
  def total(self) -> float:
    return self.params + self.grads + self.optimizer + self.activations


def activation_bytes_per_token_layer(args: model_lib.ModelArgs, seq_len: int) -> float:
  """Bytes one token keeps alive per layer for the backward pass, by remat policy.

  Without remat a pre-LN block keeps about 16·D elements per token (LN inputs/outputs, q, k, v,
  attention output, MLP input, the 4·D GELU input and output) plus attention scores and
  probabilities, 2·N·T elements (the XLA attention path materialises them). 'dots' keeps only matmul
  outputs (about 10·D + N·T); 'full' keeps the block input (D) and recomputes the rest.
  """
  d, nt = args.d_model, args.n_heads * seq_len
  elems = {"none": 16 * d + 2 * nt, "dots": 10 * d + nt, "dots_no_batch": 10 * d + nt,
           "qkv_attn": 5 * d, "full": d}[args.remat]
  return elems * jnp.dtype(args.dtype).itemsize


def memory_per_device(args: model_lib.ModelArgs, seq_len: int, batch_per_device: int,
                      fsdp: int = 1, tensor: int = 1) -> MemoryEstimate:
  """Training memory per device for AdamW in float32 (16 bytes/param before activations).

  Params, grads and both Adam moments are divided over fsdp x tensor (FSDP shards `embed`, tensor
  parallelism shards heads / MLP / vocab); activations of `batch_per_device` sequences are divided
  over `tensor`. With remat, one layer's full activations are alive again during its backward.
  """
  n = param_counts(args).total
  shards = fsdp * tensor
  tokens = batch_per_device * seq_len
  per_layer = activation_bytes_per_token_layer(args, seq_len) * tokens
  if args.remat != "none":
    full = dataclasses.replace(args, remat="none")
    per_layer_live = activation_bytes_per_token_layer(full, seq_len) * tokens
  else:
    per_layer_live = 0.0
  # float32 logits and their gradient: whole under tensor parallelism (vocab-parallel loss), one
  # chunk of rows at a time otherwise (the fused output projection + loss).
  rows = tokens if tensor > 1 else min(tokens, loss_lib.CHUNK_ROWS)
  logits = rows * args.padded_vocab * 4 * 2
  acts = (per_layer * args.n_layers + per_layer_live + logits) / tensor
  return MemoryEstimate(params=4.0 * n / shards, grads=4.0 * n / shards,
                        optimizer=8.0 * n / shards, activations=acts)
