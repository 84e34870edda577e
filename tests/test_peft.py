"""Freezing and PEFT: LoRA, Houlsby adapters and prefix tuning, on one device and sharded."""

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptjax import generate, heads, layout, peft
from gptjax.config import ConfigError
from gptjax.data import sft
from gptjax.model import GPT, Adapter, ModelArgs
from test_finetune import SFT_PAIRS, TOK, build, marker_records, run_steps, small_cfg, train

ARGS = ModelArgs(vocab_size=50, ctx=32, n_layers=2, d_model=32, n_heads=2, d_head=16, d_ff=64)
TOKENS = np.random.default_rng(0).integers(0, 50, (2, 16)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def boxed_params(args: ModelArgs):
  """`model.init` params, still boxed with their logical axes (jitted, from an RBG key: both
  compile far faster than eager init or the default threefry key)."""
  return jax.jit(GPT(args).init)(jax.random.key(0, impl="unsafe_rbg"), TOKENS)["params"]


def lora_init(params, lora: peft.Lora):
  """`peft.lora_init`, jitted (eagerly, its random numbers compile op by op)."""
  return jax.jit(peft.lora_init, static_argnums=2)(jax.random.key(1), params, lora)


def shapes(args: ModelArgs):
  """The boxed params as ShapeDtypeStructs (no compilation)."""
  return jax.eval_shape(GPT(args).init, jax.random.key(0), TOKENS)["params"]


@functools.lru_cache(maxsize=None)
def random_params(args: ModelArgs):
  """Random values in the boxed layout (LayerNorm gains near 1): nothing to compile."""
  rng = np.random.default_rng(0)
  value = lambda path, s: (rng.normal(0, 0.02, s.shape) + ("scale" in jax.tree_util.keystr(path))
                           ).astype(np.float32)
  return jax.tree_util.tree_map_with_path(value, shapes(args))


@functools.lru_cache(maxsize=None)
def _apply(args: ModelArgs):
  return jax.jit(lambda params, tokens, segment_ids: GPT(args).apply(
      {"params": params}, tokens, segment_ids_BxL=segment_ids))


def logits(args, params, tokens=TOKENS, segment_ids=None):
  return np.asarray(_apply(args)(nn.meta.unbox(params), tokens, segment_ids))


def paths(tree):
  return set(peft.flatten(tree))


def without_peft(params):
  flat = peft.flatten(params)
  return peft.unflatten({p: x for p, x in flat.items() if not peft.is_peft_param(p)})


def test_split_join_and_what_each_method_freezes():
  params = shapes(dataclasses.replace(ARGS, adapter_dim=4))
  trainable, frozen = peft.split(params, peft.frozen_predicate("none", "wte|attn"))
  assert paths(frozen) == {p for p in paths(params) if "wte" in p or "attn" in p}
  assert paths(peft.join(trainable, frozen)) == paths(params)
  assert peft.split(params, peft.frozen_predicate("none", ""))[1] is None  # full fine-tuning
  trainable, frozen = peft.split(params, peft.frozen_predicate("adapters", ""))
  assert paths(trainable) == {p for p in paths(params) if "adapter_" in p}  # the base is frozen
  with pytest.raises(ConfigError, match=r"config\.finetune\.freeze: 'wpe_typo' matches no"):
    peft.check_freeze(sorted(paths(params)), "wpe_typo")
  with pytest.raises(ConfigError, match=r"config\.finetune\.freeze: .* not a regular expression"):
    peft.check_freeze(sorted(paths(params)), "(attn")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_with_zero_b_gives_exactly_the_base_outputs(scan_layers):
  args = dataclasses.replace(ARGS, scan_layers=scan_layers)
  base = random_params(args)
  lora = lora_init(base, peft.Lora(rank=4, alpha=8.0, targets="attn|mlp"))
  assert len(peft._lora_pairs(lora)) == 4 * (1 if scan_layers else 2)  # qkv, out, fc, proj
  merged = peft.merge(nn.meta.unbox(base), nn.meta.unbox(lora), scale=2.0)
  np.testing.assert_array_equal(logits(args, merged), logits(args, base))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_update_is_w_plus_scaled_a_times_b_for_every_kernel_shape(scan_layers):
  args = dataclasses.replace(ARGS, scan_layers=scan_layers)
  base = nn.meta.unbox(random_params(args))
  lora = nn.meta.unbox(lora_init(random_params(args), peft.Lora(rank=4, alpha=8.0,
                                                                targets="attn|mlp")))
  rng = np.random.default_rng(0)  # B = 0 at init: give it values to see the product
  lora = jax.tree_util.tree_map_with_path(
      lambda p, x: rng.normal(size=x.shape).astype(np.float32) if p[-1].key == "lora_b" else x,
      lora)
  merged, flat_base = peft.flatten(peft.merge(base, lora, scale=2.0)), peft.flatten(base)
  for module, (a, b) in peft._lora_pairs(lora).items():
    w = np.asarray(flat_base[module + "/kernel"], np.float64)
    lead = 1 if scan_layers else 0
    a2 = np.asarray(a, np.float64).reshape(a.shape[:lead] + (-1, a.shape[-1]))
    b2 = np.asarray(b, np.float64).reshape(b.shape[:lead + 1] + (-1,))
    want = w.reshape(a2.shape[:-1] + b2.shape[-1:]) + 2.0 * a2 @ b2  # the matrix form of the kernel
    np.testing.assert_allclose(np.asarray(merged[module + "/kernel"]).reshape(want.shape), want,
                               rtol=1e-5, atol=1e-5, err_msg=module)


def test_adapters_start_as_the_identity():
  args = ARGS
  with_adapters = dataclasses.replace(args, adapter_dim=8)
  params = boxed_params(with_adapters)
  base = without_peft(params)
  assert paths(base) == paths(boxed_params(args))  # adapters only add parameters
  for p, x in peft.flatten(nn.meta.unbox(params)).items():
    if "adapter" in p and "/up/" in p:
      assert not np.asarray(x).any(), p  # zero up-projection
  adapter = Adapter(with_adapters)  # the module itself is exactly the identity at init ...
  x = np.random.default_rng(1).normal(size=(2, 16, 32)).astype(np.float32)
  np.testing.assert_array_equal(jax.jit(adapter.apply)(jax.jit(adapter.init)(
      jax.random.key(0, impl="unsafe_rbg"), x), x), x)
  # ... so the model's outputs are the base model's (up to XLA fusing the two graphs differently).
  np.testing.assert_allclose(logits(with_adapters, params), logits(args, base), rtol=1e-6,
                             atol=1e-6)
  rng = np.random.default_rng(0)
  nudged = jax.tree_util.tree_map_with_path(  # random, not constant: LayerNorm removes constants
      lambda p, x: x + 0.1 * rng.normal(size=x.shape) if "'up'" in jax.tree_util.keystr(p) else x,
      nn.meta.unbox(params))
  assert np.abs(logits(with_adapters, nudged) - logits(args, base)).max() > 1e-3  # wired in


def test_prefix_length_zero_is_the_base_and_prefixes_keep_causality_and_segments():
  assert paths(shapes(dataclasses.replace(ARGS, prefix_len=0))) == paths(shapes(ARGS))
  args = dataclasses.replace(ARGS, prefix_len=4)
  params = random_params(args)
  prefix = peft.flatten(nn.meta.unbox(params))["layers/block_0/attn/prefix_key"]
  assert prefix.shape == (2, 4, 2, 16)  # [layers, P, N, H]
  base = without_peft(params)
  out = logits(args, params)
  assert np.abs(out - logits(ARGS, base)).max() > 1e-4  # the prefix is attended to
  later = TOKENS.copy()
  later[:, 9:] = (later[:, 9:] + 1) % 50
  np.testing.assert_allclose(logits(args, params, later)[:, :9], out[:, :9], rtol=1e-5, atol=1e-6)
  segments = np.repeat([[1] * 8 + [2] * 8], 2, axis=0).astype(np.int32)
  first = TOKENS.copy()
  first[:, :8] = (first[:, :8] + 1) % 50
  np.testing.assert_allclose(logits(args, params, first, segments)[:, 8:],
                             logits(args, params, TOKENS, segments)[:, 8:], rtol=1e-5, atol=1e-6)
  unrolled = dataclasses.replace(args, scan_layers=False)
  np.testing.assert_allclose(logits(unrolled, layout.unstack(nn.meta.unbox(params), 1)), out,
                             rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_with_a_prefix_equals_full_recomputation():
  args = dataclasses.replace(ARGS, prefix_len=4)
  params = nn.meta.unbox(random_params(args))
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
  run = lambda use_cache: generate.generate(GPT(args), params, prompts, 12, temperature=0.0,
                                            use_cache=use_cache)
  cached = run(True)
  assert cached == run(False)
  plain = generate.generate(GPT(ARGS), without_peft(params), prompts, 12, temperature=0.0)
  assert cached != plain  # the prefix changes what is generated


def test_lora_settings_are_checked_against_the_model():
  params = shapes(ARGS)
  with pytest.raises(ConfigError, match=r"config\.finetune\.lora\.targets: 'attn/q_proj' matches "
                                        r"no module.*layers/block_0/attn/qkv"):
    peft.lora_init(jax.random.key(0), params, peft.Lora(4, 8.0, "attn/q_proj"))
  with pytest.raises(ConfigError, match=r"config\.finetune\.lora\.rank: must be >= 1, got 0"):
    peft.lora_init(jax.random.key(0), params, peft.Lora(0, 8.0, "attn"))
  lora = jax.eval_shape(lambda: peft.lora_init(jax.random.key(0), params,
                                                 peft.Lora(4, 8.0, "attn/qkv")))
  peft.check_fits(lora, nn.meta.unbox(params))
  wider = shapes(dataclasses.replace(ARGS, d_model=48, d_head=24))
  with pytest.raises(ConfigError, match=r"config\.finetune\.base: the LoRA weights do not fit.*"
                                        r"layers/block_0/attn/qkv"):
    peft.check_fits(lora, nn.meta.unbox(wider))


# ---- training ------------------------------------------------------------------------------------
def _host(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


def _opt_paths(opt_state):
  """'/'-joined dict-key paths of the optimizer state's parameter-shaped leaves (Adam moments)."""
  out = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    if any(getattr(k, "name", None) == "hyperparams" for k in path):
      continue  # the traced learning rate, decay and betas (optim.HYPERPARAMS): scalars
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if keys:
      out.add("/".join(keys))
  return out


@pytest.fixture(scope="module")
def marker_rows():
  return sft.encode(marker_records(256, seed=0), sft.Format(task="classify", seq_len=32, lm=True),
                    TOK).rows


def test_frozen_params_are_bit_identical_after_training_and_have_no_optimizer_state(marker_rows):
  ft = build(small_cfg(freeze="wte|wpe|attn"))
  state = ft.trainer.init_state()
  before = _host((state.params, state.frozen))
  state, _ = run_steps(ft, state, marker_rows, 3)
  params, frozen = _host((state.params, state.frozen))
  jax.tree.map(np.testing.assert_array_equal, frozen, before[1])
  assert paths(frozen["base"]) == {p for p in paths(before[1]["base"])}
  assert all("wte" in p or "wpe" in p or "attn" in p for p in paths(frozen["base"]))
  assert not np.array_equal(params["base"]["layers"]["block_0"]["mlp"]["fc"]["kernel"],
                            before[0]["base"]["layers"]["block_0"]["mlp"]["fc"]["kernel"])
  trainable = {f"{k}/{p}" for k, sub in params.items() for p in paths(sub)}
  moments = _opt_paths(state.opt_state)
  assert moments == trainable  # mu and nu cover exactly the trainable parameters ...
  assert not any(p.endswith(f) for p in moments for f in paths(frozen["base"]))  # ... none frozen
  n_trainable, n_total = ft.counts()
  print(f"freeze 'wte|wpe|attn': {n_trainable:,} of {n_total:,} parameters train")


KINDS = {
    "lora": dict(method="lora", aux_lm_weight=0.5),  # the auxiliary LM loss is vocab-parallel
    "prefix": dict(method="prefix", task="sft", template="question {prompt} answer :",
                   prefix_len=4),
    "adapters": dict(method="adapters", task="multiple_choice", adapter_dim=8, delimiter=":"),
}


def _cfg(kind, data=1, fsdp=1, tensor=1):
  cfg = small_cfg(steps=4, **kind)
  cfg.model.pad_vocab_to = 8  # the vocabulary splits over the tensor axis
  cfg.finetune.lora.rank = 4
  cfg.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return cfg


@functools.lru_cache(maxsize=None)
def _rows(name):
  if name == "prefix":
    records = [(f"x:{i}", {"prompt": f"what says the {p}", "completion": c})
               for i, (p, c) in enumerate(SFT_PAIRS * 3)]
    return sft.encode(records, sft.Format(task="sft", seq_len=32,
                                          template=KINDS["prefix"]["template"]), TOK).rows
  if name == "adapters":
    records = [(f"x:{i}", {"text": r["text"], "choices": ["red", "blue"], "label": r["label"]})
               for i, (_, r) in enumerate(marker_records(64))]
    return sft.encode(records, sft.Format(task="multiple_choice", seq_len=32, delimiter=":"),
                      TOK).rows
  return sft.encode(marker_records(64), sft.Format(task="classify", seq_len=32, lm=True), TOK).rows


@functools.lru_cache(maxsize=None)
def single_device_run(name):
  return train(_cfg(KINDS[name]), _rows(name))


def test_lora_trains_its_pairs_only_and_merged_weights_give_the_same_logits():
  ft, state, losses = single_device_run("lora")
  assert set(state.params) == {"head", "lora"} and losses[-1] < losses[0]
  n_trainable, n_total = ft.counts()
  print(f"LoRA r=4 on attn/qkv: {n_trainable:,} of {n_total:,} parameters train "
        f"({100 * n_trainable / n_total:.2f}%)")
  assert n_trainable / n_total < 0.05
  assert all(p.startswith(("head/", "lora/")) for p in _opt_paths(state.opt_state))
  fresh = ft.trainer.init_state()  # the same seed: the base as it was before training
  jax.tree.map(np.testing.assert_array_equal, _host(state.frozen), _host(fresh.frozen))
  # Fold the trained pairs into the weights (in numpy) and run the plain GPT with the same head.
  params = _host(state.params)
  flat = peft.flatten(_host(state.frozen)["base"])
  for module, (a, b) in peft._lora_pairs(params["lora"]).items():
    w = flat[module + "/kernel"]
    flat[module + "/kernel"] = w + ft.spec.lora.scale * np.einsum("lir,lrsnh->lisnh", a, b)
  plain, head = GPT(ft.model.args), heads.Head(2)
  batch = {k: v[:8] for k, v in _rows("classify").arrays.items()}

  @jax.jit
  def merged_logits(base, head_params, batch):
    trunk = lambda t: plain.apply({"params": base}, t, method="hidden")
    return heads.task_logits("classify", trunk, lambda x: head.apply({"params": head_params}, x),
                             batch)[0]

  np.testing.assert_allclose(merged_logits(peft.unflatten(flat), params["head"], batch),
                             ft.logits(state, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lora", pytest.param("prefix", marks=pytest.mark.slow),
                                  pytest.param("adapters", marks=pytest.mark.slow)])
def test_peft_on_fsdp2_tp2_gives_the_single_device_losses(name):
  _, _, ref = single_device_run(name)
  ft, state, losses = train(_cfg(KINDS[name], data=1, fsdp=2, tensor=2), _rows(name),
                            devices=jax.devices()[:4])
  np.testing.assert_allclose(losses, ref, rtol=1e-5)
  if name == "lora":  # A and B are laid out like their kernel: embed -> fsdp, heads -> tensor
    qkv = state.params["lora"]["layers"]["block_0"]["attn"]["qkv"]
    assert qkv["lora_a"].sharding.spec == P(None, "fsdp", None)
    assert qkv["lora_b"].sharding.spec == P(None, None, None, "tensor", None)
  elif name == "prefix":
    prefix = state.params["base"]["layers"]["block_0"]["attn"]["prefix_key"]
    assert prefix.sharding.spec == P(None, None, "tensor", None)
  else:
    down = state.params["base"]["layers"]["block_0"]["adapter_mlp"]["down"]["kernel"]
    assert down.sharding.spec == P(None, "fsdp", None)
  print(f"{name}: losses {np.round(losses, 4)} on fsdp=2 x tensor=2 = one device's")
