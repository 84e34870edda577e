"""One process of a multi-process feed check (run by tests/test_feed.py, two at a time).

  python feed_worker.py PROCESS_ID NUM_PROCESSES PORT CASES_JSON

For each case (mesh sizes and device order) it builds the mesh, takes this process's rows of a known
global batch through `HostRows`, assembles the global array and checks, on every device it holds,
that the shard equals the global batch at the shard's index; then it checks a jitted sum over the
whole array against numpy. Prints one JSON line: this process's rows for each case.
"""

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gptjax import distributed, feed, sharding

B, L = 8, 3


def main(process_id: int, num_processes: int, port: int, cases: list[dict]) -> None:
  distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=60)
  global_batch = np.arange(B * L, dtype=np.int32).reshape(B, L) * 7 + 1
  out = []
  for case in cases:
    mesh_cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1,
                                          "order": "data,fsdp,tensor", **case})
    mesh = sharding.make_mesh(mesh_cfg)
    rows = feed.HostRows.of(mesh, ("data", "fsdp"), B)
    host = rows.select({"x": global_batch})
    assert host["x"].shape == (len(rows.rows), L)
    for leading in (0, 1):
      part = {"x": host["x"][None]} if leading else host
      x = rows.to_global(part, leading=leading)["x"]
      want = global_batch[None] if leading else global_batch
      assert x.shape == want.shape
      for shard in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
      total = jax.jit(lambda a: jnp.sum(a * jnp.arange(L)),
                      out_shardings=sharding.replicated(mesh))(x)
      assert int(total) == int((want * np.arange(L)).sum()), (case, int(total))
    out.append(rows.rows.tolist())
  print(json.dumps(out), flush=True)
  distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
