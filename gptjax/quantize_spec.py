"""What a quantization is asked to do (`Spec`) and whether it fits a model: no Qwix needed, so the
config check runs without the `[compress]` extra. `gptjax.quantize` does the quantizing.
"""

import dataclasses

import jax.numpy as jnp
import ml_collections

from gptjax.errors import ConfigError
from gptjax.model import ModelArgs

QTYPES = {8: jnp.int8, 4: jnp.int4}
LINEARS = r"(.*/)?(qkv|out|fc|proj)"  # module paths of the model's Linear layers
METHODS = ("__call__", "hidden", "logits", "output_embedding")  # GPT methods Qwix wraps


@dataclasses.dataclass(frozen=True)
class Spec:
  """How weights are quantized.

  bits: 8 (int8) or 4 (int4).
  group_size: 0 = one scale per output channel; > 0 = one per this many weights along the
    contraction axis (subchannel, 'grouped').
  embeddings: PTQ only: also store the embedding tables quantized (see the module docstring).
  activations: QAT only: also quantize each Linear's input to int8 (dynamic, per token).
  """

  bits: int = 8
  group_size: int = 0
  embeddings: bool = False
  activations: bool = False

  @classmethod
  def from_qat_config(cls, q: ml_collections.ConfigDict) -> "Spec":
    return cls(bits=q.bits, group_size=q.group_size, activations=q.activations)

  def check(self, args: ModelArgs, setting: str = "quantize") -> None:
    """Raises ConfigError naming `<setting>.<field>` if this spec cannot quantize the model."""
    if self.bits not in QTYPES:
      raise ConfigError(f"{setting}.bits: {self.bits}-bit weights are not supported. Use 8 (int8, "
                        "per channel) or 4 (int4, best with a group_size).")
    g = self.group_size
    if g < 0:
      raise ConfigError(f"{setting}.group_size: must be >= 0 (0 = per output channel), got {g}.")
    if g:
      dims = {"d_model": args.d_model, "d_ff": args.d_ff}
      bad = [f"{k}={v}" for k, v in dims.items() if v % g]
      if args.d_head % min(g, args.d_head):
        bad.append(f"d_head={args.d_head}")
      if bad:
        raise ConfigError(f"{setting}.group_size: groups of {g} do not tile the contraction axes "
                          f"of the Linear layers ({', '.join(bad)}). Use a size dividing d_model, "
                          "d_ff and d_head (e.g. 32 or 64), or 0 for per-channel scales.")


def check(cfg: ml_collections.ConfigDict) -> None:
  """Checks `cfg.compress.qat` against the model (nothing to check when QAT is off)."""
  if cfg.compress.qat.enabled:
    Spec.from_qat_config(cfg.compress.qat).check(ModelArgs.from_config(cfg.model),
                                                 "config.compress.qat")
