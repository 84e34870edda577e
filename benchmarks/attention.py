"""Causal attention, forward + backward: one masked [L, L] product per head against the blocked
version the model uses (`gptjax.attention_kernels.blocked_causal_attention`), which skips fully
masked blocks.

  python benchmarks/attention.py                  # the CPU bench's shapes: B=8, L=256, N=6, H=64
  python benchmarks/attention.py --batch=2 --length=1024

Prints the best-of-N milliseconds of each and checks that both give the same output.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import attention_kernels as attention


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--window", type=int, default=0, help="banded attention window (0 = dense)")
  p.add_argument("--repeats", type=int, default=9)
  a = p.parse_args()
  window = a.window or None
  rng = np.random.default_rng(0)
  q, k, v, g = (jnp.asarray(rng.normal(size=(a.batch, a.length, a.heads, a.head_dim)), jnp.float32)
                for _ in range(4))
  mask = attention.causal_mask(a.length, window, None)
  methods = {"one masked product": lambda q, k, v: attention.xla_attention(q, k, v, mask),
             "blocked": lambda q, k, v: attention.blocked_causal_attention(q, k, v, window, None)}
  outs = {}
  for name, f in methods.items():
    step = jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](g))
    jax.block_until_ready(step(q, k, v))
    times = []
    for _ in range(a.repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(q, k, v))
      times.append(time.perf_counter() - start)
    outs[name] = jax.jit(f)(q, k, v)
    print(f"{name:20s} forward + backward {min(times) * 1e3:7.1f} ms", flush=True)
  np.testing.assert_allclose(outs["blocked"], outs["one masked product"], rtol=1e-5, atol=1e-5)
  print("same output")


if __name__ == "__main__":
  main()
