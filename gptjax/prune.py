"""Magnitude pruning of the Linear kernels as an Optax transformation.

    tx = optax.chain(adamw, prune.transform(cfg.compress.prune, total_steps))

Chained after the optimizer, `transform` rewrites each step's updates so that the pruned weights
land exactly on zero (update = -weight) and the others move as the optimizer says. The masks are
recomputed from the current magnitudes at every step of the schedule's ramp and frozen after it,
so a weight once pruned stays exactly zero for the rest of training (it is 0, the smallest
magnitude, whenever the mask is recomputed).

- 'magnitude' (unstructured): at optimizer step t, the floor(s(t) · n) smallest-magnitude weights
  of each kernel (of each layer, when layers are stacked by nn.scan) are zero, with the sparsity
  s(t) rising polynomially (Zhu & Gupta 2017, `optax.polynomial_schedule`) from 0 at `begin_step`
  to `sparsity` at `end_step`.
- '2:4' (structured): from `begin_step` on, in every group of 4 consecutive weights along a
  kernel's input (contraction) axes, the 2 smallest are zero, for each output: the pattern sparse
  tensor cores execute.

Only `kernel` leaves (attention qkv/out, MLP fc/proj) are pruned; embeddings, biases and
LayerNorms are left dense.
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from gptjax.errors import ConfigError

METHODS = ("none", "magnitude", "2:4")
_N, _M = 2, 4  # '2:4': at most N non-zeros in every M


def _names(path) -> list[str]:
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def _is_kernel(path) -> bool:
  return _names(path)[-1:] == ["kernel"]


def _shape3(path, shape: tuple[int, ...]) -> tuple[int, int, int]:
  """(layers, inputs, outputs): a kernel is [layers?, *in_shape, *out_shape] (`attn/out` has 2
  input axes, (heads, d_head); every other Linear one). The layer axis exists where nn.scan
  stacked the blocks: under a `layers` key anywhere in the path (at the top in pre-training,
  under `base` in fine-tuning)."""
  lead = 1 if "layers" in _names(path) else 0
  n_in = 2 if _names(path)[-2:-1] == ["out"] else 1
  return (math.prod(shape[:lead]), math.prod(shape[lead:lead + n_in]),
          math.prod(shape[lead + n_in:]))


def _magnitude_mask(w_LxKxM: jax.Array, k: jax.Array) -> jax.Array:
  """True where kept: all but the k smallest |w| of each layer (ties broken by position)."""
  flat_LxN = jnp.abs(w_LxKxM).reshape(w_LxKxM.shape[0], -1)
  order_LxN = jnp.argsort(flat_LxN, axis=-1, stable=True)
  rank_LxN = jnp.argsort(order_LxN, axis=-1)  # rank of each weight by magnitude
  return (rank_LxN >= k).reshape(w_LxKxM.shape)


def _nm_mask(w_LxKxM: jax.Array) -> jax.Array:
  """True where kept: the N largest |w| of every M consecutive inputs, for each output."""
  l, k, m = w_LxKxM.shape
  groups = jnp.abs(w_LxKxM).reshape(l, k // _M, _M, m)
  rank = jnp.argsort(jnp.argsort(groups, axis=2, stable=True), axis=2)
  return (rank >= _M - _N).reshape(l, k, m)


class PruneState(NamedTuple):
  count: jax.Array  # updates so far (int32)
  masks: Any  # per kernel: bool, True = kept; None for the leaves left dense


def sparsity_schedule(p: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Fraction of each kernel at zero after optimizer step t ('magnitude')."""
  begin, end = p.begin_step, _end_step(p, total_steps)
  return optax.polynomial_schedule(0.0, p.sparsity, p.power, max(end - begin, 1), begin)


def _end_step(p: ml_collections.ConfigDict, total_steps: int) -> int:
  if p.method == "2:4":
    return p.begin_step
  return p.end_step or max(total_steps - 1, p.begin_step)


def transform(p: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The pruning transformation of `config.compress.prune` (chain it after the optimizer).

  Args:
    p: `cfg.compress.prune`.
    total_steps: the run's optimizer steps (the end of the ramp when `end_step` is 0).
  """
  check(p, total_steps)
  schedule = sparsity_schedule(p, total_steps)
  begin, end = p.begin_step, _end_step(p, total_steps)

  def init(params):
    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)

    def first_mask(path, x):
      if not _is_kernel(path):
        return None
      value = x.unbox() if boxed(x) else x
      if p.method == "2:4" and _shape3(path, value.shape)[1] % _M:
        raise ConfigError(
            f"config.compress.prune.method: '2:4' groups {_M} consecutive inputs, but "
            f"{'/'.join(_names(path))} has {_shape3(path, value.shape)[1]} inputs. Use "
            "'magnitude', or widths that are multiples of 4.")
      ones = jnp.ones(value.shape, bool)
      return x.replace_boxed(ones) if boxed(x) else ones  # masks shard like their kernels

    masks = jax.tree_util.tree_map_with_path(first_mask, params, is_leaf=boxed)
    return PruneState(jnp.zeros((), jnp.int32), masks)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("prune.transform needs the parameters: call update(updates, state, params)")
    count = state.count
    k_fraction = schedule(count)

    def new_mask(path, w, old):
      if old is None:
        return None
      shape = _shape3(path, w.shape)

      def compute(w):
        w3 = w.reshape(shape)
        if p.method == "2:4":
          return _nm_mask(w3).reshape(w.shape)
        k = jnp.floor(k_fraction * (shape[1] * shape[2])).astype(jnp.int32)
        return _magnitude_mask(w3, k).reshape(w.shape)

      return jax.lax.cond((count >= begin) & (count <= end), compute, lambda _: old, w)

    masks = jax.tree_util.tree_map_with_path(new_mask, params, state.masks,
                                             is_leaf=lambda x: x is None)
    updates = jax.tree.map(lambda u, w, m: u if m is None else jnp.where(m, u, -w).astype(u.dtype),
                           updates, params, masks, is_leaf=lambda x: x is None)
    return updates, PruneState(count + 1, masks)

  return optax.GradientTransformation(init, update)


def check(p: ml_collections.ConfigDict, total_steps: int | None = None) -> None:
  """Raises ConfigError naming the first invalid `config.compress.prune` setting."""
  if p.method not in METHODS:
    raise ConfigError(f"config.compress.prune.method: unknown method {p.method!r}. Use one of "
                      f"{METHODS}.")
  if not 0.0 <= p.sparsity < 1.0:
    raise ConfigError(f"config.compress.prune.sparsity: {p.sparsity} is not a fraction in [0, 1). "
                      "0.5 prunes half of each kernel.")
  if p.begin_step < 0 or p.end_step < 0 or (p.end_step and p.end_step < p.begin_step):
    raise ConfigError(f"config.compress.prune.begin_step/end_step: {p.begin_step}/{p.end_step} is "
                      "not a ramp. Use 0 <= begin_step <= end_step (end_step 0 = the last step).")
  if total_steps is not None and p.method != "none" and p.begin_step >= total_steps:
    raise ConfigError(f"config.compress.prune.begin_step: {p.begin_step} is past the run's last "
                      f"step ({total_steps - 1}), so nothing would be pruned.")
  if p.power <= 0:
    raise ConfigError(f"config.compress.prune.power: must be > 0, got {p.power} (3 = Zhu & Gupta).")


def sparsity_of(params: Any) -> dict[str, float]:
  """Fraction of exact zeros in each kernel, by path ('layers/block_0/mlp/fc/kernel': 0.5)."""
  return {"/".join(_names(path)): float(jnp.mean(x == 0))
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0] if _is_kernel(path)}
