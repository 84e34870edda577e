"""The attention kernels `model.attention_impl` names, and the masks and softmax they share.

Each kernel maps (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, window, segment_ids_BxL) to out_BxLxNxH
(`KERNELS`); `gptjax.attention.resolve_kernel` decides which one runs, and `Attention` calls it.
Shapes are written as suffixes: B batch, L length (queries), T keys, N heads, H d_head.

  blocked   `blocked_causal_attention`: skips every query x key block the causal (banded) mask
            removes entirely; below L = 128 one masked product (the CPU default)
  xla       `xla_causal_attention`: one masked product; the only kernel with attention dropout
  cudnn     `cudnn_attention`: cuDNN flash attention via `jax.nn.dot_product_attention` (GPU)
  splash    `splash_attention`: the Pallas Splash kernel, per device in a shard_map (TPU)

`cached_attention` (decoding over a KV cache) and the masks `causal_mask` / `position_mask` serve
the layer's own paths. `softmax` is jax.nn.softmax with a backward pass that keeps only its
output; scores and softmax are float32 whatever the compute dtype.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array

SPLASH_BLOCKS = (512, 256, 128)  # Splash tile sizes tried, largest first (all multiples of 128)


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


def xla_causal_attention(q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array,
                         window: int | None, segment_ids_BxL: Array | None,
                         dropout_rate: float = 0.0, dropout_rng: Array | None = None) -> Array:
  """The 'xla' kernel: one masked product over the full causal (banded, segmented) [L, L] mask,
  with optional attention dropout (`xla_attention`)."""
  mask = causal_mask(q_BxLxNxH.shape[1], window, segment_ids_BxL)
  return xla_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask, dropout_rate, dropout_rng)


def _pad_length(multiple: int, segment_ids_BxL: Array | None, *xs_BxLxNxH: Array):
  """(segment ids, arrays) with L padded up to a multiple of `multiple` at the end.

  Real queries never see the padded keys (they come after them); padded tokens get a segment id
  of their own, below every real one, so each padded query still sees a key (itself). The caller
  drops the padded rows of the output.
  """
  length = xs_BxLxNxH[0].shape[1]
  pad = -length % multiple
  if not pad:
    return segment_ids_BxL, xs_BxLxNxH
  xs_BxLxNxH = tuple(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in xs_BxLxNxH)
  if segment_ids_BxL is not None:
    own_Bx1 = segment_ids_BxL.min(axis=1, keepdims=True) - 1
    segment_ids_BxL = jnp.concatenate(
        [segment_ids_BxL, jnp.broadcast_to(own_Bx1, (segment_ids_BxL.shape[0], pad))], axis=1)
  return segment_ids_BxL, xs_BxLxNxH


def cudnn_attention(q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array, window: int | None,
                    segment_ids_BxL: Array | None, *, implementation: str = "cudnn") -> Array:
  """The 'cudnn' kernel: `jax.nn.dot_product_attention` with cuDNN flash attention.

  Causal; a banded layer passes its window as `local_window_size` (the window - 1 keys before
  each query, none after); segment ids become a boolean [B, 1, L, L] mask, which cuDNN adds as a
  bias (it trains with a bias only on even lengths, so an odd L is padded by one). cuDNN takes
  bfloat16/float16 and head widths that are multiples of 8 up to 256 (128 before Hopper).

  Args:
    implementation: 'cudnn'; tests pass 'xla' to check the masks on a CPU.
  """
  length = q_BxLxNxH.shape[1]
  mask = None
  if segment_ids_BxL is not None:
    segment_ids_BxL, (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH) = _pad_length(
        2, segment_ids_BxL, q_BxLxNxH, k_BxLxNxH, v_BxLxNxH)
    mask = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
  out_BxLxNxH = jax.nn.dot_product_attention(
      q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask=mask, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation)
  return out_BxLxNxH[:, :length]


def splash_attention(q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array, window: int | None,
                     segment_ids_BxL: Array | None, *, block: int | None = None,
                     interpret: bool = False) -> Array:
  """The 'splash' kernel: Pallas Splash attention (TPU), causal or locally banded, segmented.

  L is padded up to a multiple of 128 (Splash's tiles are multiples of 128); the tiles are the
  largest of 512, 256, 128 dividing it. Queries are scaled by 1/sqrt(H) first (Splash does not
  scale). Mosaic kernels cannot be partitioned by XLA, so under a mesh each device runs the
  kernel on its own batch rows and heads, in a shard_map over the logical 'batch' and 'heads'
  axes (the length is gathered whole).

  Args:
    block: the tile size (a multiple of 128 dividing the padded L); None = the largest that fits.
    interpret: run the kernel in the Pallas interpreter (tests on a CPU; not a setting).
  """
  # Pallas (and its import time) only when Splash runs.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel
  length, h = q_BxLxNxH.shape[1], q_BxLxNxH.shape[-1]
  segment_ids_BxL, (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH) = _pad_length(
      SPLASH_BLOCKS[-1], segment_ids_BxL, q_BxLxNxH, k_BxLxNxH, v_BxLxNxH)
  padded = q_BxLxNxH.shape[1]
  block = block or next(b for b in SPLASH_BLOCKS if padded % b == 0)
  q_BxLxNxH = q_BxLxNxH * jnp.asarray(1.0 / math.sqrt(h), q_BxLxNxH.dtype)

  def local(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL):
    shape = (padded, padded)
    mask = (splash.CausalMask(shape) if window is None
            else splash.LocalMask(shape, window_size=(window - 1, 0), offset=0))
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([mask] * q_BxLxNxH.shape[2]),
        block_sizes=splash.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
        head_shards=1, q_seq_shards=1, interpret=interpret)
    q_BxNxLxH, k_BxNxLxH, v_BxNxLxH = (x.transpose(0, 2, 1, 3)
                                       for x in (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH))
    if segment_ids_BxL is None:
      out_BxNxLxH = jax.vmap(kernel)(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH)
    else:
      out_BxNxLxH = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(
          s, s)))(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, segment_ids_BxL.astype(jnp.int32))
    return out_BxNxLxH.transpose(0, 2, 1, 3)

  return _per_device(local, q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL)[:, :length]


def _per_device(fn, q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array,
                segment_ids_BxL: Array | None) -> Array:
  """`fn(q, k, v, segment_ids)` on each device's batch rows and heads of the current mesh (no
  mesh: on the whole arrays). The mesh axes come from the logical axis rules in force."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL)
  batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  spec = P(batch, None, heads, None)
  if segment_ids_BxL is None:
    return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(spec,) * 3,
                         out_specs=spec, check_vma=False)(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3 + (P(batch, None),), out_specs=spec,
                       check_vma=False)(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL)


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


# The kernels `model.attention_impl` names, each (q, k, v, window, segment_ids) -> out.
KERNELS = {"blocked": blocked_causal_attention, "xla": xla_causal_attention,
           "cudnn": cudnn_attention, "splash": splash_attention}
