"""Sampling from a trained model.

`sample` recomputes the whole window for every new token: simple and exact, good for the end-of-run
samples of small models. (A KV-cache decoder is the fast path for long generations.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.model import GPT


@functools.partial(jax.jit, static_argnames=("model", "start", "stop", "temperature", "top_k"))
def _fill(model: GPT, params, buf_BxT: jax.Array, rng: jax.Array, *, start: int, stop: int,
          temperature: float, top_k: int) -> jax.Array:
  vocab = model.args.vocab_size

  def body(i, carry):
    buf, rng = carry
    logits_BxV = model.apply({"params": params}, buf)[:, i - 1, :vocab]
    if temperature == 0.0:
      nxt = jnp.argmax(logits_BxV, -1)
    else:
      logits_BxV = logits_BxV / temperature
      if top_k:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
      rng, key = jax.random.split(rng)
      nxt = jax.random.categorical(key, logits_BxV, -1)
    return buf.at[:, i].set(nxt.astype(buf.dtype)), rng

  return jax.lax.fori_loop(start, stop, body, (buf_BxT, rng))[0]


def sample(model: GPT, params, prompts: list[list[int]], max_new_tokens: int, *,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> list[list[int]]:
  """Continues each prompt (all of one length) by up to `max_new_tokens` tokens.

  Args:
    model: the GPT module.
    params: its parameters.
    prompts: token ids, one list per sample, all of the same non-zero length.
    max_new_tokens: tokens to add; capped so prompt + new tokens fit the model's context.
    temperature: 0 = greedy; otherwise logits are divided by it before sampling.
    top_k: sample among the k most likely tokens only (0 = all).
    seed: sampling seed.

  Returns:
    The new tokens of each sample.
  """
  length = len(prompts[0])
  if not length or any(len(p) != length for p in prompts):
    raise ValueError("prompts must be non-empty and of equal length")
  ctx = model.args.ctx
  stop = min(ctx, length + max_new_tokens)
  buf = np.zeros((len(prompts), ctx), np.int32)
  buf[:, :length] = np.asarray(prompts)
  out = _fill(model, params, jnp.asarray(buf), jax.random.key(seed), start=length, stop=stop,
              temperature=float(temperature), top_k=int(top_k))
  return np.asarray(out)[:, length:stop].tolist()
