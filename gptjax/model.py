"""The GPT stack (GPT-1, GPT-2, GPT-3) as functional Flax linen modules.

The model names logical axes only (`batch`, `length`, `embed`, `heads`, `kv`, `mlp`, `vocab`,
`layers`) and knows nothing of meshes: `gptjax/sharding.py` maps the names onto a device mesh.
Shapes are written as suffixes: B batch, L length, D d_model, N heads, H d_head, F d_ff, V vocab.

    model = GPT(ModelArgs.from_config(cfg.model))
    params = model.init(rng, tokens_BxL)["params"]
    logits_BxLxV = model.apply({"params": params}, tokens_BxL)

Attention (its kernels, masks and KV cache) is in `gptjax/attention.py`; `ModelArgs`, `Linear`,
the initialisers and the LayerNorm factory are in `gptjax/layers.py`, and `ModelArgs`, `Linear`,
REMAT_POLICIES, ATTENTION_PATTERNS and DTYPES are re-exported here (`gptjax.model.ModelArgs`).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.attention import Attention
from gptjax.layers import ATTENTION_PATTERNS as ATTENTION_PATTERNS  # re-exported, as is DTYPES
from gptjax.layers import DTYPES as DTYPES
from gptjax.layers import REMAT_POLICIES, Linear, ModelArgs, layer_norm, normal

Array = jax.Array


class MLP(nn.Module):
  """Position-wise feed-forward: D -> F (GELU, tanh approximation as in GPT-1/2) -> D."""

  args: ModelArgs

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    a = self.args
    h_BxLxF = Linear((a.d_model,), (a.d_ff,), ("embed", "mlp"), a.hidden_std(a.init_std),
                     a.dtype, name="fc")(x_BxLxD)
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
    # GELU and the projection after it are rematerialised together: the backward pass recomputes
    # gelu(h) from h, so each layer keeps one [B, L, F] array for it instead of five (h, the GELU
    # output and three intermediates of its tanh formula).
    proj = nn.remat(_GeluLinear, prevent_cse=not a.scan_layers)
    return proj((a.d_ff,), (a.d_model,), ("mlp", "embed"),
                a.hidden_std(a.init_std / math.sqrt(2 * a.n_layers)), a.dtype, name="proj")(h_BxLxF)


class _GeluLinear(Linear):
  """`Linear` applied to gelu(x) (tanh approximation, as in GPT-1/2)."""

  def __call__(self, h_BxLxF: Array) -> Array:
    return super().__call__(nn.with_logical_constraint(jax.nn.gelu(h_BxLxF, approximate=True),
                                                       ("batch", "length", "mlp")))


class Adapter(nn.Module):
  """Houlsby adapter: x + up(gelu(down(x))), D -> adapter_dim -> D; `up` starts at zero, so the
  adapter starts as the identity."""

  args: ModelArgs

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    a = self.args
    h_BxLxA = Linear((a.d_model,), (a.adapter_dim,), ("embed", None), a.readout_std(a.init_std),
                     a.dtype, name="down")(x_BxLxD)
    up = Linear((a.adapter_dim,), (a.d_model,), (None, "embed"), 0.0, a.dtype, name="up")
    return x_BxLxD + up(jax.nn.gelu(h_BxLxA, approximate=True))


class Block(nn.Module):
  """One transformer block, pre-LN (GPT-2/3) or post-LN (GPT-1)."""

  args: ModelArgs
  window: int | None = None
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: Array, segment_ids_BxL: Array | None, deterministic: bool,
               positions_BxL: Array | None = None) -> Array:
    a = self.args
    attn = Attention(a, self.window, self.decode, name="attn")
    mlp = MLP(a, name="mlp")
    if a.adapter_dim:  # adapters on each sub-block's output, before the residual add (Houlsby)
      attn = _then(attn, Adapter(a, name="adapter_attn"))
      mlp = _then(mlp, Adapter(a, name="adapter_mlp"))
    drop = nn.Dropout(a.resid_dropout, deterministic=deterministic)
    ln_1, ln_2 = layer_norm(a, "ln_1"), layer_norm(a, "ln_2")
    if a.norm == "pre":
      x_BxLxD = x_BxLxD + drop(attn(ln_1(x_BxLxD), segment_ids_BxL, deterministic, positions_BxL))
      x_BxLxD = x_BxLxD + drop(mlp(ln_2(x_BxLxD)))
    else:
      x_BxLxD = ln_1(x_BxLxD + drop(attn(x_BxLxD, segment_ids_BxL, deterministic, positions_BxL)))
      x_BxLxD = ln_2(x_BxLxD + drop(mlp(x_BxLxD)))
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))


def _then(f, g):
  return lambda *xs: g(f(*xs))


def _block_class(args: ModelArgs, in_scan: bool, decode: bool = False):
  if args.remat == "none" or decode:  # decoding has no backward pass to save memory for
    return Block
  # Inside nn.scan the loop already prevents CSE across layers; outside it we must ask for it.
  return nn.remat(Block, policy=REMAT_POLICIES[args.remat], prevent_cse=not in_scan,
                  static_argnums=(3,))


class BlockGroup(nn.Module):
  """One period of the attention pattern (1 block dense; 2 blocks for dense/banded alternation).

  The scanned unit of `nn.scan`, so that every scanned step has the same structure.
  """

  args: ModelArgs
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: Array, segment_ids_BxL: Array | None, deterministic: bool,
               positions_BxL: Array | None):
    block = _block_class(self.args, in_scan=True, decode=self.decode)
    for i in range(len(self.args.pattern)):
      x_BxLxD = block(self.args, self.args.window(i), self.decode, name=f"block_{i}")(
          x_BxLxD, segment_ids_BxL, deterministic, positions_BxL)
    return x_BxLxD, None


class GPT(nn.Module):
  """Decoder-only transformer language model.

  Parameter layout: `wte` [V, D] and `wpe` [ctx, D] embeddings; blocks either stacked by `nn.scan`
  under `layers/block_{i}` with a leading `layers` axis of n_layers / period, or unrolled as
  `block_{l}`; `ln_f` (pre-LN only); `lm_head` [D, V] only if embeddings are untied.

  `GPT(args, decode=True)` is the same network for autoregressive decoding: every attention layer
  keeps a KV cache in the 'cache' collection (stacked like the params when layers are scanned).
  Call it with `mutable=["cache"]`, explicit positions (negative = padding), a cache from
  `init_cache`, first on the whole left-padded prompt, then on one token per row at a time.
  """

  args: ModelArgs
  decode: bool = False

  def setup(self):
    a = self.args
    self.wte = nn.Embed(a.padded_vocab, a.d_model, dtype=a.dtype, name="wte",
                        embedding_init=normal(a.init_std, ("vocab", "embed")))
    self.wpe = nn.Embed(a.ctx, a.d_model, dtype=a.dtype, name="wpe",
                        embedding_init=normal(a.init_std, ("length", "embed")))
    self.embd_drop = nn.Dropout(a.embd_dropout)
    period = len(a.pattern)
    if a.scan_layers:
      self.layers = nn.scan(
          BlockGroup, variable_axes={"params": 0, "cache": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=a.n_layers // period,
          metadata_params={nn.PARTITION_NAME: "layers"})(a, self.decode, name="layers")
    else:
      block = _block_class(a, in_scan=False, decode=self.decode)
      self.blocks = [block(a, a.window(i), self.decode, name=f"block_{i}")
                     for i in range(a.n_layers)]
    if a.norm == "pre":
      self.ln_f = layer_norm(a, "ln_f")
    if not a.tie_embeddings:
      self.lm_head = self.param("lm_head", normal(a.init_std, ("embed", "vocab")),
                                (a.d_model, a.padded_vocab), jnp.float32)

  def hidden(self, tokens_BxL: Array, positions_BxL: Array | None = None,
             segment_ids_BxL: Array | None = None, deterministic: bool = True) -> Array:
    """Final hidden states [B, L, D] (after the final LayerNorm for pre-LN models)."""
    a = self.args
    cache_positions_BxL = None
    if self.decode:
      if positions_BxL is None:
        raise ValueError("GPT(decode=True) needs positions_BxL (negative for padding)")
      cache_positions_BxL, positions_BxL = positions_BxL, jnp.maximum(positions_BxL, 0)
    elif positions_BxL is None:
      positions_BxL = jnp.arange(tokens_BxL.shape[1])[None, :]
    x_BxLxD = self.wte(tokens_BxL) + self.wpe(positions_BxL)
    x_BxLxD = self.embd_drop(x_BxLxD, deterministic=deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    if a.scan_layers:
      x_BxLxD, _ = self.layers(x_BxLxD, segment_ids_BxL, deterministic, cache_positions_BxL)
    else:
      for block in self.blocks:
        x_BxLxD = block(x_BxLxD, segment_ids_BxL, deterministic, cache_positions_BxL)
    if a.norm == "pre":
      x_BxLxD = self.ln_f(x_BxLxD)
    return x_BxLxD

  def output_embedding(self) -> Array:
    """The output projection as [V_padded, D] in the compute dtype (the token embedding if tied),
    times µP's output multiplier 1/m (`ModelArgs.output_mult`; 1 under SP)."""
    a = self.args
    w_VxD = self.wte.embedding if a.tie_embeddings else self.lm_head.T
    if a.output_mult != 1.0:
      w_VxD = w_VxD * a.output_mult
    return w_VxD.astype(a.dtype)

  def logits(self, x_BxLxD: Array) -> Array:
    """Projects hidden states to float32 logits [B, L, V_padded]; padded ids get -1e30."""
    a = self.args
    logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD.astype(a.dtype), self.output_embedding(),
                              preferred_element_type=jnp.float32)
    if a.padded_vocab != a.vocab_size:
      logits_BxLxV = jnp.where(jnp.arange(a.padded_vocab) < a.vocab_size, logits_BxLxV, -1e30)
    return nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "vocab"))

  def __call__(self, tokens_BxL: Array, positions_BxL: Array | None = None,
               segment_ids_BxL: Array | None = None, deterministic: bool = True) -> Array:
    """Next-token logits [B, L, V_padded] in float32.

    Args:
      tokens_BxL: int token ids.
      positions_BxL: position ids (default 0..L-1), e.g. for left-padded prompts. In decode mode
        required, and negative ids mark padding, which no token attends to.
      segment_ids_BxL: document numbers; attention never crosses a change of segment.
      deterministic: False enables dropout (needs a 'dropout' rng).
    """
    return self.logits(self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, deterministic))


def init_cache(model: GPT, params, batch: int, length: int) -> Any:
  """An empty KV cache: the 'cache' collection of `GPT(args, decode=True)`.

  Call it under jit: the forward pass that sizes the cache is thrown away and compiled out.

  Args:
    model: the GPT (decode or not).
    params: its parameters.
    batch: rows B.
    length: slots T, the most tokens (prompt with its padding, plus new ones) a row will hold.

  Returns:
    The cache pytree: per attention layer `cached_key`/`cached_value` [B, N, T, H],
    `cached_positions` [B, T] (all -1) and `index` 0; with a leading layers axis when scanned.
  """
  tokens_BxT = jnp.zeros((batch, length), jnp.int32)
  _, variables = model.clone(decode=True).apply(
      {"params": params}, tokens_BxT, jnp.full((batch, length), -1, jnp.int32), mutable=["cache"])
  return variables["cache"]
