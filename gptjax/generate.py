"""Sampling from a trained model with a KV cache: prefill once, then one token per step.

    new = generate(model, params, [[464, 2068], [50256]], max_new_tokens=32, temperature=0.8,
                   top_p=0.95, num_return_sequences=2, eos_id=50256, seed=0)

Prompts of different lengths are left-padded to the longest: every row keeps its own positions
0, 1, ... and padding gets position -1, which no token attends to. The padded prompts go through
the model in one call that fills the cache (`GPT(args, decode=True)`); the new tokens are then
chosen and fed back one per step inside one jitted `jax.lax.while_loop`, which ends after
`max_new_tokens` steps or as soon as every row has emitted `eos_id`.

Prompt policy: a prompt longer than `ctx - max_new_tokens` is left-truncated, i.e. only its last
`ctx - max_new_tokens` tokens are kept, so that prompt and new tokens fit the model's positions.

`use_cache=False` recomputes the whole (padded) sequence at every step instead, through the
training forward pass: the same sampling, slower by the sequence length; the reference for tests
and `scripts/bench_decode.py`. Under a mesh (`with sharding.context(mesh, rules)`,
as `gptjax/train.py` does) everything runs sharded as the model's
logical axes say: params stay where they are, the cache is split like the attention activations.

Decoding follows the params' layout. Unrolled layers (`scan_layers=False`, e.g.
`layout.unstack(params, period)`) decode faster than scanned ones, whose loop copies every layer's
cache slice in and out at each step; `scripts/sample.py` unrolls.
"""

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptjax.model import GPT, init_cache

Array = jax.Array


@flax.struct.dataclass
class Sampling:
  """How the next token is picked: traced values, so changing them does not recompile.

  temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
  top_k: sample among the k most likely tokens only (0 = all).
  top_p: nucleus sampling: among the fewest most likely tokens whose probability sums to at least
    top_p (1 = all). Applied after temperature and top-k, as in Hugging Face `generate`.
  eos_id: a row ends after emitting this id (-1 = never).
  """

  temperature: float | Array = 1.0
  top_k: int | Array = 0
  top_p: float | Array = 1.0
  eos_id: int | Array = -1


def filter_logits(logits_BxV: Array, top_k: int | Array = 0, top_p: float | Array = 1.0) -> Array:
  """Sets to -inf every logit outside the top k, then outside the top-p nucleus of the rest.

  Args:
    logits_BxV: float logits (already divided by the temperature).
    top_k: keep the k largest per row (0 = no limit; ties with the k-th are kept).
    top_p: of those, keep the smallest set of the largest whose softmax mass is >= top_p: a token
      stays iff the mass of the more likely ones is < top_p (so the most likely always stays).

  Returns:
    The logits, [B, V], with the removed ones at -inf.
  """
  vocab = logits_BxV.shape[-1]
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
  rank_1xV = jnp.arange(vocab)[None, :]
  in_top_k_BxV = rank_1xV < jnp.where(top_k > 0, top_k, vocab)
  probs_BxV = jax.nn.softmax(jnp.where(in_top_k_BxV, sorted_BxV, -jnp.inf), axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely tokens
  keep_BxV = in_top_k_BxV & ((before_BxV < top_p) | (rank_1xV == 0))
  cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)


def _pick(logits_BxV: Array, key: Array, s: Sampling) -> Array:
  """The next token per row: argmax if temperature is 0, else a draw from the filtered softmax."""

  def sample(logits_BxV):
    logits_BxV = logits_BxV / s.temperature
    logits_BxV = jax.lax.cond((s.top_k > 0) | (s.top_p < 1.0),
                              lambda x: filter_logits(x, s.top_k, s.top_p), lambda x: x,
                              logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)

  return jax.lax.cond(s.temperature == 0.0,
                      lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), sample, logits_BxV)


def _last_logits(model: GPT, tokens_BxL: Array, positions_BxL: Array) -> Array:
  """Next-token logits [B, V_padded] after the last of the L tokens (decode mode)."""
  return model.logits(model.hidden(tokens_BxL, positions_BxL)[:, -1:])[:, 0]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "use_cache"))
def decode(model: GPT, params, tokens_BxP: Array, lengths_B: Array, key: Array,
           sampling: Sampling, *, max_new_tokens: int, use_cache: bool = True) -> Array:
  """The new tokens of left-padded prompts: prefill, then a `while_loop` of one token per step.

  Args:
    model: the GPT module (not in decode mode).
    params: its parameters (any sharding).
    tokens_BxP: int32 prompts, left-padded to P (any pad id).
    lengths_B: int32 prompt lengths, 1 <= length <= P.
    key: PRNG key for sampling; step i uses `fold_in(key, i)`.
    sampling: how tokens are picked, and the EOS id.
    max_new_tokens: M, the most new tokens per row; P + M must be <= ctx.
    use_cache: False recomputes the full sequence at every step (the reference path).

  Returns:
    int32 [B, M]: the new tokens, -1 after a row's end (after its EOS, or past the last step).
  """
  b, p = tokens_BxP.shape
  total = p + max_new_tokens
  pad_Bx1 = (p - lengths_B)[:, None]
  if use_cache:
    decoder = model.clone(decode=True)

    def forward(cache, tokens_BxL, positions_BxL):
      logits_BxV, variables = decoder.apply({"params": params, "cache": cache}, tokens_BxL,
                                            positions_BxL, method=_last_logits, mutable=["cache"])
      return logits_BxV, variables["cache"]

    # Padding gets negative positions: the decoder masks it out.
    logits_BxV, state = forward(init_cache(model, params, b, total), tokens_BxP,
                                jnp.arange(p)[None, :] - pad_Bx1)

    def advance(cache, prev_B, i):  # feeds step i - 1's token, at position length + i - 1
      return forward(cache, prev_B[:, None], (lengths_B + i - 1)[:, None])
  else:
    slots_1xT = jnp.arange(total)[None, :]
    positions_BxT = jnp.maximum(slots_1xT - pad_Bx1, 0)
    segments_BxT = (slots_1xT >= pad_Bx1).astype(jnp.int32)  # padding is its own segment

    def logits_at(buf_BxT, slot):
      def fn(m, tokens_BxT):
        x_BxD = jax.lax.dynamic_index_in_dim(m.hidden(tokens_BxT, positions_BxT, segments_BxT),
                                             slot, axis=1, keepdims=True)
        return m.logits(x_BxD)[:, 0]
      return model.apply({"params": params}, buf_BxT, method=fn)

    state = jnp.pad(tokens_BxP, ((0, 0), (0, max_new_tokens)))
    logits_BxV = logits_at(state, p - 1)

    def advance(buf_BxT, prev_B, i):
      buf_BxT = jax.lax.dynamic_update_index_in_dim(buf_BxT, prev_B, p + i - 1, axis=1)
      return logits_at(buf_BxT, p + i - 1), buf_BxT

  tok_B = _pick(logits_BxV, jax.random.fold_in(key, 0), sampling)
  out_BxM = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(tok_B)
  done_B = tok_B == sampling.eos_id

  def cond(carry):
    i, _, _, _, done_B = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, state, prev_B, out_BxM, done_B = carry
    logits_BxV, state = advance(state, jnp.maximum(prev_B, 0), i)
    tok_B = jnp.where(done_B, -1, _pick(logits_BxV, jax.random.fold_in(key, i), sampling))
    out_BxM = jax.lax.dynamic_update_index_in_dim(out_BxM, tok_B, i, axis=1)
    return i + 1, state, tok_B, out_BxM, done_B | (tok_B == sampling.eos_id)

  carry = (jnp.ones((), jnp.int32), state, tok_B, out_BxM, done_B)
  out_BxM = jax.lax.while_loop(cond, body, carry)[3]
  return nn.with_logical_constraint(out_BxM, (None, None))  # replicated: every host can read it


def check_settings(model: GPT, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   num_return_sequences: int, eos_id: int | None) -> None:
  """Raises ValueError naming the first invalid generation setting."""
  ctx, vocab = model.args.ctx, model.args.vocab_size
  if not 1 <= max_new_tokens < ctx:
    raise ValueError(f"max_new_tokens must be in [1, ctx - 1] = [1, {ctx - 1}] (at least one "
                     f"prompt token must fit the context of {ctx}), got {max_new_tokens}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if not top_k >= 0:
    raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")
  if not num_return_sequences >= 1:
    raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
  if eos_id is not None and not 0 <= eos_id < vocab:
    raise ValueError(f"eos_id must be a token id in [0, {vocab}) or None, got {eos_id}")


def pack_prompts(prompts: list[list[int]], num_return_sequences: int, vocab_size: int,
                 max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads the prompts (each repeated `num_return_sequences` times) into one batch.

  Prompts longer than `max_len` keep their last `max_len` tokens.

  Returns:
    (tokens_BxP int32, pad id 0; lengths_B int32) with B = len(prompts) * num_return_sequences.

  Raises:
    ValueError: no prompts, an empty prompt, or a token id outside [0, vocab_size).
  """
  if not prompts:
    raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
  rows = []
  for i, prompt in enumerate(prompts):
    ids = np.asarray(prompt, np.int64).reshape(-1)
    if ids.size == 0:
      raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token (e.g. the "
                       "tokenizer's BOS/EOS id to sample unconditionally)")
    if ids.min() < 0 or ids.max() >= vocab_size:
      raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab_size}) (the model's "
                       "vocab_size): was it encoded with another tokenizer?")
    rows += [ids[-max_len:]] * num_return_sequences
  p = max(len(r) for r in rows)
  tokens_BxP = np.zeros((len(rows), p), np.int32)
  for row, ids in zip(tokens_BxP, rows):
    row[p - len(ids):] = ids
  return tokens_BxP, np.array([len(r) for r in rows], np.int32)


def generate(model: GPT, params, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_return_sequences: int = 1, eos_id: int | None = None, seed: int = 0,
             use_cache: bool = True) -> list[list[int]]:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    model: the GPT module.
    params: its parameters (unboxed; sharded or not).
    prompts: token ids, one non-empty list per prompt, any lengths. A prompt longer than
      ctx - max_new_tokens keeps only its last ctx - max_new_tokens tokens.
    max_new_tokens: tokens to add, 1 <= max_new_tokens < ctx.
    temperature: 0 = greedy; otherwise logits are divided by it before sampling.
    top_k: sample among the k most likely tokens only (0 = all).
    top_p: sample within the top-p nucleus (1 = all).
    num_return_sequences: samples per prompt.
    eos_id: a sample ends with this token (included in its output); None = only max_new_tokens.
    seed: sampling seed; the same seed and inputs give the same samples.
    use_cache: False recomputes the whole sequence each step (the slow reference).

  Returns:
    The new tokens of each sample, len(prompts) * num_return_sequences lists, the samples of one
    prompt next to each other; a list stops at its EOS (included) or after max_new_tokens.

  Raises:
    ValueError: naming the invalid setting (empty prompt, max_new_tokens, temperature, ...).
  """
  check_settings(model, max_new_tokens, temperature, top_k, top_p, num_return_sequences, eos_id)
  tokens_BxP, lengths_B = pack_prompts(prompts, num_return_sequences, model.args.vocab_size,
                                       model.args.ctx - max_new_tokens)
  sampling = Sampling(float(temperature), int(top_k), float(top_p),
                      -1 if eos_id is None else int(eos_id))
  new_BxM = decode(model, params, tokens_BxP, lengths_B, jax.random.key(seed), sampling,
                   max_new_tokens=int(max_new_tokens), use_cache=use_cache)
  return unpack(np.asarray(jax.device_get(new_BxM)))


def unpack(new_BxM: np.ndarray) -> list[list[int]]:
  """The rows of `decode`'s output without their -1 tail."""
  out = []
  for row in new_BxM:
    end = int(np.argmax(row < 0)) if (row < 0).any() else len(row)
    out.append([int(t) for t in row[:end]])
  return out
