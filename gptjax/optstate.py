"""Optimizer states matched by role and parameter path, however the Optax chain is wrapped.

An Optax state is a tree of named tuples inside chains and wrappers: Adam's moments sit at
`[1][0].mu['wte']['embedding']` under clipping, at `[0].mu[...]` without it, and under
`inner_state` when `apply_if_finite` wraps the chain. Changing `optim.clip_norm`,
`train.nonfinite` or `compress.prune` between a save and a resume therefore changes the tree while
every moment keeps its meaning. Here a leaf's *role* is its path with positions and wrapper fields
dropped: `('mu', 'wte', 'embedding')`, `('count',)`, `('notfinite_count',)`. Leaves of the saved
and the current state with the same role are the same quantity; several leaves with one role (the
step counts of Adam and of the schedule) pair up in chain order.

Orbax saves a named tuple as a dict of its fields, so a saved tree's paths give the same roles.
"""

import collections
from collections.abc import Sequence
import dataclasses
from typing import Any

import jax

# Fields that only wrap another state: they say nothing about what the leaves below them are.
_WRAPPERS = ("inner_state", "inner_states")


def role(path: Sequence[Any]) -> tuple[str, ...]:
  """The names along a key path, without sequence positions and wrapper fields."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      name = str(key.key)
    elif isinstance(key, jax.tree_util.GetAttrKey):
      name = key.name
    else:  # SequenceKey, FlattenedIndexKey: a position in a chain
      continue
    if name not in _WRAPPERS:
      names.append(name)
  return tuple(names)


def _order(path: Sequence[Any]) -> tuple:
  """A sort key following the chain order: positions compare as numbers, names as strings."""
  out = []
  for key in path:
    if isinstance(key, jax.tree_util.SequenceKey):
      out.append((0, key.idx, ""))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      out.append((0, key.key, ""))
    else:
      out.append((1, 0, str(getattr(key, "key", getattr(key, "name", key)))))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Match:
  """How the leaves of a target state map onto the leaves of a saved one.

  Attributes:
    source: for each target leaf (in `jax.tree.leaves` order) the index of its saved leaf, or None.
    fresh: roles of the target leaves with no saved counterpart (they start from their init).
    dropped: roles of the saved leaves nothing in the target uses.
  """

  source: tuple[int | None, ...]
  fresh: tuple[tuple[str, ...], ...]
  dropped: tuple[tuple[str, ...], ...]


def match(target: Any, saved: Any) -> Match:
  """Pairs the leaves of `target` with those of `saved` (trees of anything) by role."""
  target_flat = jax.tree_util.tree_flatten_with_path(target)[0]
  saved_flat = jax.tree_util.tree_flatten_with_path(saved)[0]

  def queues(flat):
    by_role = collections.defaultdict(list)
    for i in sorted(range(len(flat)), key=lambda i: _order(flat[i][0])):
      by_role[role(flat[i][0])].append(i)
    return by_role

  saved_by_role = queues(saved_flat)
  source: list[int | None] = [None] * len(target_flat)
  used = set()
  for name, indices in queues(target_flat).items():
    for i, j in zip(indices, saved_by_role.get(name, [])):
      source[i] = j
      used.add(j)
  fresh = tuple(role(target_flat[i][0]) for i, s in enumerate(source) if s is None)
  dropped = tuple(role(saved_flat[j][0]) for j in range(len(saved_flat)) if j not in used)
  return Match(tuple(source), fresh, dropped)


def describe(roles: Sequence[tuple[str, ...]], limit: int = 6) -> str:
  """A short list of roles for a one-line message: 'notfinite_count, masks/wte/embedding, ...'."""
  names = sorted({"/".join(r) for r in roles})
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more
