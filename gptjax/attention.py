"""Causal multi-head self-attention: the `Attention` layer, its KV cache, and which kernel runs.

The kernels themselves, the masks and the softmax are in `gptjax.attention_kernels`.

Shapes are written as suffixes: B batch, L length (queries), T keys (cache slots, or L plus a
learned prefix), N heads, H d_head, D d_model, C a block of queries.

Which kernel runs is decided in one place, `resolve_kernel` (pure: the backend is an argument),
from `model.attention_impl`:
  - 'blocked': `blocked_causal_attention`, which never computes a query x key block the causal
    (banded) mask removes entirely; below L = 128 it is one masked product;
  - 'xla': `xla_causal_attention`, one masked product, compiled by XLA; the only kernel with
    attention dropout;
  - 'cudnn': `cudnn_attention`, cuDNN flash attention through `jax.nn.dot_product_attention`
    (NVIDIA GPUs; bfloat16/float16; causal, banded by its local window, segments as a mask);
  - 'splash': `splash_attention`, the Pallas Splash attention kernel (TPUs; causal or local mask,
    segment ids), run per device in a shard_map over the current mesh;
  - 'auto': 'cudnn' on a GPU, 'splash' on a TPU, 'blocked' on a CPU ('xla' elsewhere). Where the
    preferred kernel cannot run the model (a dtype or head width cuDNN refuses) or training needs
    attention dropout (`model.attn_dropout` > 0, which only 'xla' has), 'auto' runs 'xla' and
    says why in one log line; evaluation, which has no dropout, keeps the preferred kernel.
An explicit request that cannot be honoured is a `ConfigError` naming the setting (config
validation calls `resolve_kernel` for every layer kind before anything compiles).

Two paths are their own whatever the setting: decoding (`decode=True`) runs `cached_attention`,
the L new queries over the whole KV cache masked by `position_mask` ('cached'); prefix tuning
(`prefix_len > 0`) runs one masked product over [prefix; keys], with attention dropout when
training ('prefixed').

`xla_attention` and `blocked_causal_attention` use `softmax`, jax.nn.softmax with a backward
pass that keeps only its output; scores and softmax are float32 whatever the compute dtype.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gptjax.attention_kernels import (KERNELS, cached_attention, causal_mask, position_mask,
                                      xla_attention, xla_causal_attention)
from gptjax.errors import ConfigError
from gptjax.layers import Linear, ModelArgs, normal

Array = jax.Array

IMPLEMENTATIONS = ("auto", "blocked", "xla", "cudnn", "splash")  # model.attention_impl values
AUTO = {"cpu": "blocked", "gpu": "cudnn", "tpu": "splash"}  # what 'auto' prefers; else 'xla'
WHAT = {
    "blocked": "gptjax's blocked causal kernel",
    "xla": "one masked product",
    "cudnn": "cuDNN flash attention",
    "splash": "Splash attention, a Pallas TPU kernel",
    "cached": "the new queries over the KV cache, one masked product",
    "prefixed": "one masked product over [learned prefix; keys]",
}
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD = 256  # Hopper and later; cuDNN itself refuses more than 128 on older GPUs


@dataclasses.dataclass(frozen=True)
class Kernel:
  """The attention kernel a layer runs, and why.

  Attributes:
    name: 'blocked', 'xla', 'cudnn', 'splash', or one of the own paths 'cached' (decoding) and
      'prefixed' (prefix tuning).
    reason: why this kernel, in words a log line can carry.
    dropout: the attention dropout rate it applies (> 0 only when training with 'xla' or
      'prefixed').
    instead_of: the kernel 'auto' would have run, when it runs this one in its place ('' if none).
  """

  name: str
  reason: str
  dropout: float = 0.0
  instead_of: str = ""


def current_backend() -> str:
  """The backend the model compiles for: 'cpu', 'gpu' (CUDA), 'rocm' or 'tpu'."""
  name = jax.default_backend()
  if name == "gpu" and "rocm" in jax.devices()[0].client.platform_version.lower():
    return "rocm"
  return name


def _cannot_run(kernel: str, args: ModelArgs, backend: str) -> str:
  """Why `kernel` cannot run this model on `backend` ('' when it can)."""
  dtype = jnp.dtype(args.dtype).name
  if kernel == "cudnn":
    if backend != "gpu":
      return f"cuDNN attention runs on NVIDIA GPUs, and this run's backend is {backend!r}"
    if dtype not in CUDNN_DTYPES:
      return (f"cuDNN's fused attention takes bfloat16 or float16, and model.dtype is {dtype!r} "
              "(set model.dtype='bfloat16' for it)")
    if args.d_head % 8 or args.d_head > CUDNN_MAX_HEAD:
      return (f"cuDNN's fused attention takes head widths that are multiples of 8 up to "
              f"{CUDNN_MAX_HEAD} (128 before Hopper), and d_head is {args.d_head}")
  if kernel == "splash" and backend != "tpu":
    return f"Splash attention is a Pallas kernel for TPUs, and this run's backend is {backend!r}"
  return ""


def resolve_kernel(args: ModelArgs, backend: str, *, training: bool, window: int | None = None,
                   segments: bool = False, decode: bool = False) -> Kernel:
  """The kernel an attention layer runs: `model.attention_impl` resolved for this backend.

  Every kernel takes a local window and segment ids, so `window` and `segments` do not change the
  choice today; they are named so the table stays explicit (tests/test_attention_kernels.py).

  Args:
    args: the model; reads attention_impl, dtype, d_head, attn_dropout and prefix_len.
    backend: 'cpu', 'gpu' (CUDA), 'rocm', 'tpu' (`current_backend()` for this process).
    training: dropout is on (not deterministic).
    window: the layer's local window (None = dense).
    segments: the batch carries segment ids (packed documents).
    decode: the layer decodes with a KV cache.

  Raises:
    ConfigError: `model.attention_impl` names a kernel that cannot run here, or one without
      attention dropout while training with `model.attn_dropout` > 0.
  """
  del window, segments  # every kernel takes both
  impl = args.attention_impl
  if impl not in IMPLEMENTATIONS:
    raise ConfigError(f"config.model.attention_impl: unknown kernel {impl!r}. Use one of "
                      f"{IMPLEMENTATIONS}.")
  dropout = args.attn_dropout if training else 0.0
  if decode:
    return Kernel("cached", "decoding with the KV cache always runs it (model.attention_impl "
                  "chooses the kernel of whole sequences)")
  if args.prefix_len:
    if impl not in ("auto", "xla"):
      raise ConfigError(
          f"config.model.attention_impl: {impl!r} cannot attend over prefix tuning's learned "
          "key/value prefix (finetune.peft='prefix'), which runs one masked product over "
          "[prefix; keys]. Set model.attention_impl='auto' or 'xla'.")
    return Kernel("prefixed", "prefix tuning (finetune.peft='prefix') always runs it"
                  + (f", with model.attn_dropout={dropout}" if dropout else ""), dropout)
  if impl != "auto":
    why = _cannot_run(impl, args, backend)
    if why:
      raise ConfigError(
          f"config.model.attention_impl: {impl!r} cannot run here: {why}. Use 'auto' (it picks "
          f"what runs here) or another of {IMPLEMENTATIONS[1:]}.")
    if dropout and impl != "xla":
      raise ConfigError(
          f"config.model.attn_dropout: {dropout} needs dropout inside attention, which "
          f"model.attention_impl={impl!r} ({WHAT[impl]}) lacks; only 'xla' has it. Set "
          f"model.attn_dropout=0 to train with {impl!r}, or model.attention_impl='auto' or "
          "'xla'.")
    return Kernel(impl, f"model.attention_impl={impl!r}", dropout if impl == "xla" else 0.0)
  best = AUTO.get(backend, "xla")
  why = _cannot_run(best, args, backend)
  if why:
    return Kernel("xla", why, dropout, instead_of=best)
  if dropout and best != "xla":
    return Kernel("xla", f"model.attn_dropout={dropout} needs dropout inside attention, which the "
                  f"{best!r} kernel lacks; set model.attn_dropout=0 for {best!r}", dropout,
                  instead_of=best)
  return Kernel(best, f"model.attention_impl='auto' on {backend}")


def _layer_kinds(args: ModelArgs) -> dict[str, int | None]:
  """{'dense': None, 'banded': window} for the layer kinds the model has."""
  return {("banded" if w else "dense"): w for w in dict.fromkeys(
      args.window(i) for i in range(len(args.pattern)))}


def kernel_lines(args: ModelArgs, backend: str,
                 kinds: tuple[str, ...] | None = None) -> list[str]:
  """The log lines saying which kernel each layer kind runs: one per kind, or one for training
  and one for evaluation where they differ."""
  lines = []
  for kind, window in _layer_kinds(args).items():
    if kinds is not None and kind not in kinds:
      continue
    train, evaluate = (resolve_kernel(args, backend, training=t, window=window)
                       for t in (True, False))
    same = (train.name, train.reason) == (evaluate.name, evaluate.reason)
    for kernel, phase in ((train, ""),) if same else (
        (train, " when training"), (evaluate, " when evaluating")):
      instead = f", not {kernel.instead_of!r}" if kernel.instead_of else ""
      lines.append(f"attention: {kind} layers run {kernel.name!r} ({WHAT[kernel.name]}){phase}"
                   f"{instead}: {kernel.reason}")
  return lines


def kernel_record(args: ModelArgs, backend: str) -> str:
  """The resolved kernels in a few words, for config.json: 'dense: cudnn' or
  'dense: train xla, eval cudnn; banded: ...'."""
  parts = []
  for kind, window in _layer_kinds(args).items():
    train, evaluate = (resolve_kernel(args, backend, training=t, window=window).name
                       for t in (True, False))
    parts.append(f"{kind}: {train}" if train == evaluate else
                 f"{kind}: train {train}, eval {evaluate}")
  return "; ".join(parts)


@functools.lru_cache(maxsize=None)
def say_once(line: str) -> None:
  """Prints `line` (process 0), once per process however often the model is traced."""
  if jax.process_index() == 0:
    print(f"gptjax: {line}", flush=True)


def announce(args: ModelArgs, backend: str, kinds: tuple[str, ...] | None = None) -> None:
  """Logs `kernel_lines` (each line once per process)."""
  for line in kernel_lines(args, backend, kinds):
    say_once(line)


class Attention(nn.Module):
  """Causal multi-head self-attention; `window` makes it locally banded (GPT-3 sparse layers).

  With `decode=True` it keeps a KV cache in the 'cache' collection: `cached_key`/`cached_value`
  [B, N, T, H] (heads-major, the layout the attention matmuls read without a transpose),
  `cached_positions` [B, T] (the position of the token in each slot; -1 = empty or padding) and
  `index` (the next slot to write, shared by all rows). Each call appends its L tokens
  at `index` and attends over the whole cache, masked by positions, so left-padded prompts of
  different lengths work. The first call, when no cache exists yet, only creates an empty one with
  T = L (use `init_cache`).
  """

  args: ModelArgs
  window: int | None = None
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: Array, segment_ids_BxL: Array | None, deterministic: bool,
               positions_BxL: Array | None = None) -> Array:
    a = self.args
    resid_std = a.hidden_std(a.init_std / math.sqrt(2 * a.n_layers))
    qkv_BxLx3xNxH = Linear((a.d_model,), (3, a.n_heads, a.d_head), ("embed", None, "heads", "kv"),
                           a.hidden_std(a.init_std), a.dtype, name="qkv")(x_BxLxD)
    qkv_BxLx3xNxH = checkpoint_name(qkv_BxLx3xNxH, "qkv")
    q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = (
        nn.with_logical_constraint(qkv_BxLx3xNxH[:, :, i], ("batch", "length", "heads", "kv"))
        for i in range(3))
    if a.query_scale != 1.0:  # µP: scores scale as 1/d_head, in every kernel (gptjax/mup.py)
      q_BxLxNxH = q_BxLxNxH * jnp.asarray(a.query_scale, q_BxLxNxH.dtype)

    backend = current_backend()
    kernel = resolve_kernel(a, backend, training=not deterministic, window=self.window,
                            segments=segment_ids_BxL is not None, decode=self.decode)
    if kernel.instead_of:  # 'auto' runs another kernel than the one it prefers: say so, once
      announce(a, backend, kinds=("banded" if self.window else "dense",))
    if kernel.name == "cached":
      out_BxLxNxH = self._cached(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, positions_BxL)
    elif kernel.name == "prefixed":
      out_BxLxNxH = self._prefixed(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL,
                                   kernel.dropout)
    elif kernel.dropout:
      out_BxLxNxH = xla_causal_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, self.window,
                                         segment_ids_BxL, kernel.dropout, self.make_rng("dropout"))
    else:
      out_BxLxNxH = KERNELS[kernel.name](q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, self.window,
                                         segment_ids_BxL)
    out_BxLxNxH = checkpoint_name(out_BxLxNxH, "attn_out")
    out_BxLxNxH = nn.with_logical_constraint(out_BxLxNxH, ("batch", "length", "heads", "kv"))
    return Linear((a.n_heads, a.d_head), (a.d_model,), ("heads", "kv", "embed"), resid_std, a.dtype,
                  name="out")(out_BxLxNxH)

  def _cached(self, q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array,
              positions_BxL: Array) -> Array:
    """Appends k, v at the cache index, then attends over the cache (decode mode)."""
    b, length, n, h = k_BxLxNxH.shape
    creating = not self.has_variable("cache", "cached_key")
    key = self.variable("cache", "cached_key", jnp.zeros, (b, n, length, h), k_BxLxNxH.dtype)
    value = self.variable("cache", "cached_value", jnp.zeros, (b, n, length, h), v_BxLxNxH.dtype)
    pos = self.variable("cache", "cached_positions", jnp.full, (b, length), -1, jnp.int32)
    index = self.variable("cache", "index", jnp.zeros, (), jnp.int32)
    if creating:
      return jnp.zeros_like(q_BxLxNxH)
    i = index.value

    def append(cache_BxNxTxH, new_BxLxNxH):
      new_BxNxLxH = new_BxLxNxH.transpose(0, 2, 1, 3).astype(cache_BxNxTxH.dtype)
      return nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(cache_BxNxTxH, new_BxNxLxH, (0, 0, i, 0)),
          ("batch", "heads", "length", "kv"))

    k_BxNxTxH, v_BxNxTxH = append(key.value, k_BxLxNxH), append(value.value, v_BxLxNxH)
    pos_BxT = jax.lax.dynamic_update_slice(pos.value, positions_BxL.astype(jnp.int32), (0, i))
    key.value, value.value, pos.value, index.value = k_BxNxTxH, v_BxNxTxH, pos_BxT, i + length
    mask_Bx1xLxT = position_mask(positions_BxL, pos_BxT, self.window)
    if self.args.prefix_len:  # prefix tuning: the learned K/V prefix, seen by every query, first
      a, prefix = self.args, self.args.prefix_len

      def prefixed(name, cache_BxNxTxH):
        p_PxNxH = self.param(name, normal(a.init_std, (None, "heads", "kv")), (prefix, n, h),
                             jnp.float32)
        p_BxNxPxH = jnp.broadcast_to(p_PxNxH.astype(cache_BxNxTxH.dtype).transpose(1, 0, 2),
                                     (b, n, prefix, h))
        return jnp.concatenate([p_BxNxPxH, cache_BxNxTxH], axis=2)

      k_BxNxTxH, v_BxNxTxH = prefixed("prefix_key", k_BxNxTxH), prefixed("prefix_value", v_BxNxTxH)
      mask_Bx1xLxT = jnp.concatenate(
          [jnp.ones(mask_Bx1xLxT.shape[:3] + (prefix,), bool), mask_Bx1xLxT], axis=-1)
    return cached_attention(q_BxLxNxH, k_BxNxTxH, v_BxNxTxH, mask_Bx1xLxT)

  def _prefixed(self, q_BxLxNxH: Array, k_BxLxNxH: Array, v_BxLxNxH: Array,
                segment_ids_BxL: Array | None, dropout_rate: float) -> Array:
    """Attention over [prefix; keys]: P learned key/value positions every query (and segment)
    sees before its causal window (Li & Liang 2021), with attention dropout at `dropout_rate`."""
    a = self.args
    b, length = k_BxLxNxH.shape[:2]

    def with_prefix(name, x_BxLxNxH):
      p_PxNxH = self.param(name, normal(a.init_std, (None, "heads", "kv")),
                           (a.prefix_len, a.n_heads, a.d_head), jnp.float32)
      p_BxPxNxH = jnp.broadcast_to(p_PxNxH.astype(x_BxLxNxH.dtype), (b,) + p_PxNxH.shape)
      return jnp.concatenate([p_BxPxNxH, x_BxLxNxH], axis=1)

    k_BxTxNxH, v_BxTxNxH = with_prefix("prefix_key", k_BxLxNxH), with_prefix("prefix_value",
                                                                               v_BxLxNxH)
    causal = causal_mask(length, self.window, segment_ids_BxL)
    mask = jnp.concatenate([jnp.ones(causal.shape[:3] + (a.prefix_len,), bool), causal], axis=-1)
    if dropout_rate:
      return xla_attention(q_BxLxNxH, k_BxTxNxH, v_BxTxNxH, mask, dropout_rate,
                           self.make_rng("dropout"))
    return xla_attention(q_BxLxNxH, k_BxTxNxH, v_BxTxNxH, mask)
