"""The µP coordinate check (Tensor Programs V, §D.1): activation scales across widths.

Train the same model at several widths for a few steps with one learning rate, and record the mean
absolute value of each layer's output ("coordinate size") at every step. Under µP
(`model.parametrization='mup'`) the curves of different widths lie on top of each other; under the
standard parametrization the outputs of the later steps grow with the width, which is why SP's best
learning rate shrinks as models widen. A wrong multiplier shows up here as a slope across widths.

    data = coord_check.run(cfg, widths=(64, 128, 256), steps=4)
    data[256]["logits"]   # [steps + 1] mean |logit| at width 256, after 0, 1, ... steps

The batch is fixed random tokens (the check is about scales, not learning), the optimizer is the
run's own (`optim.make`: AdamW with µP's per-parameter learning rates), and `model.scan_layers` is
off so that every block's output can be read by name.
"""

from collections.abc import Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gptjax import optim
from gptjax.config import validate
from gptjax.layers import ModelArgs
from gptjax.loss import cross_entropy
from gptjax.model import GPT


def at_width(cfg: ml_collections.ConfigDict, width: int) -> ml_collections.ConfigDict:
  """`cfg` with the model `width` wide: d_model and d_ff scaled together, the head count kept."""
  c = ml_collections.ConfigDict(cfg.to_dict())
  ratio = width / c.model.d_model
  c.model.d_model = width
  if c.model.d_ff:
    c.model.d_ff = round(c.model.d_ff * ratio)
  if c.model.d_head:
    c.model.d_head = round(c.model.d_head * ratio)
  return c


def _scales(intermediates) -> dict[str, float]:
  """Mean |x| of the outputs worth following: embeddings, each block, its attention and MLP."""
  out = {}
  for path, values in traverse_util.flatten_dict(intermediates, sep="/").items():
    name = path.removesuffix("/__call__")
    parts = name.split("/")
    if name == "wte" or (parts[0].startswith("block_") and (
        len(parts) == 1 or parts[1:] in (["attn"], ["mlp"]))):
      out[name] = float(jnp.mean(jnp.abs(values[0])))
  return out


def run(cfg: ml_collections.ConfigDict, widths: Sequence[int], steps: int = 4, batch: int = 8,
        seq_len: int = 64, seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
  """Coordinate sizes per width, layer and step.

  Args:
    cfg: a full config (its model, optimizer and parametrization); `optim.peak_lr` is the learning
      rate, held constant (no warmup, no decay, no clipping, no weight decay, as in the paper).
    widths: d_model values; under µP each must be a multiple of `model.mup_base_width`.
    steps: Adam steps.
    batch, seq_len: the fixed batch of random tokens.
    seed: init and data seed, the same at every width.

  Returns:
    {width: {layer: array [steps + 1]}}: mean |output| before the first step and after each.
    Layers: 'wte' (token embedding), 'block_{l}', 'block_{l}/attn', 'block_{l}/mlp', 'logits'.
  """
  data = {}
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq_len + 1), 0,
                              cfg.model.vocab_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  for width in widths:
    c = at_width(cfg, width)
    c.model.scan_layers = False
    c.model.remat = "none"
    c.model.embd_dropout = c.model.attn_dropout = c.model.resid_dropout = 0.0
    c.train.steps, c.train.tokens, c.train.seq_len = steps + 1, 0, seq_len
    c.train.global_batch, c.train.micro_batch = batch, 0
    o = c.optim
    o.schedule, o.warmup_steps, o.warmup_tokens, o.batch_ramp_tokens = "constant", 0, 0, 0
    o.clip_norm, o.weight_decay = 0.0, 0.0
    validate(c, n_devices=1)  # one device: the check runs unsharded
    model = GPT(ModelArgs.from_config(c.model))
    tx, _ = optim.make(c, optim.plan(c))
    params = nn.meta.unbox(model.init(jax.random.key(seed), inputs)["params"])
    opt_state = tx.init(params)

    @jax.jit
    def measure(params):
      logits, state = model.apply({"params": params}, inputs, capture_intermediates=True,
                                  mutable=["intermediates"])
      return logits, state["intermediates"]

    @jax.jit
    def step(params, opt_state):
      def loss(p):
        return cross_entropy(model.apply({"params": p}, inputs), targets)[0]
      grads = jax.grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    rows = []
    for t in range(steps + 1):
      if t:
        params, opt_state = step(params, opt_state)
      logits, inter = measure(params)
      row = _scales(inter)
      row["logits"] = float(jnp.mean(jnp.abs(logits[..., :c.model.vocab_size])))
      rows.append(row)
    data[width] = {k: np.array([r[k] for r in rows]) for k in rows[0]}
  return data


def plot(results: dict[str, dict[int, dict[str, np.ndarray]]], path: str,
         layers: Sequence[str] = ("block_0", "block_1", "logits")) -> str:
  """The coordinate-check picture: one row per parametrization (`results` = {'SP': run(...),
  'µP': run(...)}), one panel per layer, mean |output| against width with one line per step.
  Returns `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from matplotlib.ticker import NullFormatter
  fig, axes = plt.subplots(len(results), len(layers), figsize=(3.6 * len(layers),
                                                               3.0 * len(results)),
                           squeeze=False, sharey="col")  # one scale per layer: rows compare
  for row, (kind, data) in zip(axes, results.items()):
    widths = sorted(data)
    steps = len(next(iter(data.values()))[layers[0]])
    colors = plt.cm.plasma(np.linspace(0.0, 0.85, steps))
    for ax, layer in zip(row, layers):
      for t, color in zip(range(steps), colors):
        ax.plot(widths, [data[w][layer][t] for w in widths], "o-", color=color, ms=3,
                label=f"step {t}")
      ax.set(xscale="log", yscale="log", title=f"{kind}: {layer}", xlabel="d_model")
      ax.set_xticks(widths, [str(w) for w in widths])
      ax.xaxis.set_minor_formatter(NullFormatter())
      ax.grid(alpha=0.3)
    row[0].set_ylabel("mean |output|")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
