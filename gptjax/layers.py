"""The model's arguments and the building blocks every layer shares.

`ModelArgs` (with the tables it reads its string fields from: REMAT_POLICIES, ATTENTION_PATTERNS,
DTYPES), the `Linear` layer, the logically partitioned initialisers and the LayerNorm factory.
`gptjax/attention.py` and `gptjax/model.py` build on them; `gptjax.model` re-exports them, so
`from gptjax.model import ModelArgs` keeps working.
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_attn": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
}
ATTENTION_PATTERNS = {"dense": (0,), "alternating": (0, 1)}  # 1 marks a locally banded layer
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelArgs:
  """Static model hyperparameters (a hashable view of `cfg.model`).

  `RUNTIME_FIELDS` say how the model computes, not what it is: they leave the parameter tree and
  its meaning as they are, so a resumed run, a fine-tune of a base or a run opened for inference
  may set them to its own values. Every other field (`architecture_fields`) defines the parameters:
  a checkpoint only fits a model with the same values (`vocab_size` aside, which a run takes from
  its tokenizer).

  `attention_impl` names the attention kernel: 'auto', 'blocked', 'xla', 'cudnn' or 'splash'
  (`gptjax.attention.resolve_kernel` says which runs).
  """

  RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = (
      "scan_layers", "remat", "dtype", "attention_impl", "embd_dropout", "attn_dropout",
      "resid_dropout")

  vocab_size: int = 50257
  pad_vocab_to: int = 1
  ctx: int = 1024
  n_layers: int = 12
  d_model: int = 768
  n_heads: int = 12
  d_head: int = 64
  d_ff: int = 3072
  norm: str = "pre"
  ln_eps: float = 1e-5
  tie_embeddings: bool = True
  attention: str = "dense"
  local_window: int = 256
  attention_impl: str = "auto"
  embd_dropout: float = 0.0
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  init_std: float = 0.02
  scan_layers: bool = True
  remat: str = "none"
  dtype: Any = jnp.float32
  # Parametrization (gptjax/mup.py): 'sp' (standard, GPT-2's) or 'mup' (maximal update, relative
  # to a base model of width `mup_base_width` whose heads are `mup_base_d_head` wide).
  parametrization: str = "sp"
  mup_base_width: int = 0
  mup_base_d_head: int = 0  # 0 = d_head * mup_base_width / d_model (the head count held fixed)
  # Fine-tuning additions (gptjax/peft.py); 0 = absent, leaving the parameter tree as it is.
  adapter_dim: int = 0  # Houlsby adapter bottleneck after attention and after the MLP
  prefix_len: int = 0  # learned key/value prefix positions per layer (prefix tuning)

  @classmethod
  def architecture_fields(cls) -> tuple[str, ...]:
    """The fields that define the parameters (all but `RUNTIME_FIELDS`)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.RUNTIME_FIELDS)

  @classmethod
  def from_config(cls, m) -> "ModelArgs":
    """Builds the args from a (validated) `cfg.model` ConfigDict, resolving the 0 = default keys."""
    return cls(
        vocab_size=m.vocab_size, pad_vocab_to=m.pad_vocab_to, ctx=m.ctx, n_layers=m.n_layers,
        d_model=m.d_model, n_heads=m.n_heads, d_head=m.d_head or m.d_model // m.n_heads,
        d_ff=m.d_ff or 4 * m.d_model, norm=m.norm, ln_eps=m.ln_eps, tie_embeddings=m.tie_embeddings,
        attention=m.attention, local_window=m.local_window,
        attention_impl=m.attention_impl,
        embd_dropout=m.embd_dropout, attn_dropout=m.attn_dropout, resid_dropout=m.resid_dropout,
        init_std=m.init_std, scan_layers=m.scan_layers, remat=m.remat, dtype=DTYPES[m.dtype],
        # Runs saved before µP existed were standard-parametrized.
        parametrization=m.get("parametrization", "sp"), mup_base_width=m.get("mup_base_width", 0),
        mup_base_d_head=m.get("mup_base_d_head", 0))

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

  # ---- µP (gptjax/mup.py has the rules and their source) ----
  @property
  def width_mult(self) -> float:
    """m = d_model / mup_base_width under µP; 1 under SP (and at the base width)."""
    return self.d_model / self.mup_base_width if self.parametrization == "mup" else 1.0

  @property
  def base_d_head(self) -> float:
    """The base model's head width (µP): `mup_base_d_head`, or d_head / m (the head count held)."""
    return self.mup_base_d_head or self.d_head / self.width_mult

  def hidden_std(self, std: float) -> float:
    """Init std of a hidden (width x width) weight whose base-width std is `std`: under µP its
    variance goes as 1/fan_in, so std / sqrt(m)."""
    return std / self.width_mult ** 0.5

  def readout_std(self, std: float) -> float:
    """Init std of a width -> fixed-size matrix other than the LM output (a classifier head, an
    adapter's down-projection): under µP (Table 3's output weights) variance 1/fan_in^2, so
    std / m."""
    return std / self.width_mult

  @property
  def query_scale(self) -> float:
    """Factor on the queries so that every kernel's 1/sqrt(d_head) becomes µP's 1/d_head (times
    sqrt(base_d_head), which makes it 1/sqrt(d_head) at the base width): sqrt(base_d_head/d_head).
    1 under SP."""
    if self.parametrization != "mup":
      return 1.0
    return (self.base_d_head / self.d_head) ** 0.5

  @property
  def output_mult(self) -> float:
    """Multiplier on the logits: 1/m under µP (Table 8's output weights), 1 under SP."""
    return 1.0 / self.width_mult

  @property
  def pattern(self) -> tuple[int, ...]:
    """Per-layer attention kind, repeating: 0 dense, 1 locally banded."""
    return ATTENTION_PATTERNS[self.attention]

  def window(self, layer: int) -> int | None:
    """Tokens layer `layer` attends to (None = all earlier tokens)."""
    return self.local_window if self.pattern[layer % len(self.pattern)] else None


def normal(std: float, axes: tuple[str | None, ...]):
  """A normal(std) initialiser whose parameter carries the logical axes `axes`."""
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros(axes):
  """A zeros initialiser whose parameter carries the logical axes `axes`."""
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def layer_norm(args: ModelArgs, name: str) -> nn.LayerNorm:
  """LayerNorm over `embed` in the compute dtype (exact variance), named `name`."""
  return nn.LayerNorm(
      epsilon=args.ln_eps, dtype=args.dtype, name=name, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=zeros(("embed",)))


class Linear(nn.Module):
  """x[..., *in_shape] @ kernel[*in_shape, *out_shape] + bias[*out_shape], in the compute dtype.

  Kernels are created at their full shape (not flattened), so their logical axes always apply.
  """

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axes of the kernel; the bias takes the output ones
  std: float
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", normal(self.std, self.axes), self.in_shape + self.out_shape,
                        jnp.float32)
    bias = self.param("bias", zeros(self.axes[len(self.in_shape):]), self.out_shape, jnp.float32)
    n_in = len(self.in_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    return y + bias.astype(self.dtype)
