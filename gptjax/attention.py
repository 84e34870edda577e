"""Causal multi-head self-attention: the `Attention` layer, its KV cache, kernels, masks, softmax.

Shapes are written as suffixes: B batch, L length (queries), T keys (cache slots, or L plus a
learned prefix), N heads, H d_head, D d_model, C a block of queries.

Which kernel `Attention` runs:
  - decoding (`decode=True`): `cached_attention`, the L new queries over the whole KV cache,
    masked by `position_mask` (the learned prefix first, under prefix tuning);
  - prefix tuning (`prefix_len > 0`): `xla_attention` over [prefix; keys], with attention dropout
    when training;
  - attention dropout when training: `xla_attention` with the full `causal_mask`;
  - `attention_impl='cudnn'`, or 'auto' (None) on a GPU: `jax.nn.dot_product_attention` (causal,
    banded by its local window, segments as a mask);
  - otherwise ('xla', or 'auto' on CPU and TPU): `blocked_causal_attention`, which never computes
    a query x key block the causal (banded) mask removes entirely; below L = 128 it is one
    masked product, `xla_attention`.

`xla_attention` and `blocked_causal_attention` use `softmax`, jax.nn.softmax with a backward
pass that keeps only its output; scores and softmax are float32 whatever the compute dtype.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gptjax.layers import Linear, ModelArgs, normal

Array = jax.Array


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
      out_BxLxNxH = xla_attention(
          q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, causal_mask(length, self.window, segment_ids_BxL),
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
      out_BxLxNxH = blocked_causal_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, self.window,
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
    mask_Bx1xLxT = position_mask(positions_BxL, pos_BxT, self.window)
    if self.args.prefix_len:  # prefix tuning: the learned K/V prefix, seen by every query, first
      a, prefix = self.args, self.args.prefix_len

      def prefixed(name, cache_BxNxTxH):
        p_PxNxH = self.param(name, normal(a.init_std, (None, "heads", "kv")), (prefix, n, h),
                             jnp.float32)
        p_BxNxPxH = jnp.broadcast_to(p_PxNxH.astype(cache_BxNxTxH.dtype).transpose(1, 0, 2),
                                     (b, n, prefix, h))
        return jnp.concatenate([p_BxNxPxH, cache_BxNxTxH], axis=2)

      k_BxNxTxH, v_BxNxTxH = prefixed("prefix_key", k_BxNxTxH), prefixed("prefix_value", v_BxNxTxH)
      mask_Bx1xLxT = jnp.concatenate(
          [jnp.ones(mask_Bx1xLxT.shape[:3] + (prefix,), bool), mask_Bx1xLxT], axis=-1)
    return cached_attention(q_BxLxNxH, k_BxNxTxH, v_BxNxTxH, mask_Bx1xLxT)

  def _prefixed(self, q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array,
                segment_ids_BxL: Array | None, deterministic: bool) -> Array:
    """Attention over [prefix; keys]: P learned key/value positions every query (and segment)
    sees before its causal window (Li & Liang 2021)."""
    a = self.args
    b, length = k_BxLxNxH.shape[:2]

    def with_prefix(name, x_BxLxNxH):
      p_PxNxH = self.param(name, normal(a.init_std, (None, "heads", "kv")),
                           (a.prefix_len, a.n_heads, a.d_head), jnp.float32)
      p_BxPxNxH = jnp.broadcast_to(p_PxNxH.astype(x_BxLxNxH.dtype), (b,) + p_PxNxH.shape)
      return jnp.concatenate([p_BxPxNxH, x_BxLxNxH], axis=1)

    k_BxTxNxH, v_BxTxNxH = with_prefix("prefix_key", k_BxLxNxH), with_prefix("prefix_value",
                                                                               v_BxLxNxH)
    causal = causal_mask(length, self.window, segment_ids_BxL)
    mask = jnp.concatenate([jnp.ones(causal.shape[:3] + (a.prefix_len,), bool), causal], axis=-1)
    if a.attn_dropout > 0.0 and not deterministic:
      return xla_attention(q_BxLxNxH, k_BxTxNxH, v_BxTxNxH, mask, a.attn_dropout,
                           self.make_rng("dropout"))
    return xla_attention(q_BxLxNxH, k_BxTxNxH, v_BxTxNxH, mask)


@jax.custom_vjp
def softmax(x: Array) -> Array:
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


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def xla_attention(q_BxLxNxH: Array, k_BxTxNxH: Array, v_BxTxNxH: Array, mask: Array,
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
  probs_BxNxLxT = softmax(scores_BxNxLxT)
  if dropout_rate > 0.0:
    keep_BxNxLxT = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BxNxLxT.shape)
    probs_BxNxLxT = jnp.where(keep_BxNxLxT, probs_BxNxLxT / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bnqk,bknh->bqnh", probs_BxNxLxT.astype(v_BxTxNxH.dtype), v_BxTxNxH)


def blocked_causal_attention(q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array,
                             window: int | None, segment_ids_BxL: Array | None) -> Array:
  """Causal (optionally banded) attention that never computes a fully masked block.

  The queries are cut into blocks of C = max(64, L / 8) rows; block i attends only to the keys
  some query of it can see, [max(0, i C - window + 1), (i + 1) C), so a dense causal layer does
  about half the score work and a banded one a band's worth. Each block holds all of its keys, so
  its softmax is the ordinary one: the result equals `xla_attention` with the full mask. On CPU
  this is about 1.5x faster than one [L, L] product per head, forward and backward (fewer FLOPs, a
  smaller softmax; benchmarks/attention.py); the heads-major [B, N, L, H] layout lets XLA call its
  batched matmul without copying per block.
  """
  length = q_BxLxNxH.shape[1]
  block = max(64, -(-length // 8))
  mask = causal_mask(length, window, segment_ids_BxL)
  if length < 2 * block:
    return xla_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask)
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
    probs_BxNxCxK = softmax(scores_BxNxCxK).astype(v_BxLxNxH.dtype)
    outs.append(jnp.einsum("bnqk,bnkh->bnqh", probs_BxNxCxK, v_BxNxLxH[:, :, first:end]))
  return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def cached_attention(q_BxLxNxH: Array, k_BxNxTxH: Array, v_BxNxTxH: Array,
                     mask_Bx1xLxT: Array) -> Array:
  """softmax(q k^T / sqrt(H), masked) v for L queries over T cached keys (no backward pass)."""
  scores_BxNxLxT = jnp.einsum("blnh,bnth->bnlt", q_BxLxNxH, k_BxNxTxH,
                              preferred_element_type=jnp.float32)
  scores_BxNxLxT = jnp.where(mask_Bx1xLxT, scores_BxNxLxT / math.sqrt(q_BxLxNxH.shape[-1]),
                             jnp.finfo(jnp.float32).min)
  probs_BxNxLxT = jax.nn.softmax(scores_BxNxLxT, axis=-1).astype(v_BxNxTxH.dtype)
  return jnp.einsum("bnlt,bnth->blnh", probs_BxNxLxT, v_BxNxTxH)


def position_mask(q_pos_BxL: Array, k_pos_BxT: Array, window: int | None) -> Array:
  """Boolean [B, 1, L, T] mask by positions: q sees k iff 0 <= k <= q (and q - k < window)."""
  q, k = q_pos_BxL[:, None, :, None], k_pos_BxT[:, None, None, :]
  mask = (k >= 0) & (k <= q)
  if window is not None:
    mask &= q - k < window
  return mask


def causal_mask(length: int, window: int | None, segment_ids_BxL: Array | None) -> Array:
  """Boolean [B or 1, 1, L, L] mask: query i sees key j iff j <= i (and i - j < window)."""
  i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  mask = j <= i
  if window is not None:
    mask &= i - j < window
  mask = mask[None, None]
  if segment_ids_BxL is not None:
    mask = mask & (segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :])
  return mask
