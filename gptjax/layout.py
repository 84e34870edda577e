"""Conversion between the scanned and unrolled parameter layouts of the GPT blocks.

Scanned (`scan_layers=True`): `layers/block_{j}/...` with a leading axis of n_layers / period, where
period is the length of the attention pattern; layer l lives at index l // period of `block_{l %
period}`. Unrolled: `block_{l}/...` without the leading axis. Everything else is shared. Works on
any pytree shaped like the params (e.g. Adam moments) and keeps `nn.Partitioned` boxes consistent.

`convert_tree` converts every params-shaped subtree of a larger tree (a whole optimizer state);
`take_abstract` / `join_abstract` do the same on `jax.ShapeDtypeStruct`s (or checkpoint metadata),
moving a `NamedSharding`'s spec with the layer axis, so a restore can be planned without data.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax.errors import ConfigError


def is_scanned(tree: Mapping[str, Any]) -> bool:
  return "layers" in tree


def period_of(tree: Mapping[str, Any]) -> int:
  """Blocks per scanned group (the attention pattern's length) of a scanned tree."""
  return sum(1 for k in tree["layers"] if k.startswith("block_"))


def _take(x, g: int):
  return x[g]


def _join(*xs):
  return jnp.stack(xs)


def unstack(tree: Mapping[str, Any], period: int,
            take: Callable[[Any, int], Any] = _take) -> dict[str, Any]:
  """Scanned layout -> unrolled layout (plain arrays); `take(x, g)` picks group g of a leaf."""
  if not is_scanned(tree):
    return dict(tree)
  out = {k: v for k, v in tree.items() if k != "layers"}
  groups = nn.meta.unbox(tree["layers"])
  n_groups = jax.tree.leaves(groups)[0].shape[0]
  for g in range(n_groups):
    for j in range(period):
      out[f"block_{g * period + j}"] = jax.tree.map(lambda x, g=g: take(x, g), groups[f"block_{j}"])
  return out


def stack(tree: Mapping[str, Any], period: int, join: Callable[..., Any] = _join) -> dict[str, Any]:
  """Unrolled layout -> scanned layout (plain arrays); `join(*xs)` stacks one leaf's layers."""
  if is_scanned(tree):
    return dict(tree)
  n_layers = sum(1 for k in tree if k.startswith("block_"))
  out = {k: v for k, v in tree.items() if not k.startswith("block_")}
  out["layers"] = {
      f"block_{j}": jax.tree.map(join, *[nn.meta.unbox(tree[f"block_{l}"])
                                         for l in range(j, n_layers, period)])
      for j in range(period)}
  return out


def convert(tree: Mapping[str, Any], scan_layers: bool, period: int, take=_take,
            join=_join) -> dict[str, Any]:
  """Returns `tree` in the layout that `scan_layers` asks for."""
  return stack(tree, period, join) if scan_layers else unstack(tree, period, take)


def _is_params_like(x) -> bool:
  return isinstance(x, Mapping) and ("layers" in x or "block_0" in x)


def convert_tree(tree: Any, scan_layers: bool, period: int, take=_take, join=_join) -> Any:
  """`convert` applied to every params-shaped subtree of `tree` (params, Adam mu and nu, ...)."""
  return jax.tree.map(
      lambda x: convert(x, scan_layers, period, take, join) if _is_params_like(x) else x, tree,
      is_leaf=_is_params_like)


def take_abstract(x, g: int) -> jax.ShapeDtypeStruct:
  """The abstract value of `x[g]` for anything with a shape and dtype; drops the spec's axis 0."""
  del g
  sharding = x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) else None
  if sharding is not None:
    sharding = NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
  return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=sharding)


def join_abstract(*xs) -> jax.ShapeDtypeStruct:
  """The abstract value of `jnp.stack(xs)`; the new leading axis is replicated."""
  x = xs[0]
  sharding = x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) else None
  if sharding is not None:
    sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
  return jax.ShapeDtypeStruct((len(xs),) + tuple(x.shape), x.dtype, sharding=sharding)


# ---- restoring a checkpoint saved in either layout ---------------------------------------------
class RestorePlan:
  """How to restore a checkpoint saved in one layout into a model of (maybe) the other one.

  Checks the shapes first (in the model's layout), so a checkpoint of another model is refused with
  the list of mismatched parameters before anything is read.
  """

  def __init__(self, stored, abstract_params, what: str):
    self.convert = False
    if stored is None:  # unreadable metadata: let the restore fail and the caller fall back
      return
    saved_scanned, target_scanned = is_scanned(stored), is_scanned(abstract_params)
    if saved_scanned == target_scanned:
      check_shapes(stored, abstract_params, what)
      return
    self.convert, self.saved_scanned = True, saved_scanned
    self.period = period_of(stored if saved_scanned else abstract_params)
    as_model = convert(
        jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored), target_scanned,
        self.period, take_abstract, join_abstract)
    check_shapes(as_model, abstract_params,
                 f"{what} (saved with model.scan_layers={saved_scanned}, compared unstacked)"
                 if saved_scanned else f"{what} (saved with model.scan_layers=False)")

  def saved_layout(self, abstract_tree):
    """`abstract_tree` (params or an optimizer state) as it was saved, sharded like the target."""
    if not self.convert:
      return abstract_tree
    return convert_tree(abstract_tree, self.saved_scanned, self.period,
                               take_abstract, join_abstract)

  def to_target(self, tree, abstract_tree):
    """Converts restored arrays to the target layout on the devices, placed as the target says."""
    if not self.convert:
      return tree
    out_shardings = jax.tree.map(lambda x: x.sharding, abstract_tree)
    target_scanned = not self.saved_scanned
    return jax.jit(lambda t: convert_tree(t, target_scanned, self.period),
                   out_shardings=out_shardings)(tree)


def check_shapes(stored, expected, what: str) -> None:
  """Raises ConfigError listing every parameter whose stored shape differs from the model's."""
  stored_flat = {jax.tree_util.keystr(k): v.shape
                 for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
  expected_flat = {jax.tree_util.keystr(k): v.shape
                   for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  bad = [f"{k}: stored {stored_flat.get(k)}, model {expected_flat.get(k)}"
         for k in sorted(set(stored_flat) | set(expected_flat))
         if tuple(stored_flat.get(k) or ()) != tuple(expected_flat.get(k) or ())]
  if bad:
    raise ConfigError(f"{what} does not fit this model; mismatched parameters: "
                      + "; ".join(bad[:8])
                      + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else "")
                      + ". Use the model config it was trained with, or a new workdir.")
