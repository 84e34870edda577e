"""The sharded train step: equal losses in every mesh layout, exact accumulation, the optimizer."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs
from gptjax import loss as loss_lib, optim, sharding, train
from gptjax.config import ConfigError


def small_cfg(data=1, fsdp=1, tensor=1, **train_overrides):
  c = configs.load("tiny")
  c.model.update(n_layers=2, d_model=64, n_heads=4, vocab_size=250, pad_vocab_to=128, ctx=32)
  c.train.update({"global_batch": 16, "steps": 20, **train_overrides})
  c.optim.update(warmup_steps=2, peak_lr=3e-3)
  c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return c


def batches(n, accum=1, micro=16, length=32, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, 250, (n, accum, micro, length + 1)).astype(np.int32)
  return [{"inputs": t[..., :-1], "targets": t[..., 1:]} for t in toks]


def train_losses(cfg, data, devices):
  trainer = train.Trainer.build(cfg, sharding.make_mesh(cfg.mesh, devices))
  state = trainer.init_state()
  losses = []
  for b in data:
    state, m = trainer.step(state, jax.device_put(b, trainer.batch_sharding()))
    losses.append(float(m["loss"]))
  return np.array(losses), state


LAYOUTS = {"single": (1, 1, 1), "dp8": (8, 1, 1), "fsdp8": (1, 8, 1), "tp4_dp2": (2, 1, 4),
           "fsdp2_tp4": (1, 2, 4)}


def test_every_layout_gives_the_same_losses_and_shards_as_the_rules_say():
  assert jax.device_count() == 8
  data = batches(1) * 5  # one batch, five times: the loss must fall
  ref, _ = train_losses(small_cfg(), data, jax.devices()[:1])
  assert ref[-1] < ref[0] - 0.1
  for name, (d, f, t) in LAYOUTS.items():
    if name == "single":
      continue
    losses, state = train_losses(small_cfg(d, f, t), data, jax.devices())
    np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=name)
    blk = state.params["layers"]["block_0"]
    fc, qkv = blk["mlp"]["fc"]["kernel"], blk["attn"]["qkv"]["kernel"]
    # Rules: embed -> fsdp, heads/mlp/vocab -> tensor; the stacked `layers` axis stays whole.
    assert fc.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), name
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None), name
    wte = state.params["wte"]["embedding"]
    expect = (wte.shape[0] // t, wte.shape[1] // f)
    assert wte.addressable_shards[0].data.shape == expect, name
    # Adam moments are sharded like their parameters (ZeRO-3 under FSDP).
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")["layers"]["block_0"]["mlp"]["fc"][
        "kernel"]
    assert mu.sharding.spec == fc.sharding.spec, name


def test_gradient_accumulation_equals_one_big_batch():
  big = batches(3, accum=1, micro=16)
  split = [{k: v.reshape(4, 4, -1) for k, v in b.items()} for b in big]
  ref, s_ref = train_losses(small_cfg(), big, jax.devices()[:1])
  acc, s_acc = train_losses(small_cfg(micro_batch=4), split, jax.devices()[:1])
  np.testing.assert_allclose(acc, ref, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s_ref.params,
               s_acc.params)


def test_vocab_parallel_cross_entropy_equals_plain_and_never_gathers_logits():
  mesh = sharding.make_mesh(small_cfg(2, 1, 4).mesh, jax.devices())
  logits = jax.random.normal(jax.random.key(0), (8, 16, 512)) * 4
  targets = jax.random.randint(jax.random.key(1), (8, 16), 0, 512)
  weights = (jax.random.uniform(jax.random.key(2), (8, 16)) > 0.2).astype(jnp.float32)
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None,
                                                                      "tensor"))
  logits = jax.device_put(logits, shard)

  def plain(lg):
    return loss_lib.cross_entropy_sum(lg, targets, weights, 1e-3)[0]

  def parallel(lg):
    return loss_lib.vocab_parallel_cross_entropy_sum(lg, targets, weights, 1e-3, mesh,
                                                     ("data", "fsdp"))[0]

  with jax.set_mesh(mesh):
    v0, g0 = jax.jit(jax.value_and_grad(plain))(logits)
    v1, g1 = jax.jit(jax.value_and_grad(parallel))(logits)
    hlo = jax.jit(jax.value_and_grad(parallel)).lower(logits).compile().as_text()
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  np.testing.assert_allclose(g1, g0, atol=1e-6)
  assert g1.sharding.spec == shard.spec
  # Only [B, L] statistics cross devices: no all-gather of a [.., .., V] array.
  gathers = [l for l in hlo.splitlines() if "all-gather" in l and "512]" in l]
  assert not gathers, gathers


def test_decay_mask_excludes_exactly_biases_layernorms_and_embeddings():
  trainer = train.Trainer.build(small_cfg(),
                                sharding.make_mesh(small_cfg().mesh, jax.devices()[:1]))
  params = trainer.init_state().params
  flat = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params, decay_embeddings=False))[0]
  decayed = {"/".join(getattr(k, "key", "") for k in p) for p, v in flat if v}
  assert decayed == {"layers/block_0/attn/qkv/kernel", "layers/block_0/attn/out/kernel",
                     "layers/block_0/mlp/fc/kernel", "layers/block_0/mlp/proj/kernel"}
  flat = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params, decay_embeddings=True))[0]
  assert sum(v for _, v in flat) == 6  # + wte, wpe


def test_schedule_hits_its_landmarks():
  c = small_cfg()
  c.train.steps = 100
  c.optim.update(warmup_steps=10, peak_lr=1e-3, final_lr_fraction=0.1, schedule="cosine")
  lr = optim.schedule(c, optim.plan(c))
  assert float(lr(0)) == 0.0
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(100)) == pytest.approx(1e-4)
  assert float(lr(55)) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-5)  # halfway down the cosine
  for name in ("linear", "constant", "rsqrt", "wsd"):
    c.optim.schedule = name
    lr = optim.schedule(c, optim.plan(c))
    assert float(lr(10)) == pytest.approx(1e-3), name
  c.optim.schedule = "wsd"
  lr = optim.schedule(c, optim.plan(c))
  assert float(lr(70)) == pytest.approx(1e-3) and float(lr(100)) == pytest.approx(1e-4)


def test_warmup_and_decay_in_tokens_follow_the_batch_ramp():
  c = small_cfg(micro_batch=2, steps=0, tokens=2_000_000)
  c.train.global_batch = 16  # 8 micro-batches of 2 x 32 tokens at full size
  c.optim.update(batch_ramp_tokens=50_000, batch_ramp_start=64, batch_ramp_buckets=4,
                 warmup_tokens=20_000, warmup_steps=0)
  plan = optim.plan(c)
  sizes = [a for _, a in plan.ramp]
  assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == 8 and len(sizes) == 4
  assert (plan.tokens_before(plan.total_steps) >= 2_000_000
          > plan.tokens_before(plan.total_steps - 1))
  warm = plan.steps_for_tokens(20_000)
  assert plan.tokens_before(warm) >= 20_000 > plan.tokens_before(warm - 1)


def adamw_reference(params, grads, clip_norm, lr, b1, b2, eps, weight_decay, decays):
  """Params after len(grads) steps of clip-by-global-norm + AdamW, in float64 numpy (Loshchilov &
  Hutter: the decay is added to the Adam direction and scaled by the learning rate, not by Adam)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mu, nu = {k: 0.0 for k in p}, {k: 0.0 for k in p}
  for t, g in enumerate(grads, start=1):
    g = {k: np.asarray(v, np.float64) for k, v in g.items()}
    norm = np.sqrt(sum((v**2).sum() for v in g.values()))
    scale = min(1.0, clip_norm / norm) if clip_norm else 1.0
    for k in p:
      mu[k] = b1 * mu[k] + (1 - b1) * scale * g[k]
      nu[k] = b2 * nu[k] + (1 - b2) * (scale * g[k])**2
      adam = (mu[k] / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps)
      p[k] = p[k] - lr * (adam + (weight_decay * p[k] if decays[k] else 0.0))
  return p


@pytest.mark.parametrize("clip_norm", [0.5, 0.0], ids=["clipped", "clip_off"])
def test_optimizer_clips_the_global_norm_then_applies_adamw(clip_norm):
  """`optim.make`'s transformation against numpy: two steps whose gradient norms (6 and 4) are
  above the clip. Clipping scales each step differently, so Adam's moments show it (one step of
  Adam alone is invariant to the scale)."""
  c = small_cfg()
  c.optim.update(clip_norm=clip_norm, weight_decay=0.1, schedule="constant", warmup_steps=0,
                 peak_lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, decay_embeddings=False)
  tx, _ = optim.make(c, optim.plan(c))
  rng = np.random.default_rng(0)
  shapes = {"kernel": (4, 3), "bias": (3,), "embedding": (5, 2)}  # decayed: only the kernel
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = []
  for norm in (6.0, 4.0):
    g = {k: rng.normal(size=s) for k, s in shapes.items()}
    total = np.sqrt(sum((v**2).sum() for v in g.values()))
    grads.append({k: (v * norm / total).astype(np.float32) for k, v in g.items()})
  tree = lambda d: {"mlp": {"fc": {"kernel": d["kernel"], "bias": d["bias"]}},
                    "wte": {"embedding": d["embedding"]}}
  flat = lambda t: {"kernel": t["mlp"]["fc"]["kernel"], "bias": t["mlp"]["fc"]["bias"],
                    "embedding": t["wte"]["embedding"]}
  p = jax.tree.map(jnp.asarray, tree(params))
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, tree(g)), state, p)
    p = optax.apply_updates(p, updates)
  decays = {"kernel": True, "bias": False, "embedding": False}
  want = adamw_reference(params, grads, clip_norm, 1e-2, 0.9, 0.95, 1e-8, 0.1, decays)
  for k, v in flat(p).items():
    # float32 vs float64: measured 1.2e-7 on params of order 1; clipping on vs off moves them 2e-3.
    np.testing.assert_allclose(v, want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # The other setting gives other params: the comparison sees whether clipping happened.
  other = adamw_reference(params, grads, 0.5 - clip_norm, 1e-2, 0.9, 0.95, 1e-8, 0.1, decays)
  assert max(np.abs(flat(p)[k] - other[k]).max() for k in other) > 1e-4


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.optim.update(warmup_steps=50), r"optim\.warmup_steps: warmup of 50 steps"),
    (lambda c: c.optim.update(decay_steps=1, warmup_steps=2), r"optim\.decay_steps"),
])
def test_bad_schedules_fail_before_compiling(edit, message):
  c = small_cfg()
  edit(c)
  with pytest.raises(ConfigError, match=message):
    train.Trainer.build(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))


@pytest.mark.parametrize("accum, tensor", [(1, 1), (2, 1), (1, 2)],
                         ids=["fused", "accumulated", "vocab_parallel"])
def test_logged_loss_is_the_cross_entropy_and_z_loss_is_logged_apart(accum, tensor):
  """With train.z_loss on, `loss` must be what validation reports (plain cross-entropy) and
  `z_loss` the regulariser alone: both against numpy log-softmax of the model's own logits."""
  z = 1e-2
  cfg = small_cfg(tensor=tensor, z_loss=z, micro_batch=16 // accum)
  cfg.model.update(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
  trainer = train.Trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:tensor]))
  state = trainer.init_state()
  batch = batches(1, accum=accum, micro=16 // accum)[0]
  logits = np.asarray(trainer.model.apply({"params": state.params},
                                          batch["inputs"].reshape(16, -1)), np.float64)[..., :250]
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, batch["targets"].reshape(16, -1)[..., None], -1)[..., 0]
  _, metrics = trainer.step(state, jax.device_put(batch, trainer.batch_sharding()))
  np.testing.assert_allclose(float(metrics["loss"]), (log_z - target).mean(), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["z_loss"]), z * (log_z ** 2).mean(), rtol=2e-5)


# The fused loss, and the vocab-parallel one (in the slow step: the default suite is near its
# time budget and the fused path already covers the pipeline's positions).
@pytest.mark.parametrize("tensor", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_packed_documents_give_the_losses_they_give_alone(tensor):
  """Under data.document_mask a packed row restarts attention and positions at each document
  (Megatron's reset_position_ids), so every token's loss is the one it has with its document
  run alone from position 0; the train path's eval loss sums exactly those."""
  from gptjax.data import pipeline  # pylint: disable=import-outside-toplevel
  cfg = small_cfg(tensor=tensor)
  cfg.data.document_mask = True
  trainer = train.Trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:tensor]))
  params = trainer.init_state().params
  eos, rng = 0, np.random.default_rng(3)
  lengths = [7, 11, 9, 3]  # tokens + EOS each: 34, one more than a window of 33
  stream = np.concatenate([np.append(rng.integers(1, 250, n - 1), eos) for n in lengths])
  batch = pipeline.to_example(stream[None, :33], eos_id=eos, segment_ids=True)

  def token_losses(logits, targets):
    z = np.asarray(logits, np.float64)[0, :, :250]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]

  with trainer._ctx():
    packed = token_losses(trainer.model.apply({"params": params}, batch["inputs"],
                                              batch["positions"], batch["segment_ids"]),
                          batch["targets"][0])
    alone, start = [], 0
    for n in lengths:
      n = min(n, 32 - start)  # the last document is cut by the window
      inputs, targets = stream[start:start + n], stream[start + 1:start + n + 1]
      logits = trainer.model.apply({"params": params}, inputs[None].astype(np.int32))
      alone.append(token_losses(logits, targets))
      start += n
  alone = np.concatenate(alone)
  np.testing.assert_allclose(packed, alone, rtol=2e-5, atol=2e-5)
  total = float(trainer.eval(params, batch)["loss_sum"])
  np.testing.assert_allclose(total, alone.sum(), rtol=1e-5)
  no_reset = {k: v for k, v in batch.items() if k != "positions"}
  assert abs(float(trainer.eval(params, no_reset)["loss_sum"]) - total) > 1e-3


def test_runs_differing_in_lr_decay_and_betas_lower_to_one_program():
  """The learning rate, weight decay and Adam betas are traced values in the optimizer state, so a
  sweep over them compiles one train step; each run still trains with its own values."""
  texts, lrs = [], []
  for peak, wd, b1, b2 in ((1e-3, 0.1, 0.9, 0.95), (3e-3, 0.0, 0.8, 0.99)):
    c = small_cfg()
    c.optim.update(peak_lr=peak, weight_decay=wd, b1=b1, b2=b2, schedule="constant")
    trainer = train.Trainer.build(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    batch = batches(1)[0]
    texts.append(trainer.lower_step(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)).as_text())
    state = trainer.init_state()
    for name, want in (("peak_lr", peak), ("weight_decay", wd), ("b1", b1), ("b2", b2)):
      assert float(optax.tree_utils.tree_get(state.opt_state, name)) == np.float32(want)
    _, m = trainer.step(state, jax.device_put(batch, trainer.batch_sharding()))
    lrs.append(float(m["lr"]))
  assert texts[0] == texts[1]
  np.testing.assert_allclose(lrs, [0.0, 0.0])  # step 0 of a 2-step warmup: 0 x the peak


def test_a_restored_state_takes_the_configs_hyperparameters_and_says_so():
  c = small_cfg()
  trainer = train.Trainer.build(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
  state = trainer.init_state()
  c.optim.update(peak_lr=1e-3, b2=0.99)
  lines = []
  opt_state = optim.set_hyperparams(state.opt_state, c, lines.append)
  assert float(optax.tree_utils.tree_get(opt_state, "peak_lr")) == np.float32(1e-3)
  assert float(optax.tree_utils.tree_get(opt_state, "b2")) == np.float32(0.99)
  assert lines == ["optim.peak_lr: the checkpoint trained with 0.003; from here on 0.001, as the "
                   "config says", "optim.b2: the checkpoint trained with 0.95; from here on 0.99, "
                   "as the config says"]
