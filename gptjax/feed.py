"""Which rows of each global batch this process loads, derived from the mesh, and the global arrays.

A global batch [B, ...] is sharded over the mesh axes of the `batch` logical axis (`data`, `fsdp`).
Each device holds the rows of its batch shard; devices that differ only along the other axes
(`tensor`) hold the same rows. So a process must load exactly the rows its addressable devices
hold, and that set depends on the mesh, not on the process count: all B rows when the tensor axis
spans every process, B / P contiguous rows when the batch axes are laid out process by process,
any subset in general. `HostRows` reads the set off the sharding itself, so it is right for every
mesh, device order and process count, and assembles the global arrays from those rows.

    feed = trainer.host_rows(global_batch=16)    # or HostRows.of(mesh, ("data", "fsdp"), 16)
    it = pipeline.make(..., rows=feed.rows)     # reads only these rows of each global batch
    arrays = feed.to_global(host_batch, leading=1)  # [accum, rows, L] -> global [accum, B, L]

Every data path (training, validation, evaluation, fine-tuning, distillation) goes through it.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class HostRows:
  """The rows of a `global_batch`-row batch that this process's devices hold.

  Attributes:
    mesh: the device mesh.
    batch_axes: the mesh axes the batch dimension is split over (a name, a tuple or None).
    global_batch: rows of the whole batch, over all processes.
    rows: this process's global row indices, ascending; host batches hold exactly these, in order.
  """

  mesh: Mesh
  batch_axes: Any
  global_batch: int
  rows: np.ndarray

  @classmethod
  def of(cls, mesh: Mesh, batch_axes: Any, global_batch: int) -> "HostRows":
    """Reads this process's rows off `NamedSharding(mesh, P(batch_axes))` for `global_batch` rows.

    Raises:
      ValueError: the batch does not split evenly over the batch axes.
    """
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if global_batch < 1 or global_batch % shards:
      raise ValueError(f"a batch of {global_batch} rows does not split over the {shards} batch "
                       f"shards of mesh axes {axes}")
    index_map = NamedSharding(mesh, P(batch_axes)).addressable_devices_indices_map((global_batch,))
    rows = set()
    for (row_slice,) in index_map.values():
      rows.update(range(global_batch)[row_slice])
    return cls(mesh, batch_axes, global_batch, np.array(sorted(rows), dtype=np.int64))

  @property
  def is_everything(self) -> bool:
    """True when this process holds every row (one process, or the batch replicated here)."""
    return len(self.rows) == self.global_batch

  def sharding(self, leading: int = 0, ndim: int | None = None) -> NamedSharding:
    """The sharding of a [*leading, B, ...] global batch (of `ndim` dimensions, if given: the
    dimensions after B are named as replicated)."""
    trailing = [] if ndim is None else [None] * (ndim - leading - 1)
    return NamedSharding(self.mesh, P(*([None] * leading), self.batch_axes, *trailing))

  def select(self, batch: Mapping[str, np.ndarray], leading: int = 0) -> dict[str, np.ndarray]:
    """This process's rows of a whole batch every process holds (e.g. built from a small file)."""
    return {k: np.take(np.asarray(v), self.rows, axis=leading) for k, v in batch.items()}

  def to_global(self, host: Mapping[str, np.ndarray], leading: int = 0) -> dict[str, jax.Array]:
    """Global `jax.Array`s from this process's rows.

    Args:
      host: [*leading, len(rows), ...] per key: the rows `self.rows`, in that order.
      leading: dimensions before the batch dimension (1 for [accum, B, L] step batches).

    Returns:
      The same keys, [*leading, global_batch, ...], sharded by `self.sharding(leading)`.
    """
    position = np.full(self.global_batch, -1, np.int64)
    position[self.rows] = np.arange(len(self.rows))
    out = {}
    for key, value in host.items():
      value = np.asarray(value)
      if value.ndim <= leading or value.shape[leading] != len(self.rows):
        raise ValueError(f"host batch {key!r} has shape {value.shape}; expected {len(self.rows)} "
                         f"rows (this process's) along dimension {leading}")
      shape = value.shape[:leading] + (self.global_batch,) + value.shape[leading + 1:]

      def piece(index, value=value):
        index = tuple(index) + (slice(None),) * (value.ndim - len(index))
        local = position[np.arange(self.global_batch)[index[leading]]]
        assert (local >= 0).all(), "a device asked for a row this process did not load"
        if len(local) and (np.diff(local) == 1).all():  # contiguous: a view, not a copy
          take = slice(int(local[0]), int(local[-1]) + 1)
        else:
          take = local
        return value[index[:leading] + (take,) + index[leading + 1:]]

      out[key] = jax.make_array_from_callback(shape, self.sharding(leading, value.ndim), piece)
    return out
