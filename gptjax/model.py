"""The GPT stack (GPT-1, GPT-2, GPT-3) as functional Flax linen modules.

The model names logical axes only (`batch`, `length`, `embed`, `heads`, `kv`, `mlp`, `vocab`,
`layers`) and knows nothing of meshes: `gptjax/sharding.py` maps the names onto a device mesh.
Shapes are written as suffixes: B batch, L length, D d_model, N heads, H d_head, F d_ff, V vocab.

    model = GPT(ModelArgs.from_config(cfg.model))
    params = model.init(rng, tokens_BxL)["params"]
    logits_BxLxV = model.apply({"params": params}, tokens_BxL)
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_attn": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
}
ATTENTION_PATTERNS = {"dense": (0,), "alternating": (0, 1)}  # 1 marks a locally banded layer
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelArgs:
  """Static model hyperparameters (a hashable view of `cfg.model`)."""

  vocab_size: int = 50257
  pad_vocab_to: int = 1
  ctx: int = 1024
  n_layers: int = 12
  d_model: int = 768
  n_heads: int = 12
  d_head: int = 64
  d_ff: int = 3072
  norm: str = "pre"
  ln_eps: float = 1e-5
  tie_embeddings: bool = True
  attention: str = "dense"
  local_window: int = 256
  attention_impl: str | None = None
  embd_dropout: float = 0.0
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  init_std: float = 0.02
  scan_layers: bool = True
  remat: str = "none"
  dtype: Any = jnp.float32
  # Fine-tuning additions (gptjax/peft.py); 0 = absent, leaving the parameter tree as it is.
  adapter_dim: int = 0  # Houlsby adapter bottleneck after attention and after the MLP
  prefix_len: int = 0  # learned key/value prefix positions per layer (prefix tuning)

  @classmethod
  def from_config(cls, m) -> "ModelArgs":
    """Builds the args from a (validated) `cfg.model` ConfigDict, resolving the 0 = default keys."""
    return cls(
        vocab_size=m.vocab_size, pad_vocab_to=m.pad_vocab_to, ctx=m.ctx, n_layers=m.n_layers,
        d_model=m.d_model, n_heads=m.n_heads, d_head=m.d_head or m.d_model // m.n_heads,
        d_ff=m.d_ff or 4 * m.d_model, norm=m.norm, ln_eps=m.ln_eps, tie_embeddings=m.tie_embeddings,
        attention=m.attention, local_window=m.local_window,
        attention_impl=None if m.attention_impl == "auto" else m.attention_impl,
        embd_dropout=m.embd_dropout, attn_dropout=m.attn_dropout, resid_dropout=m.resid_dropout,
        init_std=m.init_std, scan_layers=m.scan_layers, remat=m.remat, dtype=DTYPES[m.dtype])

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

  @property
  def pattern(self) -> tuple[int, ...]:
    """Per-layer attention kind, repeating: 0 dense, 1 locally banded."""
    return ATTENTION_PATTERNS[self.attention]

  def window(self, layer: int) -> int | None:
    """Tokens layer `layer` attends to (None = all earlier tokens)."""
    return self.local_window if self.pattern[layer % len(self.pattern)] else None


def _normal(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _layer_norm(args: ModelArgs, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=args.ln_eps, dtype=args.dtype, name=name, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=_zeros(("embed",)))


class Linear(nn.Module):
  """x[..., *in_shape] @ kernel[*in_shape, *out_shape] + bias[*out_shape], in the compute dtype.

  Kernels are created at their full shape (not flattened), so their logical axes always apply.
  """

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axes of the kernel; the bias takes the output ones
  std: float
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _normal(self.std, self.axes), self.in_shape + self.out_shape,
                        jnp.float32)
    bias = self.param("bias", _zeros(self.axes[len(self.in_shape):]), self.out_shape, jnp.float32)
    n_in = len(self.in_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    return y + bias.astype(self.dtype)


class Attention(nn.Module):
  """Causal multi-head self-attention; `window` makes it locally banded (GPT-3 sparse layers).

  With `decode=True` it keeps a KV cache in the 'cache' collection: `cached_key`/`cached_value`
  [B, N, T, H] (heads-major, the layout the attention matmuls read without a transpose),
  `cached_positions` [B, T] (the position of the token in each slot; -1 = empty or padding) and
  `index` (the next slot to write, shared by all rows). Each call appends its L tokens
  at `index` and attends over the whole cache, masked by positions, so left-padded prompts of
  different lengths work. The first call, when no cache exists yet, only creates an empty one with
  T = L (use `init_cache`).
  """

  args: ModelArgs
  window: int | None = None
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: Array, segment_ids_BxL: Array | None, deterministic: bool,
               positions_BxL: Array | None = None) -> Array:
    a = self.args
    resid_std = a.init_std / math.sqrt(2 * a.n_layers)
    qkv_BxLx3xNxH = Linear((a.d_model,), (3, a.n_heads, a.d_head), ("embed", None, "heads", "kv"),
                           a.init_std, a.dtype, name="qkv")(x_BxLxD)
    qkv_BxLx3xNxH = checkpoint_name(qkv_BxLx3xNxH, "qkv")
    q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = (
        nn.with_logical_constraint(qkv_BxLx3xNxH[:, :, i], ("batch", "length", "heads", "kv"))
        for i in range(3))

    length = x_BxLxD.shape[1]
    if self.decode:
      out_BxLxNxH = self._cached(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, positions_BxL)
    elif a.prefix_len:  # prefix tuning: every query also sees this layer's learned K/V prefix
      out_BxLxNxH = self._prefixed(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, deterministic)
    elif a.attn_dropout > 0.0 and not deterministic:
      out_BxLxNxH = _xla_attention(
          q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, _causal_mask(length, self.window, segment_ids_BxL),
          a.attn_dropout, self.make_rng("dropout"))
    elif a.attention_impl == "cudnn" or (a.attention_impl is None
                                         and jax.default_backend() == "gpu"):
      mask = None
      if segment_ids_BxL is not None:
        mask = (segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :])
      out_BxLxNxH = jax.nn.dot_product_attention(
          q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask=mask, is_causal=True,
          local_window_size=None if self.window is None else (self.window - 1, 0),
          implementation=a.attention_impl)
    else:
      out_BxLxNxH = _blocked_causal_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, self.window,
                                              segment_ids_BxL)
    out_BxLxNxH = checkpoint_name(out_BxLxNxH, "attn_out")
    out_BxLxNxH = nn.with_logical_constraint(out_BxLxNxH, ("batch", "length", "heads", "kv"))
    return Linear((a.n_heads, a.d_head), (a.d_model,), ("heads", "kv", "embed"), resid_std, a.dtype,
                  name="out")(out_BxLxNxH)

  def _cached(self, q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array,
              positions_BxL: Array) -> Array:
    """Appends k, v at the cache index, then attends over the cache (decode mode)."""
    b, length, n, h = k_BxLxNxH.shape
    creating = not self.has_variable("cache", "cached_key")
    key = self.variable("cache", "cached_key", jnp.zeros, (b, n, length, h), k_BxLxNxH.dtype)
    value = self.variable("cache", "cached_value", jnp.zeros, (b, n, length, h), v_BxLxNxH.dtype)
    pos = self.variable("cache", "cached_positions", jnp.full, (b, length), -1, jnp.int32)
    index = self.variable("cache", "index", jnp.zeros, (), jnp.int32)
    if creating:
      return jnp.zeros_like(q_BxLxNxH)
    i = index.value

    def append(cache_BxNxTxH, new_BxLxNxH):
      new_BxNxLxH = new_BxLxNxH.transpose(0, 2, 1, 3).astype(cache_BxNxTxH.dtype)
      return nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(cache_BxNxTxH, new_BxNxLxH, (0, 0, i, 0)),
          ("batch", "heads", "length", "kv"))

    k_BxNxTxH, v_BxNxTxH = append(key.value, k_BxLxNxH), append(value.value, v_BxLxNxH)
    pos_BxT = jax.lax.dynamic_update_slice(pos.value, positions_BxL.astype(jnp.int32), (0, i))
    key.value, value.value, pos.value, index.value = k_BxNxTxH, v_BxNxTxH, pos_BxT, i + length
    mask_Bx1xLxT = _position_mask(positions_BxL, pos_BxT, self.window)
    if self.args.prefix_len:  # prefix tuning: the learned K/V prefix, seen by every query, first
      a, prefix = self.args, self.args.prefix_len

      def prefixed(name, cache_BxNxTxH):
        p_PxNxH = self.param(name, _normal(a.init_std, (None, "heads", "kv")), (prefix, n, h),
                             jnp.float32)
        p_BxNxPxH = jnp.broadcast_to(p_PxNxH.astype(cache_BxNxTxH.dtype).transpose(1, 0, 2),
                                     (b, n, prefix, h))
        return jnp.concatenate([p_BxNxPxH, cache_BxNxTxH], axis=2)

      k_BxNxTxH, v_BxNxTxH = prefixed("prefix_key", k_BxNxTxH), prefixed("prefix_value", v_BxNxTxH)
      mask_Bx1xLxT = jnp.concatenate(
          [jnp.ones(mask_Bx1xLxT.shape[:3] + (prefix,), bool), mask_Bx1xLxT], axis=-1)
    return _cached_attention(q_BxLxNxH, k_BxNxTxH, v_BxNxTxH, mask_Bx1xLxT)

  def _prefixed(self, q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array,
                segment_ids_BxL: Array | None, deterministic: bool) -> Array:
    """Attention over [prefix; keys]: P learned key/value positions every query (and segment)
    sees before its causal window (Li & Liang 2021)."""
    a = self.args
    b, length = k_BxLxNxH.shape[:2]

    def with_prefix(name, x_BxLxNxH):
      p_PxNxH = self.param(name, _normal(a.init_std, (None, "heads", "kv")),
                           (a.prefix_len, a.n_heads, a.d_head), jnp.float32)
      p_BxPxNxH = jnp.broadcast_to(p_PxNxH.astype(x_BxLxNxH.dtype), (b,) + p_PxNxH.shape)
      return jnp.concatenate([p_BxPxNxH, x_BxLxNxH], axis=1)

    k_BxTxNxH, v_BxTxNxH = with_prefix("prefix_key", k_BxLxNxH), with_prefix("prefix_value",
                                                                               v_BxLxNxH)
    causal = _causal_mask(length, self.window, segment_ids_BxL)
    mask = jnp.concatenate([jnp.ones(causal.shape[:3] + (a.prefix_len,), bool), causal], axis=-1)
    if a.attn_dropout > 0.0 and not deterministic:
      return _xla_attention(q_BxLxNxH, k_BxTxNxH, v_BxTxNxH, mask, a.attn_dropout,
                            self.make_rng("dropout"))
    return _xla_attention(q_BxLxNxH, k_BxTxNxH, v_BxTxNxH, mask)


@jax.custom_vjp
def _softmax(x: Array) -> Array:
  """jax.nn.softmax over the last axis, whose backward pass keeps only the output.

  (Differentiating jax.nn.softmax keeps the exponentials as well: one more [B, N, L, L] array per
  layer held from the forward to the backward pass.)
  """
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
  y = jax.nn.softmax(x, axis=-1)
  return y, y


def _softmax_bwd(y, dy):
  return (y * (dy - (dy * y).sum(-1, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _xla_attention(q_BxLxNxH: Array, k_BxTxNxH: Array, v_BxTxNxH: Array, mask: Array,
                   dropout_rate: float = 0.0, dropout_rng: Array | None = None) -> Array:
  """softmax(q k^T / sqrt(H), masked) v, scores and softmax in float32, compiled by XLA.

  The same math as jax.nn.dot_product_attention's XLA path, with a softmax that keeps only the
  probabilities for the backward pass, and optional attention dropout.

  Args:
    q_BxLxNxH: queries.
    k_BxTxNxH: keys (T = L, or L plus a prefix).
    v_BxTxNxH: values; their dtype is the compute dtype the probabilities are cast to.
    mask: boolean, broadcastable to [B, N, L, T]; True where the query sees the key.
    dropout_rate: the probability of zeroing each attention probability. Each batch row, head,
      query and key draws its own (as GPT-2 does); kept probabilities are scaled by 1 / (1 - rate).
    dropout_rng: the PRNG key for the dropout mask (needed if dropout_rate > 0).
  """
  scores_BxNxLxT = jnp.einsum("bqnh,bknh->bnqk", q_BxLxNxH, k_BxTxNxH,
                              preferred_element_type=jnp.float32)
  scores_BxNxLxT = jnp.where(mask, scores_BxNxLxT / math.sqrt(q_BxLxNxH.shape[-1]),
                             jnp.finfo(jnp.float32).min)
  probs_BxNxLxT = _softmax(scores_BxNxLxT)
  if dropout_rate > 0.0:
    keep_BxNxLxT = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BxNxLxT.shape)
    probs_BxNxLxT = jnp.where(keep_BxNxLxT, probs_BxNxLxT / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bnqk,bknh->bqnh", probs_BxNxLxT.astype(v_BxTxNxH.dtype), v_BxTxNxH)


def _blocked_causal_attention(q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array,
                              window: int | None, segment_ids_BxL: Array | None) -> Array:
  """Causal (optionally banded) attention that never computes a fully masked block.

  The queries are cut into blocks of C = max(64, L / 8) rows; block i attends only to the keys
  some query of it can see, [max(0, i C - window + 1), (i + 1) C), so a dense causal layer does
  about half the score work and a banded one a band's worth. Each block holds all of its keys, so
  its softmax is the ordinary one: the result equals `_xla_attention` with the full mask. On CPU
  this is about 1.5x faster than one [L, L] product per head, forward and backward (fewer FLOPs, a
  smaller softmax; benchmarks/attention.py); the heads-major [B, N, L, H] layout lets XLA call its
  batched matmul without copying per block.
  """
  length = q_BxLxNxH.shape[1]
  block = max(64, -(-length // 8))
  mask = _causal_mask(length, window, segment_ids_BxL)
  if length < 2 * block:
    return _xla_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask)
  q_BxNxLxH, k_BxNxLxH, v_BxNxLxH = (x.transpose(0, 2, 1, 3)
                                     for x in (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH))
  outs = []
  for start in range(0, length, block):
    end = min(start + block, length)
    first = 0 if window is None else max(0, start - window + 1)
    scores_BxNxCxK = jnp.einsum("bnqh,bnkh->bnqk", q_BxNxLxH[:, :, start:end],
                                k_BxNxLxH[:, :, first:end], preferred_element_type=jnp.float32)
    scores_BxNxCxK = jnp.where(mask[:, :, start:end, first:end],
                               scores_BxNxCxK / math.sqrt(q_BxLxNxH.shape[-1]),
                               jnp.finfo(jnp.float32).min)
    probs_BxNxCxK = _softmax(scores_BxNxCxK).astype(v_BxLxNxH.dtype)
    outs.append(jnp.einsum("bnqk,bnkh->bnqh", probs_BxNxCxK, v_BxNxLxH[:, :, first:end]))
  return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def _cached_attention(q_BxLxNxH: Array, k_BxNxTxH: Array, v_BxNxTxH: Array,
                      mask_Bx1xLxT: Array) -> Array:
  """softmax(q k^T / sqrt(H), masked) v for L queries over T cached keys (no backward pass)."""
  scores_BxNxLxT = jnp.einsum("blnh,bnth->bnlt", q_BxLxNxH, k_BxNxTxH,
                              preferred_element_type=jnp.float32)
  scores_BxNxLxT = jnp.where(mask_Bx1xLxT, scores_BxNxLxT / math.sqrt(q_BxLxNxH.shape[-1]),
                             jnp.finfo(jnp.float32).min)
  probs_BxNxLxT = jax.nn.softmax(scores_BxNxLxT, axis=-1).astype(v_BxNxTxH.dtype)
  return jnp.einsum("bnlt,bnth->blnh", probs_BxNxLxT, v_BxNxTxH)


def _position_mask(q_pos_BxL: Array, k_pos_BxT: Array, window: int | None) -> Array:
  """Boolean [B, 1, L, T] mask by positions: q sees k iff 0 <= k <= q (and q - k < window)."""
  q, k = q_pos_BxL[:, None, :, None], k_pos_BxT[:, None, None, :]
  mask = (k >= 0) & (k <= q)
  if window is not None:
    mask &= q - k < window
  return mask


def _causal_mask(length: int, window: int | None, segment_ids_BxL: Array | None) -> Array:
  """Boolean [B or 1, 1, L, L] mask: query i sees key j iff j <= i (and i - j < window)."""
  i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  mask = j <= i
  if window is not None:
    mask &= i - j < window
  mask = mask[None, None]
  if segment_ids_BxL is not None:
    mask = mask & (segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :])
  return mask


class MLP(nn.Module):
  """Position-wise feed-forward: D -> F (GELU, tanh approximation as in GPT-1/2) -> D."""

  args: ModelArgs

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    a = self.args
    h_BxLxF = Linear((a.d_model,), (a.d_ff,), ("embed", "mlp"), a.init_std, a.dtype,
                     name="fc")(x_BxLxD)
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
    # GELU and the projection after it are rematerialised together: the backward pass recomputes
    # gelu(h) from h, so each layer keeps one [B, L, F] array for it instead of five (h, the GELU
    # output and three intermediates of its tanh formula).
    proj = nn.remat(_GeluLinear, prevent_cse=not a.scan_layers)
    return proj((a.d_ff,), (a.d_model,), ("mlp", "embed"), a.init_std / math.sqrt(2 * a.n_layers),
                a.dtype, name="proj")(h_BxLxF)


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
    h_BxLxA = Linear((a.d_model,), (a.adapter_dim,), ("embed", None), a.init_std, a.dtype,
                     name="down")(x_BxLxD)
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
    ln_1, ln_2 = _layer_norm(a, "ln_1"), _layer_norm(a, "ln_2")
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
                        embedding_init=_normal(a.init_std, ("vocab", "embed")))
    self.wpe = nn.Embed(a.ctx, a.d_model, dtype=a.dtype, name="wpe",
                        embedding_init=_normal(a.init_std, ("length", "embed")))
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
      self.ln_f = _layer_norm(a, "ln_f")
    if not a.tie_embeddings:
      self.lm_head = self.param("lm_head", _normal(a.init_std, ("embed", "vocab")),
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
    """The output projection as [V_padded, D] in the compute dtype (the token embedding if tied)."""
    a = self.args
    w_VxD = self.wte.embedding if a.tie_embeddings else self.lm_head.T
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
