"""µP (model.parametrization='mup') against Tensor Programs V: the coordinate check, the learning
rate and init of every parameter at two widths, the multipliers, and the errors."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs
from gptjax import coord_check, heads, hf, optim, peft, sharding, train
from gptjax.config import ConfigError, validate
from gptjax.model import GPT, ModelArgs
from test_train import adamw_reference, batches, train_losses

BASE = 32


def mup_cfg(width=BASE, parametrization="mup", **model):
  c = configs.load("tiny")
  c.model.update(n_layers=2, d_model=width, n_heads=4, vocab_size=250, pad_vocab_to=128, ctx=32,
                 parametrization=parametrization,
                 mup_base_width=BASE if parametrization == "mup" else 0, **model)
  c.train.update(global_batch=16, steps=20)
  c.optim.update(warmup_steps=2, peak_lr=3e-3)
  return c


def test_coordinate_check_is_flat_across_widths_under_mup_and_grows_under_sp():
  """After three Adam steps at one learning rate, every block's output and the logits have about
  the same size at widths 32 and 128 under µP; under SP they grow with the width (measured, 128
  over 32 wide: µP 0.62-0.82x, SP 2.2x for the logits and 6.2-8.6x for the blocks)."""
  widths = (32, 128)
  spread = {}
  for kind in ("sp", "mup"):
    c = mup_cfg(parametrization=kind)
    c.optim.peak_lr = 1e-2
    data = coord_check.run(c, widths, steps=3, batch=4, seq_len=32)
    for layer in ("block_0", "block_1", "block_0/mlp", "logits"):
      last = [data[w][layer][-1] for w in widths]
      spread[kind, layer] = last[-1] / last[0]
  for layer in ("block_0", "block_1", "block_0/mlp", "logits"):
    assert 1 / 2 < spread["mup", layer] < 2, (layer, spread)
    assert spread["sp", layer] > 2.5 * spread["mup", layer], (layer, spread)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


# Tensor Programs V, Table 8 (Table 3 for the width -> fixed matrices other than the readout),
# as multipliers of the Adam learning rate at width multiplier m, written out per parameter.
def table_lr(path: str, m: float) -> float:
  hidden = re.search(r"(attn/(qkv|out)|mlp/(fc|proj))/kernel$", path)
  readout_like = re.search(r"(lora_a|adapter_\w+/down/kernel|head/\w+/kernel)$", path)
  return 1.0 / m if hidden or readout_like else 1.0


def _peft_tree(args: ModelArgs, seed=0):
  """A fine-tuning run's trainable tree: the base with adapters, LoRA on every kernel, a head."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  full = GPT(args).init(jax.random.key(seed), tokens)["params"]
  lora = peft.lora_init(jax.random.key(seed + 1), full, peft.Lora(4, 8.0, ".*"), args.width_mult)
  head = heads.Head(64, 0.0, args.readout_std(args.init_std), args.dtype)  # 64 outputs
  h = head.init(jax.random.key(seed + 2), jnp.zeros((1, args.d_model)))["params"]
  return nn.meta.unbox({"base": full, "lora": lora, "head": h})


@pytest.mark.parametrize("width", [BASE, 2 * BASE], ids=["m1", "m2"])
def test_each_parameters_adam_learning_rate_follows_the_table(width):
  """Two AdamW steps of `optim.make` on a model with adapters, LoRA and a classifier head, against
  numpy AdamW run with the table's learning rate for each parameter (weight decay included: AdamW
  scales it with the learning rate)."""
  m = width / BASE
  c = mup_cfg(width)
  c.optim.update(clip_norm=0.0, weight_decay=0.1, schedule="constant", warmup_steps=0,
                 peak_lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, decay_embeddings=False)
  tx, _ = optim.make(c, optim.plan(c))
  args = ModelArgs.from_config(c.model)
  params = _peft_tree(dataclasses.replace(args, adapter_dim=8))
  leaves = {_path(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
  rng = np.random.default_rng(0)
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in leaves.items()}
           for _ in range(2)]
  treedef = jax.tree.structure(params)
  as_tree = lambda d: jax.tree.unflatten(treedef, [jnp.asarray(d[k]) for k in leaves])
  p, state = params, tx.init(params)
  for g in grads:
    updates, state = jax.jit(tx.update)(as_tree(g), state, p)
    p = optax.apply_updates(p, updates)
  got = {_path(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(p)}
  decays = optim.decay_mask(params, False)
  decays = {_path(k): bool(v) for k, v in jax.tree_util.tree_leaves_with_path(decays)}
  scaled = 0
  for k in leaves:
    lr = 1e-2 * table_lr(k, m)
    scaled += lr != 1e-2
    want = adamw_reference({k: leaves[k]}, [{k: g[k]} for g in grads], 0.0, lr, 0.9, 0.95, 1e-8,
                           0.1, {k: decays[k]})[k]
    np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
  # The hidden kernels, LoRA A, adapter down and the head: scaled only when m > 1.
  assert (scaled > 0) == (m > 1)


def test_init_scales_follow_the_table():
  """Empirical init stds at m = 1 and m = 4: hidden kernels / sqrt(m), the head, adapter down and
  LoRA A / m (relative to SP at their own width for LoRA: 1/sqrt(fan_in m)), embeddings and the
  untied output unchanged."""
  stds = {}
  for width in (32, 128):
    args = dataclasses.replace(ModelArgs.from_config(mup_cfg(width, tie_embeddings=False).model),
                               adapter_dim=16)
    leaves = jax.tree_util.tree_leaves_with_path(_peft_tree(args))
    stds[width] = {_path(k): float(np.std(v)) for k, v in leaves if np.std(v) > 0}
  ratio = {k: stds[128][k] / stds[32][k] for k in stds[32] if k in stds[128]}
  for k, r in ratio.items():
    if re.search(r"(attn/(qkv|out)|mlp/(fc|proj))/kernel$", k):
      want = 0.5  # 1/sqrt(4)
    elif re.search(r"(adapter_\w+/down/kernel|head/\w+/kernel)$", k):
      want = 0.25  # 1/4
    elif k.endswith("lora_a"):  # N(0, 1/(fan_in m)): fan_in x4 and m x4
      want = 0.25
    elif re.search(r"(wte|wpe)/embedding$|lm_head$", k):
      want = 1.0
    else:
      continue  # LayerNorm scales are ones
    assert abs(r / want - 1) < 0.08, (k, r, want)
  assert any("lora_a" in k for k in ratio) and any("lm_head" in k for k in ratio)


@pytest.mark.slow  # ~10 s; the slow CI step runs it
def test_mup_at_its_base_width_is_the_standard_model():
  """m = 1: the same parameters, logits and optimizer updates as SP, bit for bit."""
  sp, mup = (mup_cfg(BASE, kind) for kind in ("sp", "mup"))
  data = batches(2, micro=16, length=32)
  out = []
  for c in (sp, mup):
    trainer = train.Trainer.build(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    state = trainer.init_state()
    for b in data:
      state, _ = trainer.step(state, jax.device_put(b, trainer.batch_sharding()))
    out.append(state.params)
  jax.tree.map(np.testing.assert_array_equal, out[0], out[1])


@pytest.mark.slow  # ~10 s; the slow CI step runs it
def test_a_mup_run_trains_the_same_in_every_layout():
  """µP's labels and multipliers under FSDP and tensor parallelism: the losses of one device."""
  data = batches(1) * 4
  c = mup_cfg(2 * BASE)
  ref, _ = train_losses(c, data, jax.devices()[:1])
  c.mesh.update(data=1, fsdp=2, tensor=4)
  losses, _ = train_losses(c, data, jax.devices())
  np.testing.assert_allclose(losses, ref, rtol=1e-5)
  assert ref[-1] < ref[0]


@pytest.mark.parametrize("edit, message", [
    (dict(mup_base_width=24), "model.mup_base_width: must divide model.d_model=64"),
    (dict(mup_base_width=0), "model.mup_base_width: must divide"),
    (dict(parametrization="ntk"), "model.parametrization: unknown 'ntk'"),
    (dict(d_model=96, n_heads=4, mup_base_width=32, d_head=0, mup_base_d_head=0),
     None),  # 96 / 4 = 24-wide heads, base 8 wide: fine
    (dict(n_heads=64), "model.mup_base_d_head"),  # base heads 32 / 64 wide
], ids=["not_dividing", "missing", "unknown", "fine", "fractional_head"])
def test_bad_mup_settings_fail_before_compiling(edit, message):
  c = mup_cfg(64)
  c.model.update(**edit)
  if message is None:
    validate(c)
    return
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(c)


def test_sp_with_a_base_width_is_refused():
  c = mup_cfg(64, "sp")
  c.model.mup_base_width = 32
  with pytest.raises(ConfigError, match="model.mup_base_width: 32 .*parametrization is 'sp'"):
    validate(c)


def test_hf_export_refuses_a_widened_mup_model_and_takes_its_base():
  with pytest.raises(ValueError, match="parametrization='mup' at width multiplier 2"):
    hf._check_representable(ModelArgs.from_config(mup_cfg(2 * BASE).model))
  hf._check_representable(ModelArgs.from_config(mup_cfg(BASE).model))


@pytest.mark.slow  # ~10 s; the slow CI step runs it
def test_decoding_with_the_kv_cache_keeps_the_mup_scales():
  """The cached attention path scales its queries too: greedy decoding with the cache equals
  recomputing the whole forward pass at every step, on a µP model at m = 4 with spread-out
  (perturbed) weights, so that the scales decide the argmax."""
  from gptjax import generate
  args = ModelArgs.from_config(mup_cfg(4 * BASE).model)
  model = GPT(args)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])
  prompts = [[5, 9, 200, 3], [17, 4]]
  cached = generate.generate(model, params, prompts, 6, temperature=0)
  full = generate.generate(model, params, prompts, 6, temperature=0, use_cache=False)
  assert cached == full
  sp = GPT(dataclasses.replace(args, parametrization="sp", mup_base_width=0))
  assert generate.generate(sp, params, prompts, 6, temperature=0) != cached  # the scales matter
