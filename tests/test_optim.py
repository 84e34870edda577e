"""Spec of the run plan's batch ramp (gptjax.optim.plan) against GPT-3's published ramp.

Brown et al. 2020, section 2.3 / appendix B: the batch grows linearly in tokens from 32k tokens to
the full batch over the first 4-12B tokens (configs/gpt3.py: 4B up to XL, 8B for 2.7B/6.7B, 12B
for 13B/175B), and every model trains on 300B tokens.
"""

import math

import pytest

import configs
from gptjax import optim
from gptjax.config import ConfigError

GPT3 = ["small", "medium", "large", "xl", "2.7b", "6.7b", "13b", "175b"]
START = 32768  # GPT-3's first batch, tokens
TOTAL = 300_000_000_000  # GPT-3's training tokens
RAMP = {"small": 4e9, "medium": 4e9, "large": 4e9, "xl": 4e9, "2.7b": 8e9, "6.7b": 8e9,
        "13b": 12e9, "175b": 12e9}
FULL = {"small": 0.5, "medium": 0.5, "large": 0.5, "xl": 1, "2.7b": 1, "6.7b": 2, "13b": 2,
        "175b": 3}  # the full batch in 2^20 tokens (published as 0.5M to 3.2M; 175B: 1536 x 2048)


def linear_ramp(tokens_seen: float, full: int, ramp: float) -> float:
  """GPT-3's batch in tokens after `tokens_seen` tokens: linear from START to `full`."""
  return START + (full - START) * min(tokens_seen / ramp, 1.0)


def steps_of(plan: optim.RunPlan):
  """(tokens before the step, tokens in the step) for every step of the ramp, from the plan's
  (first_step, accum) table alone."""
  seen, per_micro = 0, plan.micro_batch * plan.seq_len
  bounds = list(plan.ramp) + [(plan.ramp[-1][0] + 1, 0)]  # one step at the full batch
  for (first, accum), (nxt, _) in zip(bounds, bounds[1:]):
    for _ in range(first, nxt):
      yield seen, accum * per_micro
      seen += accum * per_micro


@pytest.mark.parametrize("name", GPT3)
def test_gpt3_presets_ramp_from_32k_tokens_to_the_full_batch(name):
  cfg = configs.load(f"gpt3:{name}")
  plan = optim.plan(cfg)
  full = cfg.train.global_batch * plan.seq_len
  assert plan.seq_len == 2048 and full == int(FULL[name] * 2**20)
  assert plan.ramp[0] == (0, 1) and plan.micro_batch * plan.seq_len == START  # the first batch
  assert plan.ramp[-1][1] * plan.micro_batch == cfg.train.global_batch  # the last: the full one
  assert len(plan.ramp) == full // START  # every 32k size on the way, in order
  assert [a for _, a in plan.ramp] == list(range(1, full // START + 1))
  # Each step takes GPT-3's linear ramp at the tokens seen so far, rounded down to whole 32k
  # micro-batches; the full batch starts once the ramp's tokens are seen.
  for seen, tokens in steps_of(plan):
    want = linear_ramp(seen, full, RAMP[name])
    assert want - START < tokens <= want + 1e-6 * want, (seen, tokens, want)
  end = plan.tokens_before(plan.ramp[-1][0])
  assert RAMP[name] <= end < RAMP[name] + full


@pytest.mark.parametrize("name", GPT3)
def test_gpt3_run_lengths_follow_the_ramp(name):
  """The steps for 300B tokens, against two independent counts: the continuous linear ramp (a lower
  bound: the batch never exceeds it) and the same staircase summed in closed form."""
  cfg = configs.load(f"gpt3:{name}")
  plan = optim.plan(cfg)
  full, ramp = cfg.train.global_batch * 2048, RAMP[name]
  no_ramp = math.ceil(TOTAL / full)  # what the presets ran before: small 572,205 steps
  # d(tokens)/d(step) = batch(tokens) = START + slope * tokens, so steps = ln(full / START) / slope.
  slope = (full - START) / ramp
  continuous = math.log(full / START) / slope + (TOTAL - ramp) / full
  # Size k (k micro-batches of 32k) covers ramp / (K - 1) tokens of the ramp, for k = 1 .. K - 1.
  sizes = full // START
  staircase = sum(ramp / (sizes - 1) / (k * START) for k in range(1, sizes)) + (TOTAL - ramp) / full
  assert plan.total_steps > no_ramp
  assert continuous < plan.total_steps < 1.025 * continuous  # 0.8% (small) to 2.0% (175b) more
  assert abs(plan.total_steps - staircase) <= sizes  # one step of rounding per size
  assert plan.tokens_before(plan.total_steps) >= TOTAL > plan.tokens_before(plan.total_steps - 1)
  if name == "small":
    assert (no_ramp, round(continuous), plan.total_steps) == (572_205, 587_139, 591_581)


def test_micro_batch_0_resolves_to_the_ramps_start():
  cfg = configs.load("gpt3:small")
  preset = optim.plan(cfg)
  cfg.train.micro_batch = 0  # resolved by the plan: 32k tokens / 2048 = 16 sequences
  assert optim.micro_batch(cfg) == 16 and optim.plan(cfg) == preset
  cfg.train.global_batch = 24  # 16 does not divide 24: the largest divisor below it
  assert optim.micro_batch(cfg) == 12 and optim.plan(cfg).ramp[0] == (0, 1)
  cfg.train.global_batch = 8  # already below the ramp's start: nothing to ramp, no accumulation
  assert optim.micro_batch(cfg) == 8 and optim.plan(cfg).ramp == ((0, 1),)
  cfg.train.global_batch, cfg.optim.batch_ramp_tokens = 256, 0  # no ramp: 0 = the global batch
  assert optim.micro_batch(cfg) == 256 and optim.plan(cfg).ramp == ((0, 1),)


def test_a_ramp_that_cannot_grow_is_an_error():
  cfg = configs.load("gpt3:small")
  cfg.train.micro_batch = cfg.train.global_batch  # one micro-batch per step: no size to grow from
  with pytest.raises(ConfigError, match=r"optim\.batch_ramp_tokens.*train\.micro_batch=256 is the "
                                        r"whole global batch.*no larger than the ramp's start "
                                        r"\(16 sequences.*batch_ramp_tokens=0"):
    optim.plan(cfg)
  cfg.optim.batch_ramp_tokens = 0  # the fix the message names
  assert optim.plan(cfg).total_steps == 572_205
  cfg.train.micro_batch = 128  # a coarser ramp is allowed: it starts at one micro-batch (256k)
  assert optim.plan(cfg).ramp == ((0, 2),)
  cfg.optim.batch_ramp_tokens = int(4e9)
  assert optim.plan(cfg).ramp[0] == (0, 1) and optim.plan(cfg).ramp[-1][1] == 2
