"""Host feeding: each process loads exactly the rows its devices hold, for any mesh.

The multi-process cases run `tests/helpers/feed_worker.py` as two real OS processes joined by JAX's
distributed runtime; each checks every shard it holds against the known global batch.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from gptjax import feed, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "helpers", "feed_worker.py")
B = 8


def mesh_of(n_devices=8, order="data,fsdp,tensor", **sizes):
  cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "order": order, **sizes})
  return sharding.make_mesh(cfg, jax.devices()[:n_devices])


@pytest.mark.parametrize("sizes", [{"data": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "tensor": 4},
                                   {"tensor": 8}])
def test_one_process_holds_every_row_and_assembles_the_batch(sizes):
  mesh = mesh_of(**sizes)
  rows = feed.HostRows.of(mesh, ("data", "fsdp"), B)
  np.testing.assert_array_equal(rows.rows, np.arange(B))
  batch = {"inputs": np.arange(2 * B * 5).reshape(2, B, 5), "targets": np.ones((2, B, 5))}
  arrays = rows.to_global(rows.select(batch, leading=1), leading=1)
  for key, value in batch.items():
    assert arrays[key].shape == value.shape
    assert arrays[key].sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(arrays[key]), value)
    for shard in arrays[key].addressable_shards:  # each device holds its batch shard
      np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])


def test_select_takes_rows_in_order_and_bad_sizes_are_refused():
  rows = feed.HostRows(mesh_of(data=8), ("data", "fsdp"), B, np.array([1, 4, 6]))
  np.testing.assert_array_equal(rows.select({"x": np.arange(B) * 10})["x"], [10, 40, 60])
  with pytest.raises(ValueError, match="host batch 'x' has shape"):
    rows.to_global({"x": np.zeros((2, 3))})
  with pytest.raises(ValueError, match="a batch of 6 rows does not split over the 8 batch shards"):
    feed.HostRows.of(mesh_of(data=8), ("data", "fsdp"), 6)


def test_device_order_puts_the_named_axis_across_the_slow_dimension():
  devices = jax.devices()[:4]
  default = mesh_of(4, data=2, tensor=2)
  assert [d.id for d in default.devices[:, 0, :].ravel()] == [d.id for d in devices]
  swapped = mesh_of(4, order="tensor,data,fsdp", data=2, tensor=2)
  # tensor is now the slowest axis: its two members are devices 0 and 2, not 0 and 1.
  assert [d.id for d in swapped.devices[0, 0, :]] == [devices[0].id, devices[2].id]
  with pytest.raises(Exception, match="mesh.order"):
    mesh_of(4, order="data,tensor", data=2, tensor=2)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(devices_per_process: int, cases: list[dict]) -> list[list[list[int]]]:
  """Runs the worker as 2 processes; returns each process's rows per case."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", str(port), json.dumps(cases)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{outs[i][-3000:]}"
  return [json.loads(out.strip().splitlines()[-1]) for out in outs]


ALL, FIRST, SECOND = list(range(B)), list(range(B // 2)), list(range(B // 2, B))


def test_two_processes_one_device_each():
  cases = [{"tensor": 2}, {"fsdp": 2}, {"data": 2}]
  # tensor across the processes: both feed every row; fsdp/data: each its half.
  want = [[ALL, FIRST, FIRST], [ALL, SECOND, SECOND]]
  assert _two_processes(1, cases) == want


def test_two_processes_two_devices_each():
  span = "tensor,data,fsdp"  # the tensor axis spans the two processes
  cases = [{"tensor": 4}, {"fsdp": 4}, {"fsdp": 2, "tensor": 2, "order": span},
           {"data": 2, "tensor": 2, "order": span}, {"data": 2, "tensor": 2},
           {"data": 2, "fsdp": 2, "order": "fsdp,data,tensor"}]
  got = _two_processes(2, cases)
  # data x fsdp, fsdp slowest: process p holds fsdp shard p of every data shard: rows interleave.
  mixed = [[0, 1, 4, 5], [2, 3, 6, 7]]
  want = [[ALL, FIRST, ALL, ALL, FIRST, mixed[0]], [ALL, SECOND, ALL, ALL, SECOND, mixed[1]]]
  assert got == want
