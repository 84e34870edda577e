"""Every preset builds without allocating and has the published architecture and size."""

import dataclasses

import jax
import pytest

import configs
from configs import accelerators, sizes
from gptjax import accounting, config as config_lib, loss, optim
from gptjax.model import ModelArgs

PUBLISHED = [k.replace("-", ":", 1) if "-" in k else k for k in sizes.SIZES]


def closed_form(layers, d, vocab, ctx, pre_ln):
  """Per block 12 d^2 + 13 d (qkv, out, fc, proj, biases, two LNs); embeddings; final LN."""
  return layers * (12 * d * d + 13 * d) + (vocab + ctx) * d + (2 * d if pre_ln else 0)


@pytest.mark.parametrize("spec", PUBLISHED)
def test_published_presets_have_exact_and_published_sizes(spec):
  cfg = configs.load(spec)
  config_lib.validate_model(cfg.model)
  cfg.model.pad_vocab_to = 1  # the published, unpadded vocabulary
  row = sizes.SIZES[spec.replace(":", "-")]
  args = ModelArgs.from_config(cfg.model)
  assert args.n_heads * args.d_head == args.d_model == row.d_model
  n = accounting.param_counts(args).total  # from jax.eval_shape: nothing is allocated
  assert n == closed_form(row.layers, row.d_model, row.vocab, row.ctx, row.norm == "pre")
  assert abs(n - row.nominal) / row.nominal <= 0.02, f"{spec}: {n:,} vs published {row.nominal:,}"


def test_gpt2_counts_are_the_known_exact_ones():
  exact = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080, "xl": 1_557_611_200}
  for name, n in exact.items():
    cfg = configs.load(f"gpt2:{name}")
    cfg.model.pad_vocab_to = 1
    assert accounting.param_counts(ModelArgs.from_config(cfg.model)).total == n


def test_architecture_choices_follow_the_papers():
  gpt1, gpt2, gpt3 = configs.load("gpt1"), configs.load("gpt2:small"), configs.load("gpt3:175b")
  assert (gpt1.model.norm, gpt1.model.ctx, gpt1.model.vocab_size) == ("post", 512, 40478)
  assert (gpt2.model.norm, gpt2.model.ctx, gpt2.model.attention) == ("pre", 1024, "dense")
  assert (gpt3.model.ctx, gpt3.model.attention) == (2048, "alternating")
  assert ((gpt3.optim.b1, gpt3.optim.b2, gpt3.optim.eps, gpt3.optim.clip_norm)
          == (0.9, 0.95, 1e-8, 1.0))
  assert gpt3.optim.warmup_tokens == 375_000_000 and gpt3.optim.decay_tokens == 260_000_000_000


def test_padded_vocab_is_reported_and_counted():
  cfg = configs.load("gpt2:small")
  assert cfg.model.pad_vocab_to == 128
  args = ModelArgs.from_config(cfg.model)
  assert args.padded_vocab == 50304
  counts = accounting.param_counts(args)
  assert counts.total == 124_439_808 + (50304 - 50257) * 768


def test_flops_per_token_matches_the_palm_formula():
  """The fixed CPU benchmark model: 6 x 384, 6 heads, T 256, vocab 50304: ~187 MFLOP/token."""
  args = ModelArgs(vocab_size=50304, ctx=256, n_layers=6, d_model=384, n_heads=6, d_head=64,
                   d_ff=1536)
  n_matmul = 6 * 12 * 384**2 + 50304 * 384  # block weights + the (tied) output projection
  assert accounting.param_counts(args).matmul == n_matmul
  flops = accounting.flops_per_token(args)
  assert flops == 6 * n_matmul + 12 * 6 * 6 * 64 * 256
  assert 186e6 < flops < 188e6


def test_mfu_and_memory_estimates():
  kind = lambda k: type("Device", (), {"device_kind": k})()
  assert accounting.peak_flops_of(kind("NVIDIA H100 80GB HBM3")) == 989e12
  assert accounting.peak_flops_of(kind("TPU v5p")) == 459e12
  assert accounting.peak_flops_of(kind("cpu")) is None
  assert accounting.mfu(1000.0, 1e9, 1e12) == pytest.approx(1.0)
  assert accounting.mfu(1000.0, 1e9, 1e12, n_devices=4) == pytest.approx(0.25)
  args = ModelArgs.from_config(configs.load("gpt3:xl").model)
  n = accounting.param_counts(args).total
  one = accounting.memory_per_device(args, 2048, 1)
  assert one.params + one.grads + one.optimizer == pytest.approx(16 * n)  # AdamW fp32: 16 B/param
  fsdp8 = accounting.memory_per_device(args, 2048, 1, fsdp=8)
  assert fsdp8.optimizer == pytest.approx(one.optimizer / 8)
  full = accounting.memory_per_device(dataclasses.replace(args, remat="full"), 2048, 1)
  assert full.activations < one.activations / 3


def test_tiny_preset_is_small_and_valid():
  cfg = configs.load("tiny")
  config_lib.validate(cfg, n_devices=1)
  n = accounting.param_counts(ModelArgs.from_config(cfg.model)).total
  assert 1e6 < n < 10e6


@pytest.mark.parametrize("spec", configs.all_presets())
def test_every_preset_builds_abstractly_with_a_valid_schedule(spec):
  cfg = configs.load(spec)
  lr = optim.schedule(cfg, optim.plan(cfg))  # a preset whose schedule cannot run is a bug
  assert float(lr(optim.plan(cfg).total_steps // 2)) > 0
  shapes = accounting.abstract_params(ModelArgs.from_config(cfg.model))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))


def test_unknown_preset_names_are_clear_errors():
  with pytest.raises(ValueError, match=r"Unknown gpt3 preset 'huge'.*2\.7b"):
    configs.load("gpt3:huge")
  with pytest.raises(ValueError, match="Unknown config file"):
    configs.load("gpt4:small")


# ---- accelerator overlays (configs/accelerators.py) ------------------------------------------


def test_backend_suffixes_parse_and_unknown_ones_are_clear_errors():
  assert accelerators.split("xl,gpu") == ("xl", "gpu")
  assert accelerators.split("gpu") == ("", "gpu") and accelerators.split("xl") == ("xl", None)
  assert accelerators.split("") == ("", None)
  for bad in ("xl,cuda", "xl,gpu,tpu"):
    with pytest.raises(ValueError, match="size,backend"):
      configs.load(f"gpt3:{bad}")
  plain, fast = configs.load("gpt3:xl"), configs.load("gpt3:xl,gpu")
  assert (plain.name, fast.name) == ("gpt3-xl", "gpt3-xl-gpu")
  assert (plain.model.dtype, plain.model.attn_dropout) == ("float32", 0.1)  # no suffix: unchanged
  assert plain.train.loss_chunk_rows == loss.CHUNK_ROWS == accelerators.BASE_LOSS_CHUNK_ROWS
  assert configs.load("gpt1:tpu").name == "gpt1-tpu"
  assert len(configs.accelerator_presets()) == 2 * len(sizes.SIZES)


@pytest.mark.parametrize("spec", configs.accelerator_presets())
def test_every_accelerator_preset_validates_for_8_devices(spec):
  cfg = configs.load(spec)
  backend = cfg.name.rsplit("-", 1)[1]
  config_lib.validate(cfg, n_devices=8)
  m = cfg.model
  assert (m.dtype, m.attn_dropout, m.attention_impl) == ("bfloat16", 0.0, "auto")
  assert m.embd_dropout == m.resid_dropout == 0.1  # only attention dropout goes
  assert m.scan_layers is accelerators.SCAN_LAYERS[backend]
  assert cfg.train.loss_chunk_rows == accelerators.LOSS_CHUNK_ROWS[backend]
  assert (cfg.mesh.data, cfg.mesh.fsdp) == (1, -1)
  run = optim.plan(cfg)  # the batch ramp, if any, can run: at most one size per micro-batch
  assert float(optim.schedule(cfg, run)(run.total_steps // 2)) > 0
  if cfg.optim.batch_ramp_tokens:
    assert cfg.optim.batch_ramp_buckets <= cfg.train.global_batch // cfg.train.micro_batch
  # The paper's model, data and optimisation stay (the ramp's bucket count aside).
  paper = configs.load(spec.rsplit(",", 1)[0] if "," in spec else spec.split(":")[0])
  for section in ("data", "eval", "checkpoint", "finetune", "compress"):
    assert cfg[section].to_dict() == paper[section].to_dict(), section
  ours, theirs = cfg.optim.to_dict(), paper.optim.to_dict()
  ours.pop("batch_ramp_buckets"), theirs.pop("batch_ramp_buckets")
  assert ours == theirs
  speed = {"dtype", "attn_dropout", "attention_impl", "scan_layers", "remat"}
  assert ({k: v for k, v in m.to_dict().items() if k not in speed}
          == {k: v for k, v in paper.model.to_dict().items() if k not in speed})
  assert cfg.train.global_batch == paper.train.global_batch


def test_the_fit_table_is_what_the_planner_picks():
  """Each FIT entry is plan.suggest's first layout for 8 devices of the backend's memory (the
  loss chunk's extra logits counted); presets without one fit no layout of 8 such devices."""
  for spec in configs.accelerator_presets():
    cfg = configs.load(spec)
    preset, backend = cfg.name.rsplit("-", 1)
    with cfg.unlocked():
      assert accelerators.derive_fit(cfg, backend) == accelerators.FIT.get((preset, backend)), spec
  assert set(accelerators.FIT) <= {(k, b) for k in sizes.SIZES for b in accelerators.BACKENDS}
