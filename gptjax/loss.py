"""Token cross-entropy in float32: the plain path, a fused one, and a vocab-parallel one.

All return (sum of weighted token losses, sum of weights), so micro-batches and hosts can be summed
before dividing once (exact gradient accumulation, even with masked tokens). With `return_z=True`
they also return the z-loss part of that sum, sum of weight * z_loss * (log Z)^2, so the
cross-entropy can be reported apart from the regulariser.

- `cross_entropy_sum(logits, ...)`: from materialised [B, L, V] logits.
- `unembed_cross_entropy_sum(x, w, ...)`: the output projection and the loss fused, one chunk of
  rows at a time, so the [B·L, V] logits (and their gradient) never exist whole. The train step
  uses it whenever the vocabulary is not sharded.
- `vocab_parallel_cross_entropy_sum(logits, ...)`: the vocabulary sharded over the `tensor` axis.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

Array = jax.Array
# Rows (tokens) per chunk of the fused loss: [512, V] float32 logits at a time, sized for CPU
# caches. The default of config.train.loss_chunk_rows (configs/base.py), which the step passes in.
CHUNK_ROWS = 512


def cross_entropy_sum(logits_BxLxV: Array, targets_BxL: Array, weights_BxL: Array | None = None,
                      z_loss: float = 0.0, return_z: bool = False):
  """Sum over tokens of -log p(target) (+ z_loss * log(Z)^2), and the sum of weights (and, with
  `return_z`, the z-loss part of the sum)."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = log_z_BxL - target_logit_BxL
  z_BxL = z_loss * jnp.square(log_z_BxL) if z_loss else jnp.zeros_like(nll_BxL)
  if weights_BxL is None:
    weights_BxL = jnp.ones_like(nll_BxL)
  total, count = ((nll_BxL + z_BxL) * weights_BxL).sum(), weights_BxL.sum()
  return (total, count, (z_BxL * weights_BxL).sum()) if return_z else (total, count)


def cross_entropy(logits_BxLxV: Array, targets_BxL: Array, weights_BxL: Array | None = None,
                  z_loss: float = 0.0) -> tuple[Array, Array]:
  """Mean token cross-entropy and the number of weighted tokens."""
  total, count = cross_entropy_sum(logits_BxLxV, targets_BxL, weights_BxL, z_loss)[:2]
  return total / jnp.maximum(count, 1.0), count


def vocab_parallel_cross_entropy_sum(logits_BxLxV: Array, targets_BxL: Array,
                                     weights_BxL: Array | None, z_loss: float, mesh: Mesh,
                                     batch_axes, return_z: bool = False):
  """`cross_entropy_sum` with the vocabulary sharded over the mesh's `tensor` axis.

  Each tensor shard reduces its own slice of the vocabulary (max, sum of exponentials, the target
  logit if the target falls in its slice) and only these [B, L] statistics cross devices: the full
  [B, L, V] logits are never gathered.
  """
  if weights_BxL is None:
    weights_BxL = jnp.ones(targets_BxL.shape, jnp.float32)

  @functools.partial(
      jax.shard_map, mesh=mesh,
      in_specs=(P(batch_axes, None, "tensor"), P(batch_axes, None), P(batch_axes, None)),
      out_specs=(P(), P(), P()))
  def local(logits, targets, weights):
    logits = logits.astype(jnp.float32)
    v_local = logits.shape[-1]
    offset = jax.lax.axis_index("tensor") * v_local
    # The max only stabilises the exponentials; its gradient contribution cancels exactly.
    m = jax.lax.pmax(jax.lax.stop_gradient(logits.max(-1)), "tensor")
    log_z = m + jnp.log(jax.lax.psum(jnp.exp(logits - m[..., None]).sum(-1), "tensor"))
    local_t = targets - offset
    mine = (local_t >= 0) & (local_t < v_local)
    picked = jnp.take_along_axis(logits, jnp.clip(local_t, 0, v_local - 1)[..., None], -1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(mine, picked, 0.0), "tensor")
    z = z_loss * jnp.square(log_z) if z_loss else jnp.zeros_like(log_z)
    nll = log_z - target_logit + z
    axes = tuple(a for a in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes or ()))
    sums = (nll * weights).sum(), weights.sum(), (z * weights).sum()
    if axes:
      sums = tuple(jax.lax.psum(x, axes) for x in sums)
    return sums

  out = local(logits_BxLxV, targets_BxL, weights_BxL)
  return out if return_z else out[:2]


def unembed_cross_entropy_sum(x_BxLxD: Array, w_VxD: Array, targets_BxL: Array,
                              weights_BxL: Array | None = None, z_loss: float = 0.0,
                              vocab_size: int | None = None, chunk_rows: int = CHUNK_ROWS,
                              mesh: Mesh | None = None, batch_axes=None, return_z: bool = False):
  """`cross_entropy_sum(x @ w.T, ...)` without materialising the logits.

  The rows (tokens) are processed in chunks of `chunk_rows`: each chunk's [chunk_rows, V] float32
  logits give its log-normaliser and target logit and are dropped. Under differentiation the
  same pass also forms d loss / d logits = softmax - onehot for the chunk and contracts it at once
  into the gradients of `x` and `w`; the backward pass only scales them by the incoming cotangent.
  So a train step costs the three matmuls of the output projection and one pass over each chunk,
  never a [B·L, V] array in memory; evaluation (no gradient) costs one matmul.

  Args:
    x_BxLxD: final hidden states, in the compute dtype.
    w_VxD: output embedding (the token embedding when tied), in the compute dtype.
    targets_BxL: int target ids.
    weights_BxL: per-token loss weights (default 1).
    z_loss: weight of (log Z)^2 added to each token's loss.
    vocab_size: ids >= vocab_size (padding rows of `w`) get -1e30 logits, as `GPT.logits` does.
    chunk_rows: rows per chunk; B·L is padded up to a multiple with zero-weight rows.
    mesh, batch_axes: if given, each device reduces its own rows of the batch (sharded over
      `batch_axes`) against the whole `w`, and the sums are added over devices.
    return_z: also return the z-loss part of the loss sum (not differentiable on its own: its
      gradient is part of the loss sum's).

  Returns:
    (sum of weighted token losses, sum of weights[, z-loss part]), float32 scalars.
  """
  if weights_BxL is None:
    weights_BxL = jnp.ones(targets_BxL.shape, jnp.float32)
  local = functools.partial(_unembed_xent_local, z_loss=z_loss,
                            vocab_size=vocab_size or w_VxD.shape[0], chunk_rows=chunk_rows)
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  if mesh is None or all(mesh.shape[a] == 1 for a in axes):
    out = local(x_BxLxD, w_VxD, targets_BxL, weights_BxL)
    return out if return_z else out[:2]

  @functools.partial(
      jax.shard_map, mesh=mesh,
      in_specs=(P(batch_axes, None, None), P(), P(batch_axes, None), P(batch_axes, None)),
      out_specs=(P(), P(), P()))
  def sharded(x, w, targets, weights):
    # Each device's dw is a partial sum; marking w as varying makes its transpose sum them.
    sums = local(x, jax.lax.pcast(w, axes, to="varying"), targets, weights)
    return tuple(jax.lax.psum(s, axes) for s in sums)

  out = sharded(x_BxLxD, w_VxD, targets_BxL, weights_BxL)
  return out if return_z else out[:2]


def _unembed_xent_local(x_BxLxD, w_VxD, targets_BxL, weights_BxL, z_loss, vocab_size, chunk_rows):
  b, l, d = x_BxLxD.shape
  n = b * l
  weights_N = weights_BxL.reshape(n).astype(jnp.float32)
  chunk = min(chunk_rows, n)
  pad = -n % chunk
  x_NxD = jnp.pad(x_BxLxD.reshape(n, d), ((0, pad), (0, 0)))
  targets_N = jnp.pad(targets_BxL.reshape(n), (0, pad))
  total, z_total = _fused_xent(x_NxD, w_VxD, targets_N, jnp.pad(weights_N, (0, pad)),
                               float(z_loss), vocab_size, chunk)
  return total, weights_N.sum(), z_total


def _chunk_xent(x_CxD, w_VxD, targets_C, weights_C, z_loss, vocab_size, with_grads):
  """Token losses (z-loss included) of one chunk, their z-loss parts and, if asked, their
  gradients w.r.t. x and w (float32 dw)."""
  logits_CxV = jax.lax.dot_general(x_CxD, w_VxD, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
  ids_V = jnp.arange(w_VxD.shape[0])
  if vocab_size < w_VxD.shape[0]:
    logits_CxV = jnp.where(ids_V < vocab_size, logits_CxV, -1e30)
  max_C = jax.lax.stop_gradient(logits_CxV.max(-1))
  exp_CxV = jnp.exp(logits_CxV - max_C[:, None])
  sum_C = exp_CxV.sum(-1)
  log_z_C = max_C + jnp.log(sum_C)
  z_C = z_loss * jnp.square(log_z_C) if z_loss else jnp.zeros_like(log_z_C)
  nll_C = log_z_C - jnp.take_along_axis(logits_CxV, targets_C[:, None], axis=-1)[:, 0] + z_C
  if not with_grads:
    return nll_C, z_C
  # d nll / d logits = softmax * (1 + 2 z log Z) - onehot, scaled by the token's weight.
  scale_C = weights_C * (1.0 + 2.0 * z_loss * log_z_C) / sum_C
  dlogits_CxV = (exp_CxV * scale_C[:, None]
                 - jnp.where(ids_V == targets_C[:, None], weights_C[:, None], 0.0))
  dlogits_CxV = dlogits_CxV.astype(x_CxD.dtype)
  dx_CxD = jax.lax.dot_general(dlogits_CxV, w_VxD, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(x_CxD.dtype)
  dw_VxD = jax.lax.dot_general(dlogits_CxV, x_CxD, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  return nll_C, z_C, dx_CxD, dw_VxD


def _chunks(x_NxD, targets_N, weights_N, chunk):
  n, d = x_NxD.shape
  return (x_NxD.reshape(n // chunk, chunk, d), targets_N.reshape(n // chunk, chunk),
          weights_N.reshape(n // chunk, chunk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_xent(x_NxD, w_VxD, targets_N, weights_N, z_loss, vocab_size, chunk):
  """(weighted loss sum, its z-loss part); only the first is differentiated."""
  def chunk_sum(xs):
    x, t, wt = xs
    nll, z = _chunk_xent(x, w_VxD, t, wt, z_loss, vocab_size, False)
    return (nll * wt).sum(), (z * wt).sum()

  totals, zs = jax.lax.map(chunk_sum, _chunks(x_NxD, targets_N, weights_N, chunk))
  return totals.sum(), zs.sum()


def _fused_xent_fwd(x_NxD, w_VxD, targets_N, weights_N, z_loss, vocab_size, chunk):
  def chunk_grads(xs):
    x, t, wt = xs
    return _chunk_xent(x, w_VxD, t, wt, z_loss, vocab_size, True)

  def body(dw_VxD, xs):
    nll, z, dx, dw = chunk_grads(xs)
    return dw_VxD + dw, (nll, z, dx)

  # The first chunk starts the dw sum (no zeros to write and add); a scan does the rest.
  chunks = _chunks(x_NxD, targets_N, weights_N, chunk)
  nll0, z0, dx0, dw_VxD = chunk_grads(jax.tree.map(lambda c: c[0], chunks))
  dw_VxD, (nll, z, dx) = jax.lax.scan(body, dw_VxD, jax.tree.map(lambda c: c[1:], chunks))
  nll_N = jnp.concatenate([nll0, nll.reshape(-1)])
  z_N = jnp.concatenate([z0, z.reshape(-1)])
  dx_NxD = jnp.concatenate([dx0, dx.reshape(-1, dx0.shape[-1])])
  residuals = (dx_NxD, dw_VxD.astype(w_VxD.dtype), nll_N, targets_N)
  return ((nll_N * weights_N).sum(), (z_N * weights_N).sum()), residuals


def _fused_xent_bwd(z_loss, vocab_size, chunk, residuals, cotangents):
  del z_loss, vocab_size, chunk
  g, _ = cotangents  # the z-loss part is reported, never differentiated on its own
  dx_NxD, dw_VxD, nll_N, targets_N = residuals
  int_zero = np.zeros(targets_N.shape, jax.dtypes.float0)
  return (g * dx_NxD).astype(dx_NxD.dtype), (g * dw_VxD).astype(dw_VxD.dtype), int_zero, g * nll_N


_fused_xent.defvjp(_fused_xent_fwd, _fused_xent_bwd)
