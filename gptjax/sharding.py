"""The one place that knows about meshes: logical axis names -> mesh axes -> shardings.

The mesh has three axes, (`data`, `fsdp`, `tensor`). One rule table (`cfg.mesh.rules`) maps the
model's logical names onto them; an axis of size 1 shards nothing, so the same table gives pure
data parallelism (fsdp = tensor = 1), FSDP / ZeRO-3 (`embed` over fsdp: params, grads and Adam
moments sharded), Megatron tensor parallelism (`heads`, `mlp`, `vocab` over tensor) and any mix.
"""

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax import config as config_lib

AXES = config_lib.MESH_AXES


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all).

  With the default `mesh.order` ('data,fsdp,tensor': tensor varies fastest, so tensor groups stay
  within a host and data spans hosts) the grid is laid out for the topology by JAX. Another order
  lists the axes from slowest- to fastest-varying over the devices sorted by (process, id): e.g.
  'tensor,data,fsdp' makes the tensor axis span processes.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = config_lib.mesh_shape(mesh_cfg, len(devices))
  order = config_lib.mesh_order(mesh_cfg)
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


def rules(rules_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The config's rule table as Flax logical-axis rules: ('embed', 'fsdp'), ('kv', None), ..."""
  config_lib.validate_rules(rules_cfg)
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
