"""The one place that knows about meshes: logical axis names -> mesh axes -> shardings.

The mesh has three axes, (`data`, `fsdp`, `tensor`). One rule table (`cfg.mesh.rules`) maps the
model's logical names onto them; an axis of size 1 shards nothing, so the same table gives pure
data parallelism (fsdp = tensor = 1), FSDP / ZeRO-3 (`embed` over fsdp: params, grads and Adam
moments sharded), Megatron tensor parallelism (`heads`, `mlp`, `vocab` over tensor) and any mix.
"""

import contextlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.errors import ConfigError

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "layers")
MESH_AXES = ("data", "fsdp", "tensor")
AXES = MESH_AXES


def _check(ok: bool, key: str, problem: str, fix: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}: {problem}. {fix}")


def validate_rules(rules: ml_collections.ConfigDict) -> None:
  """Checks the logical-axis -> mesh-axis table."""
  for logical, target in rules.items():
    _check(logical in LOGICAL_AXES, f"mesh.rules.{logical}", "is not a logical axis of the model",
           f"Logical axes are {LOGICAL_AXES}.")
    for axis in filter(None, target.split(",")):
      _check(axis in MESH_AXES, f"mesh.rules.{logical}", f"names unknown mesh axis {axis!r}",
             f"Mesh axes are {MESH_AXES}; separate several with commas, '' = replicated.")


def mesh_shape(mesh: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
  """Resolves the -1 ('the rest') axis and checks the product equals the device count."""
  sizes = {a: int(mesh[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  _check(len(free) <= 1, "mesh", f"more than one axis is -1 ({free})", "Leave at most one at -1.")
  for a, s in sizes.items():
    _check(s == -1 or s >= 1, f"mesh.{a}", f"must be >= 1 or -1, got {s}", "Use -1 for 'the rest'.")
  fixed = 1
  for a, s in sizes.items():
    fixed *= s if s != -1 else 1
  if free:
    _check(n_devices % fixed == 0, f"mesh.{free[0]}",
           f"cannot fill {n_devices} devices: the other axes multiply to {fixed}",
           "Choose axis sizes whose product divides the device count.")
    sizes[free[0]] = n_devices // fixed
  total = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
  _check(total == n_devices, "mesh",
         f"data x fsdp x tensor = {sizes['data']} x {sizes['fsdp']} x {sizes['tensor']} = {total}, "
         f"but there are {n_devices} devices",
         "Make the product equal the device count (or use -1).")
  return sizes


def mesh_order(mesh: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`mesh.order` as axis names, slowest-varying first; checks that it names each axis once."""
  order = tuple(a.strip() for a in mesh.get("order", ",".join(MESH_AXES)).split(","))
  _check(sorted(order) == sorted(MESH_AXES), "mesh.order",
         f"{mesh.get('order')!r} is not an ordering of the mesh axes {MESH_AXES}",
         "List each of data, fsdp, tensor once, slowest-varying first, e.g. 'tensor,data,fsdp'.")
  return order



def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all).

  With the default `mesh.order` ('data,fsdp,tensor': tensor varies fastest, so tensor groups stay
  within a host and data spans hosts) the grid is laid out for the topology by JAX. Another order
  lists the axes from slowest- to fastest-varying over the devices sorted by (process, id): e.g.
  'tensor,data,fsdp' makes the tensor axis span processes.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  order = mesh_order(mesh_cfg)
  if order != AXES:
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.asarray(ordered).reshape([sizes[a] for a in order])
    return Mesh(grid.transpose([order.index(a) for a in AXES]), AXES)
  shape = tuple(sizes[a] for a in AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (AssertionError, NotImplementedError, ValueError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


@contextlib.contextmanager
def context(mesh: Mesh, rule_table):
  """Inside it `mesh` is the current mesh and `rule_table` maps the model's logical axis names
  onto it: what tracing, `jax.eval_shape` of an init and a jitted call under shardings need."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
    yield


def rules(rules_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The config's rule table as Flax logical-axis rules: ('embed', 'fsdp'), ('kv', None), ..."""
  validate_rules(rules_cfg)
  out = []
  for logical, target in rules_cfg.items():
    axes = tuple(a for a in target.split(",") if a)
    out.append((logical, axes[0] if len(axes) == 1 else (axes or None)))
  return tuple(out)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rule_table) -> Any:
  """NamedShardings for a pytree whose leaves carry logical axes (`nn.LogicallyPartitioned`).

  Leaves without axes (step counters, scalars) are replicated.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rule_table)


def batch_axes(rule_table) -> Any:
  """The mesh axes the `batch` logical axis is sharded over."""
  return dict(rule_table).get("batch")


def batch_sharding(mesh: Mesh, rule_table, leading: int = 0) -> NamedSharding:
  """Sharding of a [*leading, B, L] batch: B split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(*([None] * leading), batch_axes(rule_table), None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
