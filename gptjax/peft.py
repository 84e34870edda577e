"""Freezing and parameter-efficient fine-tuning (PEFT), as pure functions of parameter trees.

Parameters are named by their '/'-joined paths: `layers/block_0/attn/qkv/kernel` (scanned layers:
one stacked leaf per position in the attention pattern, all layers at once), `block_3/mlp/fc/bias`
(unrolled), `wte/embedding`, `ln_f/scale`.

- Freezing: `split(tree, is_frozen)` cuts a tree in two by a predicate on paths and `join` puts the
  halves back; the fine-tuning step keeps the frozen half in `TrainState.frozen` (no gradient, no
  optimizer state). `frozen_predicate(method, regex)` says what a method freezes.
- LoRA (Hu et al. 2021): W = W0 + (alpha / r) A B for every Linear kernel whose module path matches
  a regex. A is [*layers, *in, r] (Gaussian), B is [*layers, r, *out] (zero), both with the
  kernel's logical axes, so they shard like it. `merge` adds the products to the weights; the loss
  calls it before `model.apply`, so LoRA works with scanned layers, remat and every sharding without
  touching the model, and the same function folds a trained LoRA into the weights for serving.
- Houlsby adapters and prefix tuning live in the model (`ModelArgs.adapter_dim`, `prefix_len`);
  `is_peft_param` tells their parameters from the base model's.
"""

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from gptjax.errors import ConfigError

METHODS = ("none", "lora", "adapters", "prefix")
# Parameters the model has only when a PEFT method adds them (gptjax/model.py, attention.py).
_PEFT_PARAM = re.compile(r"(^|/)(adapter_attn|adapter_mlp|prefix_key|prefix_value)(/|$)")
_LETTERS = "abcdefghijklmnopqrstuvwxy"  # einsum subscripts; 'z' is the LoRA rank


def flatten(tree: Any) -> dict[str, Any]:
  """{'/'-joined path: leaf} of a nested dict of parameters (boxed or not)."""
  return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(flat, sep="/")


def is_peft_param(path: str) -> bool:
  """True for the parameters of adapters and prefixes (added by a PEFT method, not pre-trained)."""
  return bool(_PEFT_PARAM.search(path))


def split(tree: Any, is_frozen: Callable[[str], bool]) -> tuple[Any, Any]:
  """(trainable, frozen): the leaves of `tree` for which `is_frozen(path)` is False / True, each a
  nested dict holding only its own leaves (None when it has none)."""
  flat = flatten(tree)
  trainable = {p: x for p, x in flat.items() if not is_frozen(p)}
  frozen = {p: x for p, x in flat.items() if is_frozen(p)}
  return (unflatten(trainable) if trainable else None), (unflatten(frozen) if frozen else None)


def join(*trees: Any) -> dict[str, Any]:
  """The union of disjoint parameter trees (None counts as empty): the inverse of `split`."""
  flat = {}
  for tree in trees:
    flat |= flatten(tree)
  return unflatten(flat)


def frozen_predicate(method: str, freeze: str) -> Callable[[str], bool]:
  """Which base-model parameters a fine-tuning run freezes.

  Args:
    method: 'none' (plain fine-tuning) or a PEFT method ('lora', 'adapters', 'prefix').
    freeze: for 'none', a regex (`re.search`) over parameter paths; '' freezes nothing. PEFT
      methods freeze every pre-trained parameter and train only their own.
  """
  if method != "none":
    return lambda path: not is_peft_param(path)
  pattern = re.compile(freeze) if freeze else None
  return lambda path: bool(pattern and pattern.search(path))


def check_freeze(paths: list[str], freeze: str) -> None:
  """Raises ConfigError if the freeze regex is invalid or matches no parameter."""
  if not freeze:
    return
  try:
    pattern = re.compile(freeze)
  except re.error as e:
    raise ConfigError(f"config.finetune.freeze: {freeze!r} is not a regular expression ({e}). "
                      "Use a Python regex over parameter paths, e.g. 'wte|wpe|layers'.") from e
  if not any(pattern.search(p) for p in paths):
    raise ConfigError(f"config.finetune.freeze: {freeze!r} matches no parameter. Parameter paths "
                      f"look like {sorted(paths)[:6]}.")


def count(tree: Any) -> int:
  """Number of scalars in a tree of arrays (or ShapeDtypeStructs); 0 for None."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ---- LoRA ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Lora:
  """LoRA settings: rank r, alpha (the update is scaled by alpha / r), target module regex."""

  rank: int
  alpha: float
  targets: str

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def lora_modules(params: Any, targets: str) -> list[str]:
  """Module paths (e.g. 'layers/block_0/attn/qkv') of the Linear kernels matched by `targets`.

  Raises:
    ConfigError: the regex is invalid or matches no module (the message lists the modules).
  """
  modules = sorted(p.removesuffix("/kernel") for p in flatten(params)
                   if p.endswith("/kernel") and not is_peft_param(p))
  try:
    pattern = re.compile(targets)
  except re.error as e:
    raise ConfigError(f"config.finetune.lora.targets: {targets!r} is not a regular expression "
                      f"({e}). Use e.g. 'attn/qkv'.") from e
  chosen = [m for m in modules if pattern.search(m)]
  if not chosen:
    raise ConfigError(f"config.finetune.lora.targets: {targets!r} matches no module. The Linear "
                      f"modules of this model are {modules}; e.g. 'attn/qkv' or 'attn|mlp'.")
  return chosen


def _kernel_split(names: tuple[str | None, ...]) -> tuple[int, int]:
  """(stacked layer dims, input dims) of a kernel from its logical axes.

  Kernels map their input axes to their output axes: [D, ...] (qkv, fc) take one 'embed' input
  axis; the others ([N, H, D], [F, D]) produce one output axis.
  """
  lead = 1 if names and names[0] == "layers" else 0
  rest = names[lead:]
  return lead, 1 if rest[0] == "embed" else len(rest) - 1


def lora_init(rng: jax.Array, params: Any, lora: Lora, width_mult: float = 1.0
              ) -> dict[str, Any]:
  """A (N(0, 1/fan_in)) and B (zero) for every targeted kernel, boxed with logical axes.

  Under µP, A maps the width to the rank, a fixed size: it is an output weight of Tensor Programs
  V's Table 3, with variance 1/fan_in^2 relative to the base width, so N(0, 1/(fan_in · m)) for a
  width multiplier m (`gptjax/mup.py`; its learning rate is divided by m there too).

  Args:
    rng: PRNG key.
    params: the model's parameters as `model.init` returns them (boxed with logical axes).
    lora: the settings.
    width_mult: µP's m (`ModelArgs.width_mult`; 1 under SP).

  Returns:
    A tree mirroring the targeted modules: {'layers': {'block_0': {'attn': {'qkv': {'lora_a': A,
    'lora_b': B}}}}}, with A [*layers, *in, r] and B [*layers, r, *out].
  """
  if lora.rank < 1:
    raise ConfigError(f"config.finetune.lora.rank: must be >= 1, got {lora.rank}. Use e.g. 8.")
  flat, out, parts = flatten(params), {}, []
  for module in lora_modules(params, lora.targets):
    kernel = flat[module + "/kernel"]
    if not isinstance(kernel, nn.LogicallyPartitioned):
      raise ValueError(f"lora_init needs boxed params (as model.init returns them); {module} "
                       "has no logical axes")
    names, shape = kernel.names, kernel.value.shape
    lead, n_in = _kernel_split(names)
    parts.append((module, names, shape, lead, n_in))
  # One draw for every A: each random-number call is compiled separately, and slowly.
  a_shapes = [shape[:lead + n_in] + (lora.rank,) for _, _, shape, lead, n_in in parts]
  draws = jax.random.normal(rng, (sum(math.prod(s) for s in a_shapes),))
  at = 0
  for (module, names, shape, lead, n_in), a_shape in zip(parts, a_shapes):
    a = draws[at:at + math.prod(a_shape)].reshape(a_shape) / math.sqrt(
        math.prod(a_shape[lead:-1]) * width_mult)
    at += math.prod(a_shape)
    out[module + "/lora_a"] = nn.LogicallyPartitioned(a, names[:lead + n_in] + (None,))
    b_shape = shape[:lead] + (lora.rank,) + shape[lead + n_in:]
    out[module + "/lora_b"] = nn.LogicallyPartitioned(
        jnp.zeros(b_shape), names[:lead] + (None,) + names[lead + n_in:])
  return unflatten(out)


def _lora_pairs(lora_params: Any) -> dict[str, tuple[Any, Any]]:
  flat = flatten(lora_params)
  return {p.removesuffix("/lora_a"): (x, flat[p.removesuffix("/lora_a") + "/lora_b"])
          for p, x in flat.items() if p.endswith("/lora_a")}


def _lead_dims(a_shape, b_shape, kernel_shape) -> int:
  return (len(a_shape) - 1) + (len(b_shape) - 1) - len(kernel_shape)


def delta(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
  """A B contracted over the rank, batched over the stacked layer dims: the kernel's update."""
  lead = _lead_dims(a.shape, b.shape, (0,) * kernel_ndim)
  n_in, n_out = a.ndim - 1 - lead, b.ndim - 1 - lead
  l, i, o = _LETTERS[:lead], _LETTERS[lead:lead + n_in], _LETTERS[lead + n_in:lead + n_in + n_out]
  return jnp.einsum(f"{l}{i}z,{l}z{o}->{l}{i}{o}", a, b, preferred_element_type=jnp.float32)


def merge(params: Any, lora_params: Any, scale: float) -> dict[str, Any]:
  """`params` with every LoRA-adapted kernel replaced by W + scale · A B (same dtype as W).

  Used inside the training loss (gradients reach A and B) and, once, to fold a trained LoRA into
  the weights: the result is a plain GPT parameter tree.
  """
  flat = flatten(params)
  for module, (a, b) in _lora_pairs(lora_params).items():
    w = flat[module + "/kernel"]
    flat[module + "/kernel"] = (w + scale * delta(a, b, w.ndim)).astype(w.dtype)
  return unflatten(flat)


def check_fits(lora_params: Any, base_params: Any, setting: str = "finetune.base") -> None:
  """Raises ConfigError unless every LoRA pair matches a kernel of `base_params` in shape.

  Args:
    lora_params: trained (or abstract) LoRA pairs.
    base_params: the base weights (arrays or ShapeDtypeStructs) they are to be applied to.
    setting: the config key to blame.
  """
  flat, bad = flatten(nn.meta.unbox(base_params)), []
  for module, (a, b) in _lora_pairs(nn.meta.unbox(lora_params)).items():
    w = flat.get(module + "/kernel")
    if w is None:
      bad.append(f"{module}: no such kernel in the base")
      continue
    lead = _lead_dims(a.shape, b.shape, w.shape)
    want = tuple(a.shape[:-1]) + tuple(b.shape[lead + 1:])
    if lead < 0 or tuple(a.shape[:lead]) != tuple(b.shape[:lead]) or want != tuple(w.shape):
      bad.append(f"{module}: LoRA A {tuple(a.shape)} x B {tuple(b.shape)} was trained for a "
                 f"kernel of shape {want if lead >= 0 else '?'}, the base has {tuple(w.shape)}")
  if bad:
    raise ConfigError(f"config.{setting}: the LoRA weights do not fit this base model: "
                      + "; ".join(bad[:6]) + (f" (and {len(bad) - 6} more)" if len(bad) > 6 else "")
                      + ". Fine-tune and apply them on the same base (model shape and layout).")
