"""AdamW with a learning-rate schedule, clipping and a weight-decay mask, all from Optax.

Lengths (warmup, decay, the run itself) may be given in steps or tokens; `RunPlan` turns tokens
into steps, taking the GPT-3 batch-size ramp into account (the batch grows in whole micro-batches,
so each distinct size compiles once).

The ramp needs micro-batches no larger than its first batch. So with `optim.batch_ramp_tokens` on
and `train.micro_batch = 0`, the micro-batch resolves to the ramp's start
(`optim.batch_ramp_start` tokens / seq_len sequences, lowered to a divisor of the global batch),
not to the whole global batch; `RunPlan.micro_batch` is the resolved value that every reader
should use.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import ml_collections
import optax

from gptjax import mup, prune
from gptjax.errors import ConfigError
from gptjax.layers import ModelArgs


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """How many micro-batches each step takes, and the run's length in steps.

  Attributes:
    seq_len: tokens per sequence.
    micro_batch: sequences per forward/backward pass (all devices), resolved (`micro_batch`).
    max_accum: micro-batches per step at the full global batch.
    ramp: (first_step, accum) pairs, ascending; the last entry holds until the end.
    total_steps: optimizer steps in the run.
  """

  seq_len: int
  micro_batch: int
  max_accum: int
  ramp: tuple[tuple[int, int], ...]
  total_steps: int

  def accum(self, step: int) -> int:
    """Micro-batches in optimizer step `step` (0-based)."""
    k = self.ramp[0][1]
    for first, a in self.ramp:
      if step >= first:
        k = a
    return k

  def tokens_before(self, step: int) -> int:
    """Tokens consumed by steps [0, step)."""
    total, tokens_per_micro = 0, self.micro_batch * self.seq_len
    bounds = list(self.ramp) + [(step, 0)]
    for (first, a), (nxt, _) in zip(bounds, bounds[1:]):
      if first >= step:
        break
      total += (min(nxt, step) - first) * a * tokens_per_micro
    return total

  def steps_for_tokens(self, tokens: int) -> int:
    """The first step count whose steps together consume at least `tokens`."""
    per_full_step = self.max_accum * self.micro_batch * self.seq_len
    ramp_end = self.ramp[-1][0]
    before = self.tokens_before(ramp_end)
    if tokens >= before:
      return ramp_end + math.ceil((tokens - before) / per_full_step)
    lo, hi = 0, ramp_end
    while lo < hi:  # smallest s with tokens_before(s) >= tokens
      mid = (lo + hi) // 2
      lo, hi = (mid + 1, hi) if self.tokens_before(mid) < tokens else (lo, mid)
    return lo


def seq_len(cfg: ml_collections.ConfigDict) -> int:
  """Tokens per training sequence: `train.seq_len`, or the model context when it is 0."""
  return cfg.train.seq_len or cfg.model.ctx


def micro_batch(cfg: ml_collections.ConfigDict) -> int:
  """Sequences per forward/backward pass: `train.micro_batch`, or what 0 resolves to.

  0 means the global batch, except under a batch ramp (`optim.batch_ramp_tokens > 0`) whose start
  is smaller than the global batch: then it is the ramp's start in sequences
  (`optim.batch_ramp_start / seq_len`, at least 1), lowered to the nearest divisor of the global
  batch, so that the first steps take one micro-batch and the batch can grow from there (GPT-3:
  32k tokens = 16 sequences of 2048).
  """
  t, o = cfg.train, cfg.optim
  if t.micro_batch or o.batch_ramp_tokens <= 0:
    return t.micro_batch or t.global_batch
  start = max(1, round(o.batch_ramp_start / seq_len(cfg)))
  return max(d for d in range(1, min(start, t.global_batch) + 1) if t.global_batch % d == 0)


def plan(cfg: ml_collections.ConfigDict) -> RunPlan:
  """Resolves batch sizes, the GPT-3 ramp and the run length from the config.

  Raises:
    ConfigError: the ramp is on but the global batch is a single micro-batch, so it cannot grow.
  """
  t, o = cfg.train, cfg.optim
  seq_len = t.seq_len or cfg.model.ctx
  micro = micro_batch(cfg)
  max_accum = t.global_batch // micro
  ramp = [(0, max_accum)]
  if o.batch_ramp_tokens > 0 and max_accum == 1 and t.global_batch * seq_len > o.batch_ramp_start:
    raise ConfigError(
        f"config.optim.batch_ramp_tokens: the batch ramp grows the batch in whole micro-batches "
        f"from {o.batch_ramp_start} tokens, but train.micro_batch={t.micro_batch} is the whole "
        f"global batch, so every step would take all {t.global_batch} sequences. Set "
        f"train.micro_batch to a divisor of the global batch no larger than the ramp's start "
        f"({max(1, round(o.batch_ramp_start / seq_len))} sequences of {seq_len}; 0 chooses it), or "
        "optim.batch_ramp_tokens=0 to train at the full batch from the first step.")
  if o.batch_ramp_tokens > 0 and max_accum > 1:
    tokens_per_micro = micro * seq_len
    start = max(1, min(max_accum, round(o.batch_ramp_start / tokens_per_micro)))
    n = max(1, min(o.batch_ramp_buckets, max_accum - start + 1))
    sizes = sorted({round(start + (max_accum - start) * i / max(n - 1, 1)) for i in range(n)})
    # The batch grows linearly in tokens seen: size k is used from the point where the linear ramp
    # reaches k micro-batches; steps until then use the previous size.
    ramp, step, seen = [], 0, 0
    for k, nxt in zip(sizes, sizes[1:] + [None]):
      ramp.append((step, k))
      if nxt is None:
        break
      target = o.batch_ramp_tokens * (nxt - start) / max(max_accum - start, 1)
      n_steps = max(1, math.ceil((target - seen) / (k * tokens_per_micro)))
      step, seen = step + n_steps, seen + n_steps * k * tokens_per_micro
  provisional = RunPlan(seq_len, micro, max_accum, tuple(ramp), 0)
  total = provisional.steps_for_tokens(t.tokens) if t.tokens > 0 else t.steps
  return dataclasses.replace(provisional, total_steps=total)


def schedule(cfg: ml_collections.ConfigDict, run: RunPlan) -> optax.Schedule:
  """The learning rate as a function of the optimizer step."""
  return _schedule(cfg, run, cfg.optim.peak_lr)


def shape(cfg: ml_collections.ConfigDict, run: RunPlan) -> optax.Schedule:
  """The schedule's shape: the learning rate of a peak of 1 (`make` multiplies in the peak as a
  traced hyperparameter)."""
  return _schedule(cfg, run, 1.0)


def _schedule(cfg: ml_collections.ConfigDict, run: RunPlan, peak: float) -> optax.Schedule:
  o = cfg.optim
  warmup = run.steps_for_tokens(o.warmup_tokens) if o.warmup_tokens else o.warmup_steps
  decay_end = (run.steps_for_tokens(o.decay_tokens) if o.decay_tokens
               else o.decay_steps or run.total_steps)
  if warmup >= run.total_steps:
    raise ConfigError(
        f"config.optim.warmup_steps: warmup of {warmup} steps is not shorter than the run "
        f"({run.total_steps} steps). Shorten the warmup or lengthen train.steps/train.tokens.")
  if decay_end <= warmup:
    raise ConfigError(
        f"config.optim.decay_steps: the decay ends at step {decay_end}, before warmup ends "
        f"({warmup}). Set decay_steps/decay_tokens beyond the warmup (0 = end of run).")
  floor = peak * o.final_lr_fraction
  warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
  span = decay_end - warmup
  if o.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, span, alpha=o.final_lr_fraction)
  elif o.schedule == "linear":
    main = optax.linear_schedule(peak, floor, span)
  elif o.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif o.schedule == "rsqrt":
    w = max(warmup, 1)
    main = lambda s: peak * jax.numpy.sqrt(w / (s + w))
  else:  # 'wsd': warmup, hold the peak, then decay linearly over the last wsd_decay_fraction
    cool = max(1, round(span * o.wsd_decay_fraction))
    main = optax.join_schedules([optax.constant_schedule(peak),
                                 optax.linear_schedule(peak, floor, cool)], [span - cool])
  return optax.join_schedules([warm, main], [warmup])


def set_hyperparams(opt_state: Any, cfg: ml_collections.ConfigDict,
                    log: Callable[[str], None] | None = None) -> Any:
  """`opt_state` with `HYPERPARAMS` set from `cfg.optim`: a restored run trains with the config's
  values, not the checkpoint's; `log` hears one line per value that changes."""
  new = {}
  for name in HYPERPARAMS:
    old = optax.tree_utils.tree_get(opt_state, name)
    value = float(getattr(cfg.optim, name))
    if log is not None and not math.isclose(float(old), value, rel_tol=1e-6):
      log(f"optim.{name}: the checkpoint trained with {float(old):g}; from here on {value:g}, "
          "as the config says")
    new[name] = jax.device_put(jax.numpy.asarray(value, old.dtype), old.sharding)
  return optax.tree_utils.tree_set(opt_state, **new)


def decay_mask(params: Any, decay_embeddings: bool) -> Any:
  """True for the leaves AdamW decays: matmul kernels (and embeddings if asked), never biases/LN."""

  def decays(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    if names[-1] == "embedding":
      return decay_embeddings
    return names[-1] == "kernel" or names[0] == "lm_head"

  return jax.tree_util.tree_map_with_path(decays, params)


# The optimizer settings a sweep varies most, kept as traced values in the optimizer state
# (optax.inject_hyperparams): runs that differ only in them lower to the same program, so a
# learning-rate sweep compiles its step once (and loads it from the compilation cache after).
HYPERPARAMS = ("peak_lr", "weight_decay", "b1", "b2")


def _adamw(peak_lr, weight_decay, b1, b2, *, eps, shape_fn, mask):
  return optax.adamw(lambda step: peak_lr * shape_fn(step), b1=b1, b2=b2, eps=eps,
                     weight_decay=weight_decay, mask=mask)


def make(cfg: ml_collections.ConfigDict, run: RunPlan) -> tuple[
    optax.GradientTransformation, Callable[[jax.Array, Any], jax.Array]]:
  """Returns (AdamW with clipping and decay mask, `lr(step, opt_state)`: the learning rate).

  `HYPERPARAMS` are traced values in the optimizer state, set from the config (a checkpoint never
  overrides them: `gptjax.optstate`); the schedule's shape (warmup, decay, floor) stays static.
  """
  o = cfg.optim
  shape_fn = shape(cfg, run)
  adamw = optax.inject_hyperparams(_adamw, static_args=("eps", "shape_fn", "mask"))(
      peak_lr=o.peak_lr, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
      shape_fn=shape_fn, mask=lambda p: decay_mask(p, o.decay_embeddings))
  width_mult = ModelArgs.from_config(cfg.model).width_mult  # µP's m (1 under SP)
  if width_mult != 1.0:  # µP: per-parameter learning rates / m
    adamw = optax.chain(adamw, mup.scale(width_mult))
  tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw

  def lr(step, opt_state):
    return optax.tree_utils.tree_get(opt_state, "peak_lr") * shape_fn(step)
  if cfg.train.nonfinite == "skip":  # drop updates whose gradients hold NaN/inf
    tx = optax.apply_if_finite(tx, max_consecutive_errors=cfg.train.max_skips)
  if cfg.compress.prune.method != "none":  # last: pruned weights land on, and stay at, zero
    tx = optax.chain(tx, prune.transform(cfg.compress.prune, run.total_steps))
  return tx, lr
