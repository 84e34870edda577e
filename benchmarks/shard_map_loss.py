"""Where does shard_map pay in the loss? The output projection + cross-entropy and its gradients.

  python benchmarks/shard_map_loss.py                    # 4 CPU devices, GPT-2 small sizes
  python benchmarks/shard_map_loss.py --devices=8 --rows=8192

Batch sharded over 4 devices (data parallel / FSDP), the fused chunked loss
(`loss.unembed_cross_entropy_sum`, a lax.scan over chunks of rows):
  fused/jit        the function under plain jit with sharded inputs; XLA's partitioner decides
  fused/shard_map  the same function inside shard_map (what the train step does): every device
                   scans its own rows against the whole weight, and only the weight's gradient
                   and two scalars are summed across devices
Vocabulary sharded over 4 devices (tensor parallel), logits [B·L, V] sharded on V:
  vocab/jit        `loss.cross_entropy_sum` on the sharded logits under plain jit
  vocab/shard_map  `loss.vocab_parallel_cross_entropy_sum`: each device reduces its slice of the
                   vocabulary and only [B·L] statistics cross devices
Prints, per method, the compiled per-device temporary memory (XLA's memory analysis), the bytes
the program's collectives produce per device (from the optimized HLO), the median step time, and
checks that each pair gives the same loss and gradients.
"""

import argparse
import os
import re
import statistics
import time

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def collective_bytes(hlo: str) -> dict[str, int]:
  """Bytes of each collective's result per device, summed by kind, from optimized HLO text."""
  out = {}
  ops = r"all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
  for result, op in re.findall(rf"= (\(?[^=]*?\)?) ({ops})(?:-start)?\(", hlo):
    for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", result):
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      out[op] = out.get(op, 0) + n * _DTYPE_BYTES.get(dtype, 4)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=4)
  p.add_argument("--rows", type=int, default=4096, help="tokens (B·L) per step")
  p.add_argument("--d_model", type=int, default=768)
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--steps", type=int, default=5)
  a = p.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={a.devices}")
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from gptjax import loss  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  x = rng.normal(size=(a.devices, a.rows // a.devices, a.d_model)).astype(np.float32)
  w = (0.02 * rng.normal(size=(a.vocab, a.d_model))).astype(np.float32)
  targets = rng.integers(0, a.vocab, x.shape[:2]).astype(np.int32)

  def measure(name, f, mesh, specs):
    args = [jax.device_put(v, NamedSharding(mesh, s)) for v, s in zip((x, w, targets), specs)]
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(a.steps):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    comm = collective_bytes(compiled.as_text())
    print(f"{name:16s} temp {compiled.memory_analysis().temp_size_in_bytes / 2**20:8.1f} MiB/device"
          f"  collectives {sum(comm.values()) / 2**20:8.2f} MiB ("
          + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in sorted(comm.items()))
          + f")  step {statistics.median(times) * 1e3:6.0f} ms", flush=True)
    return jax.device_get(out)

  def same(u, v):
    np.testing.assert_allclose(u[0], v[0], rtol=1e-5)
    for g, h in zip(u[1], v[1]):
      np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)

  devices = np.array(jax.devices()[:a.devices])
  data = jax.sharding.Mesh(devices, ("data",))
  fused = lambda mesh: lambda x, w, t: loss.unembed_cross_entropy_sum(
      x, w, t, mesh=mesh, batch_axes="data" if mesh else None)[0]
  batch_specs = (P("data"), P(), P("data"))
  same(measure("fused/jit", fused(None), data, batch_specs),
       measure("fused/shard_map", fused(data), data, batch_specs))

  tensor = jax.sharding.Mesh(devices, ("tensor",))

  def logits(x, w):
    return jax.lax.with_sharding_constraint(jnp.einsum("bld,vd->blv", x, w),
                                            NamedSharding(tensor, P(None, None, "tensor")))

  vocab_specs = (P(), P("tensor", None), P())
  same(measure("vocab/jit", lambda x, w, t: loss.cross_entropy_sum(logits(x, w), t)[0], tensor,
               vocab_specs),
       measure("vocab/shard_map", lambda x, w, t: loss.vocab_parallel_cross_entropy_sum(
           logits(x, w), t, None, 0.0, tensor, None)[0], tensor, vocab_specs))
  print("each pair gives the same loss and gradients")


if __name__ == "__main__":
  main()
