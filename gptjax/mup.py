"""µP, the maximal update parametrization (Yang et al. 2022, "Tensor Programs V", µTransfer).

Under µP the best learning rate (and init scale) found on a narrow model holds for a wide one:
tune on the base width, train at any multiple of it. `model.parametrization = 'mup'` with
`model.mup_base_width` turns it on; m = d_model / mup_base_width is the width multiplier, and at
m = 1 the model is exactly the standard-parametrized (SP) one, so a base tuned under SP carries
over unchanged.

The rules, relative to SP at the base width (Tensor Programs V, Table 8, "µP formulation for easier
implementation", for Adam; Table 3 where it says so):

| parameters                         | init std      | Adam learning rate | multiplier       |
|------------------------------------|---------------|--------------------|------------------|
| input: wte, wpe, biases, LayerNorm | unchanged     | unchanged          | 1                |
| hidden: qkv, out, fc, proj kernels | / sqrt(m)     | / m                | 1                |
| LM output (lm_head, or tied wte)   | unchanged     | unchanged          | logits x 1/m     |
| other width -> fixed matrices:     | / m           | / m                | 1 (Table 3's     |
|   classifier head, LoRA A, adapter |               |                    |  output weights) |
|   down-projection                  |               |                    |                  |
| fixed -> width: LoRA B, adapter up,| unchanged     | unchanged          | 1                |
|   prefix-tuning keys and values    |               |                    |                  |

and attention scores scale as 1/d_head, not 1/sqrt(d_head): the queries are multiplied by
sqrt(base_d_head / d_head) before whichever kernel runs (blocked, xla, cudnn, splash, the KV cache,
prefix tuning), so scores are q.k sqrt(base_d_head) / d_head, 1/sqrt(d_head) at the base width.

Where each lives: init stds and the query factor in the model (`ModelArgs.hidden_std`,
`readout_std`, `query_scale`, `output_mult`, used by gptjax/model.py and gptjax/attention.py; LoRA
A in `peft.lora_init`); the learning rates here, as Optax parameter labels (`labels`, `scale`):
Adam's update of every 'width' parameter is multiplied by 1/m after AdamW, which is the learning
rate and the decoupled weight decay (both multiply the update) divided by m. The logged learning
rate is the base one.

The family a base width describes scales every width by m together: d_model, d_ff and
heads x d_head (all hidden fan-ins grow by m); depth, vocabulary and context stay. `base_d_head` is
`model.mup_base_d_head`, by default d_head / m (the head count held fixed; set it to d_head when
the family adds heads of a fixed width instead).
"""

from typing import Any

import jax
import ml_collections
import optax

from gptjax.errors import ConfigError

PARAMETRIZATIONS = ("sp", "mup")
WIDTH, FIXED = "width", "fixed"  # the two learning-rate labels


def label(names: tuple[str, ...]) -> str:
  """'width' for a parameter whose fan-in grows with the width (its Adam learning rate is / m),
  'fixed' otherwise, from its path names (e.g. ('layers', 'block_0', 'attn', 'qkv', 'kernel'))."""
  if names[-1] == "lora_a":
    return WIDTH
  if names[-1] != "kernel":  # embeddings, lm_head, biases, LayerNorm, LoRA B, prefixes
    return FIXED
  if len(names) >= 3 and names[-2] == "up" and names[-3].startswith("adapter_"):
    return FIXED  # an adapter's up-projection reads its bottleneck, a fixed width
  return WIDTH


def labels(params: Any) -> Any:
  """`label` for every leaf of `params` (a tree of arrays or of optimizer-update placeholders)."""

  def one(path, _):
    return label(tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path))

  return jax.tree_util.tree_map_with_path(one, params)


def scale(width_mult: float) -> optax.GradientTransformation:
  """Multiplies the updates of 'width' parameters by 1/m (after AdamW: their learning rate / m)."""
  return optax.multi_transform(
      {WIDTH: optax.scale(1.0 / width_mult), FIXED: optax.identity()}, labels)


def validate(m: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a µP setting that cannot describe the model `cfg.model` (before
  compiling). Every fine-tuning method has its rule in the table above: none is refused."""
  kind = m.get("parametrization", "sp")
  if kind not in PARAMETRIZATIONS:
    raise ConfigError(f"config.model.parametrization: unknown {kind!r}. Use 'sp' (standard) or "
                      "'mup' (maximal update, with model.mup_base_width).")
  base, base_head = m.get("mup_base_width", 0), m.get("mup_base_d_head", 0)
  if kind == "sp":
    if base or base_head:
      raise ConfigError(
          f"config.model.mup_base_width: {base} (mup_base_d_head {base_head}) is set but "
          "model.parametrization is 'sp', which has no base width. Set "
          "model.parametrization='mup', or leave both at 0.")
    return
  if base < 1 or m.d_model % base:
    raise ConfigError(
        f"config.model.mup_base_width: must divide model.d_model={m.d_model} (µP's width "
        f"multiplier m = d_model / base width is a whole number), got {base}. Use the width the "
        "learning rate was tuned at, e.g. the narrowest model of the family.")
  d_head = m.d_head or m.d_model // m.n_heads
  if base_head < 0 or (not base_head and (d_head * base) % m.d_model):
    raise ConfigError(
        f"config.model.mup_base_d_head: the base model's head width d_head * base / d_model = "
        f"{d_head} * {base} / {m.d_model} is not a whole number. Set model.mup_base_d_head to the "
        "base model's d_head (its own d_head when the family adds heads of a fixed width).")
