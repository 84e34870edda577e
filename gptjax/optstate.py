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
`OptPlan` reads a saved state into the current tree by these roles (as `gptjax.checkpoint` restores
a run); `fill_fresh` initialises the leaves that have no saved counterpart.
"""

import collections
from collections.abc import Sequence
import dataclasses
from typing import Any

import jax

from gptjax import layout
from gptjax.errors import ConfigError

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


# ---- reading a saved state into the current tree -------------------------------------------
class OptPlan:
  """How to read a saved optimizer state into the current one's tree .

  Leaves are paired by role; paired leaves must have the same shape. The saved tree is read as it
  was written, each leaf sharded like its counterpart (or like the parameter it belongs to, or
  replicated), and rebuilt in the current tree with placeholders where state starts fresh.
  """

  def __init__(self, target, saved, what: str):
    self.match = match(target, saved)
    self._target_leaves, self._treedef = jax.tree.flatten(target)
    saved_flat, self._saved_treedef = jax.tree_util.tree_flatten_with_path(saved)
    mesh = next(x.sharding.mesh for x in self._target_leaves
                if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding))
    sharding: dict[int, Any] = {}
    bad = []
    for i, j in enumerate(self.match.source):
      if j is None:
        continue
      t, (path, s) = self._target_leaves[i], saved_flat[j]
      if tuple(t.shape) != tuple(s.shape):
        bad.append(f"{jax.tree_util.keystr(path)}: stored {tuple(s.shape)}, now {tuple(t.shape)}")
      sharding[j] = t.sharding
    if bad:
      raise ConfigError(f"{what} has an optimizer state that does not fit this model: "
                        + "; ".join(bad[:6]) + ". Use the model config it was trained with, or "
                        "checkpoint.restore_from (weights only) in a new workdir.")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.saved_abstract = jax.tree_util.tree_unflatten(self._saved_treedef, [
        jax.ShapeDtypeStruct(tuple(s.shape), s.dtype, sharding=sharding.get(j, replicated))
        for j, (_, s) in enumerate(saved_flat)])

  def assemble(self, restored_saved):
    """The current tree from the restored saved leaves; fresh leaves are zeros for now."""
    saved_leaves = jax.tree.leaves(restored_saved)
    leaves = [saved_leaves[j] if j is not None else
              jax.jit(lambda t=t: jax.numpy.zeros(t.shape, t.dtype), out_shardings=t.sharding)()
              for t, j in zip(self._target_leaves, self.match.source)]
    return jax.tree.unflatten(self._treedef, leaves)


def fill_fresh(opt_state, abstract_state, params, *, stored_opt, plan, init_opt_state, step):
  """Replaces the leaves of `opt_state` (target layout) that have no saved counterpart with their
  initial values; a fresh step count (`count`) starts at the checkpoint's step."""
  saved_as_target = stored_opt
  if plan.convert:  # roles name parameter paths: compare both in the target layout
    saved_as_target = layout.convert_tree(
        jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored_opt),
        not plan.saved_scanned, plan.period, layout.take_abstract, layout.join_abstract)
  matched = match(abstract_state.opt_state, saved_as_target)
  fresh = [i for i, j in enumerate(matched.source) if j is None]
  if not fresh:
    return opt_state
  if init_opt_state is None:
    raise ConfigError("the checkpoint's optimizer state lacks "
                      f"{describe(matched.fresh)}, and no initialiser was given to start it")
  flat = jax.tree_util.tree_flatten_with_path(abstract_state.opt_state)[0]
  shardings = [flat[i][1].sharding for i in fresh]

  def init(p):
    leaves = jax.tree.leaves(init_opt_state(p))
    out = []
    for i in fresh:
      x = leaves[i]
      if role(flat[i][0]) == ("count",):
        x = jax.numpy.full_like(x, step)
      out.append(x)
    return out

  values = jax.jit(init, out_shardings=shardings)(params)
  leaves = jax.tree.leaves(opt_state)
  for i, v in zip(fresh, values):
    leaves[i] = v
  return jax.tree.unflatten(jax.tree.structure(opt_state), leaves)
