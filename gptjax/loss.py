"""Token cross-entropy in float32: the plain path, and a vocab-parallel one under tensor parallelism.

Both return (sum of weighted token losses, sum of weights), so micro-batches and hosts can be summed
before dividing once (exact gradient accumulation, even with masked tokens).
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

Array = jax.Array


def cross_entropy_sum(logits_BxLxV: Array, targets_BxL: Array, weights_BxL: Array | None = None,
                      z_loss: float = 0.0) -> tuple[Array, Array]:
  """Sum over tokens of -log p(target) (+ z_loss * log(Z)^2), and the sum of weights."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = log_z_BxL - target_logit_BxL
  if z_loss:
    nll_BxL = nll_BxL + z_loss * jnp.square(log_z_BxL)
  if weights_BxL is None:
    weights_BxL = jnp.ones_like(nll_BxL)
  return (nll_BxL * weights_BxL).sum(), weights_BxL.sum()


def cross_entropy(logits_BxLxV: Array, targets_BxL: Array, weights_BxL: Array | None = None,
                  z_loss: float = 0.0) -> tuple[Array, Array]:
  """Mean token cross-entropy and the number of weighted tokens."""
  total, count = cross_entropy_sum(logits_BxLxV, targets_BxL, weights_BxL, z_loss)
  return total / jnp.maximum(count, 1.0), count


def vocab_parallel_cross_entropy_sum(logits_BxLxV: Array, targets_BxL: Array,
                                     weights_BxL: Array | None, z_loss: float, mesh: Mesh,
                                     batch_axes) -> tuple[Array, Array]:
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
      out_specs=(P(), P()))
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
    nll = log_z - target_logit
    if z_loss:
      nll = nll + z_loss * jnp.square(log_z)
    axes = tuple(a for a in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes or ()))
    total, count = (nll * weights).sum(), weights.sum()
    if axes:
      total, count = jax.lax.psum(total, axes), jax.lax.psum(count, axes)
    return total, count

  return local(logits_BxLxV, targets_BxL, weights_BxL)
