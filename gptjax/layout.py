"""Conversion between the scanned and unrolled parameter layouts of the GPT blocks.

Scanned (`scan_layers=True`): `layers/block_{j}/...` with a leading axis of n_layers / period, where
period is the length of the attention pattern; layer l lives at index l // period of `block_{l %
period}`. Unrolled: `block_{l}/...` without the leading axis. Everything else is shared. Works on
any pytree shaped like the params (e.g. Adam moments) and keeps `nn.Partitioned` boxes consistent.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def is_scanned(tree: dict[str, Any]) -> bool:
  return "layers" in tree


def unstack(tree: dict[str, Any], period: int) -> dict[str, Any]:
  """Scanned layout -> unrolled layout (plain arrays)."""
  if not is_scanned(tree):
    return tree
  out = {k: v for k, v in tree.items() if k != "layers"}
  groups = nn.meta.unbox(tree["layers"])
  n_groups = jax.tree.leaves(groups)[0].shape[0]
  for g in range(n_groups):
    for j in range(period):
      out[f"block_{g * period + j}"] = jax.tree.map(lambda x, g=g: x[g], groups[f"block_{j}"])
  return out


def stack(tree: dict[str, Any], period: int) -> dict[str, Any]:
  """Unrolled layout -> scanned layout (plain arrays)."""
  if is_scanned(tree):
    return tree
  n_layers = sum(1 for k in tree if k.startswith("block_"))
  out = {k: v for k, v in tree.items() if not k.startswith("block_")}
  out["layers"] = {
      f"block_{j}": jax.tree.map(lambda *xs: jnp.stack(xs),
                                 *[nn.meta.unbox(tree[f"block_{l}"])
                                   for l in range(j, n_layers, period)])
      for j in range(period)}
  return out


def convert(tree: dict[str, Any], scan_layers: bool, period: int) -> dict[str, Any]:
  """Returns `tree` in the layout that `scan_layers` asks for."""
  return stack(tree, period) if scan_layers else unstack(tree, period)
