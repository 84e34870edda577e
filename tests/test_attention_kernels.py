"""Which attention kernel runs (`attention.resolve_kernel`), and each kernel against a plain
jax.numpy reference written here: Splash in the Pallas interpreter on the CPU, cuDNN's masks
through the XLA path of `jax.nn.dot_product_attention`, the 'xla' and 'blocked' kernels."""

import dataclasses
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from gptjax import attention, attention_kernels, config as config_lib, loop
from gptjax.errors import ConfigError
from gptjax.layers import ModelArgs
from test_loop import corpus_cfg

# ---- the resolution table ---------------------------------------------------------------------
# For every backend, dtype, attention dropout and phase: the kernel each model.attention_impl runs.
# !impl: ConfigError naming model.attention_impl; !dtype: naming model.attention_impl and
# model.dtype; !drop: naming model.attn_dropout and model.attention_impl. The window (dense or
# banded) and segment ids (packed or not) never change a cell: every kernel takes both.
TABLE = """
backend dtype    dropout phase | auto    blocked xla  cudnn  splash
cpu     float32  0       train | blocked blocked xla  !impl  !impl
cpu     float32  0       eval  | blocked blocked xla  !impl  !impl
cpu     float32  0.1     train | xla     !drop   xla  !impl  !impl
cpu     float32  0.1     eval  | blocked blocked xla  !impl  !impl
cpu     bfloat16 0       train | blocked blocked xla  !impl  !impl
cpu     bfloat16 0       eval  | blocked blocked xla  !impl  !impl
cpu     bfloat16 0.1     train | xla     !drop   xla  !impl  !impl
cpu     bfloat16 0.1     eval  | blocked blocked xla  !impl  !impl
gpu     float32  0       train | xla     blocked xla  !dtype !impl
gpu     float32  0       eval  | xla     blocked xla  !dtype !impl
gpu     float32  0.1     train | xla     !drop   xla  !dtype !impl
gpu     float32  0.1     eval  | xla     blocked xla  !dtype !impl
gpu     bfloat16 0       train | cudnn   blocked xla  cudnn  !impl
gpu     bfloat16 0       eval  | cudnn   blocked xla  cudnn  !impl
gpu     bfloat16 0.1     train | xla     !drop   xla  !drop  !impl
gpu     bfloat16 0.1     eval  | cudnn   blocked xla  cudnn  !impl
tpu     float32  0       train | splash  blocked xla  !impl  splash
tpu     float32  0       eval  | splash  blocked xla  !impl  splash
tpu     float32  0.1     train | xla     !drop   xla  !impl  !drop
tpu     float32  0.1     eval  | splash  blocked xla  !impl  splash
tpu     bfloat16 0       train | splash  blocked xla  !impl  splash
tpu     bfloat16 0       eval  | splash  blocked xla  !impl  splash
tpu     bfloat16 0.1     train | xla     !drop   xla  !impl  !drop
tpu     bfloat16 0.1     eval  | splash  blocked xla  !impl  splash
"""
ERRORS = {"!impl": (r"model\.attention_impl",),
          "!dtype": (r"model\.attention_impl", r"model\.dtype"),
          "!drop": (r"model\.attn_dropout", r"model\.attention_impl")}


def _rows():
  lines = [line.split("|") for line in TABLE.strip().splitlines()]
  impls = lines[0][1].split()
  for left, right in lines[1:]:
    backend, dtype, dropout, phase = left.split()
    yield backend, dtype, float(dropout), phase == "train", dict(zip(impls, right.split()))


def test_resolution_table():
  for backend, dtype, dropout, training, cells in _rows():
    for impl, want in cells.items():
      args = ModelArgs(d_head=64, dtype=jnp.dtype(dtype), attn_dropout=dropout,
                       attention_impl=impl)
      for window in (None, 256):
        for segments in (False, True):
          where = f"{backend} {dtype} dropout={dropout} training={training} {impl} {window} " \
                  f"{segments}"
          resolve = lambda a=args: attention.resolve_kernel(
              a, backend, training=training, window=window, segments=segments)
          if want.startswith("!"):
            with pytest.raises(ConfigError) as err:
              resolve()
            for pattern in ERRORS[want]:
              assert re.search(pattern, str(err.value)), where
            continue
          kernel = resolve()
          assert kernel.name == want, where
          # Dropout is applied exactly when training with the masked product.
          assert kernel.dropout == (dropout if training and want == "xla" else 0.0), where
          # 'auto' says which kernel it runs instead of its preferred one.
          preferred = {"cpu": "blocked", "gpu": "cudnn", "tpu": "splash"}[backend]
          assert kernel.instead_of == ("" if impl != "auto" or want == preferred else preferred)


def test_resolution_of_head_widths_other_backends_decoding_and_prefix_tuning():
  gpu = ModelArgs(d_head=12, dtype=jnp.bfloat16, attn_dropout=0.0)
  kernel = attention.resolve_kernel(gpu, "gpu", training=True)
  assert (kernel.name, kernel.instead_of) == ("xla", "cudnn") and "d_head is 12" in kernel.reason
  with pytest.raises(ConfigError, match=r"model\.attention_impl: 'cudnn' .* d_head is 12"):
    attention.resolve_kernel(dataclasses.replace(gpu, attention_impl="cudnn"), "gpu",
                             training=False)
  assert attention.resolve_kernel(gpu, "rocm", training=False).name == "xla"
  for impl in attention.IMPLEMENTATIONS:  # decoding always reads the KV cache
    args = dataclasses.replace(gpu, attention_impl=impl)
    assert attention.resolve_kernel(args, "cpu", training=False, decode=True).name == "cached"
  prefix = dataclasses.replace(gpu, prefix_len=4, attn_dropout=0.1)
  kernel = attention.resolve_kernel(prefix, "gpu", training=True)
  assert (kernel.name, kernel.dropout) == ("prefixed", 0.1)
  with pytest.raises(ConfigError, match=r"model\.attention_impl: 'cudnn'.*finetune\.peft"):
    attention.resolve_kernel(dataclasses.replace(prefix, attention_impl="cudnn"), "gpu",
                             training=False)


@pytest.mark.parametrize("edit, backend, message", [
    (dict(attention_impl="cudnn"), "cpu", r"model\.attention_impl: 'cudnn' cannot run here"),
    (dict(attention_impl="splash"), "gpu", r"model\.attention_impl: 'splash' cannot run here"),
    (dict(attention_impl="cudnn"), "gpu", r"model\.attention_impl: 'cudnn'.*model\.dtype"),
    (dict(attention_impl="cudnn", dtype="bfloat16", attn_dropout=0.1), "gpu",
     r"model\.attn_dropout: 0\.1 .*model\.attention_impl='cudnn'"),
    (dict(attention_impl="splash", attn_dropout=0.1), "tpu", r"model\.attn_dropout"),
    (dict(attention_impl="flash"), "gpu", r"model\.attention_impl: unknown kernel 'flash'"),
])
def test_config_validation_refuses_kernels_the_backend_cannot_run(edit, backend, message):
  cfg = configs.load("tiny")
  cfg.model.update(edit)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(cfg, n_devices=8, backend=backend)
  cfg.model.update(attention_impl="auto")
  config_lib.validate(cfg, n_devices=8, backend=backend)  # 'auto' always runs


def test_config_validation_refuses_a_fused_kernel_for_prefix_tuning():
  cfg = configs.load("tiny")
  cfg.model.update(attention_impl="splash", attn_dropout=0.0)
  cfg.finetune.update(train_path="train.jsonl", peft="prefix")
  with pytest.raises(ConfigError, match=r"finetune\.peft='prefix'"):
    config_lib.validate(cfg, n_devices=8, backend="tpu")


# ---- the kernels against a reference ------------------------------------------------------------
def reference(q, k, v, window, segment_ids):
  """softmax(q k^T / sqrt(H), causal [banded] [segmented] mask) v in plain jax.numpy."""
  length, h = q.shape[1], q.shape[-1]
  i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  allowed = (j <= i) & ((i - j < window) if window else True)
  allowed = allowed[None, None]
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  s = jnp.einsum("bqnh,bknh->bnqk", q, k, precision="highest") / np.sqrt(h)
  p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
  return jnp.einsum("bnqk,bknh->bqnh", p, v, precision="highest")


def inputs(length, heads, d_head, segments, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.normal(size=(2, length, heads, d_head)), jnp.float32)
                for _ in range(4))
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (2, length)), axis=1), jnp.int32) if segments \
      else None
  return q, k, v, g, seg


def assert_values_and_grads(kernel, q, k, v, g, window, seg, tol):
  """`kernel` equals the reference, and so do its q, k, v gradients (of <out, g>)."""
  want = reference(q, k, v, window, seg)
  np.testing.assert_allclose(kernel(q, k, v), want, rtol=tol, atol=tol)
  loss = lambda f: (lambda q, k, v: (f(q, k, v) * g).sum())
  got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
  grads = jax.grad(loss(lambda q, k, v: reference(q, k, v, window, seg)), argnums=(0, 1, 2))(
      q, k, v)
  for name, a, b in zip("qkv", got, grads):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("length, window, segments", [
    (256, None, False), (256, 100, False), (256, None, True), (200, 70, True)],
    ids=["causal", "local", "segmented", "padded_local_segmented"])
def test_splash_in_interpret_mode_equals_the_reference(length, window, segments):
  """Blocks of 128 (two per side at L = 256); L = 200 is padded to 256 and cut back."""
  q, k, v, g, seg = inputs(length, 2, 64, segments)
  splash = jax.jit(lambda q, k, v: attention_kernels.splash_attention(
      q, k, v, window, seg, block=128, interpret=True))
  assert_values_and_grads(splash, q, k, v, g, window, seg, 2e-5)


def test_splash_runs_per_device_under_a_mesh():
  """Under a data x tensor mesh each device runs Splash on its own rows and heads (shard_map)."""
  q, k, v, g, seg = inputs(256, 2, 64, True, seed=1)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
  with jax.set_mesh(mesh), nn.logical_axis_rules((("batch", "data"), ("heads", "tensor"))):
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "tensor"))
    q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
    splash = jax.jit(lambda q, k, v: attention_kernels.splash_attention(q, k, v, 100, seg,
                                                                       interpret=True))
    assert "shard_map" in str(jax.make_jaxpr(splash)(q, k, v))
    assert_values_and_grads(splash, q, k, v, g, 100, seg, 2e-5)


@pytest.mark.parametrize("length, window, segments", [
    (64, None, False), (64, 9, False), (63, None, True), (64, 9, True)])
def test_cudnn_masks_equal_the_reference(length, window, segments):
  """The arguments `cudnn_attention` gives jax.nn.dot_product_attention (causal, the window as
  local_window_size, segments as a mask, an odd L padded by one) mean the model's mask: checked
  through the XLA implementation of the same call (cuDNN itself needs an NVIDIA GPU)."""
  q, k, v, g, seg = inputs(length, 2, 16, segments)
  kernel = lambda q, k, v: attention_kernels.cudnn_attention(q, k, v, window, seg,
                                                             implementation="xla")
  assert_values_and_grads(jax.jit(kernel), q, k, v, g, window, seg, 1e-5)


@pytest.mark.parametrize("name", ["xla", "blocked"])
def test_xla_and_blocked_kernels_equal_the_reference(name):
  q, k, v, g, seg = inputs(256, 2, 16, True)
  kernel = lambda q, k, v: attention_kernels.KERNELS[name](q, k, v, 70, seg)
  assert_values_and_grads(jax.jit(kernel), q, k, v, g, 70, seg, 1e-5)


@pytest.mark.parametrize("impl, one_product", [("xla", True), ("blocked", False)])
def test_xla_means_one_masked_product(impl, one_product):
  """'xla' computes the whole [B, N, L, L] score matrix; 'blocked' never does (L = 256)."""
  args = ModelArgs(vocab_size=64, ctx=256, n_layers=1, d_model=32, n_heads=2, d_head=16, d_ff=64,
                   attention_impl=impl, attn_dropout=0.0)
  x = jnp.zeros((2, 256, 32), jnp.float32)
  layer = attention.Attention(args)
  params = jax.eval_shape(lambda: layer.init(jax.random.key(0), x, None, True))
  jaxpr = str(jax.make_jaxpr(lambda p: layer.apply(p, x, None, True))(params))
  assert ("f32[2,2,256,256]" in jaxpr) == one_product


# ---- saying which kernel runs ------------------------------------------------------------------
def test_kernel_lines_and_record():
  args = ModelArgs(attention="alternating", dtype=jnp.bfloat16, attn_dropout=0.1)
  assert attention.kernel_lines(args, "gpu") == [
      "attention: dense layers run 'xla' (one masked product) when training, not 'cudnn': "
      "model.attn_dropout=0.1 needs dropout inside attention, which the 'cudnn' kernel lacks; "
      "set model.attn_dropout=0 for 'cudnn'",
      "attention: dense layers run 'cudnn' (cuDNN flash attention) when evaluating: "
      "model.attention_impl='auto' on gpu",
      "attention: banded layers run 'xla' (one masked product) when training, not 'cudnn': "
      "model.attn_dropout=0.1 needs dropout inside attention, which the 'cudnn' kernel lacks; "
      "set model.attn_dropout=0 for 'cudnn'",
      "attention: banded layers run 'cudnn' (cuDNN flash attention) when evaluating: "
      "model.attention_impl='auto' on gpu"]
  assert attention.kernel_record(args, "gpu") == (
      "dense: train xla, eval cudnn; banded: train xla, eval cudnn")
  same = dataclasses.replace(args, attn_dropout=0.0)
  assert attention.kernel_lines(same, "tpu") == [
      "attention: dense layers run 'splash' (Splash attention, a Pallas TPU kernel): "
      "model.attention_impl='auto' on tpu",
      "attention: banded layers run 'splash' (Splash attention, a Pallas TPU kernel): "
      "model.attention_impl='auto' on tpu"]
  assert attention.kernel_record(same, "tpu") == "dense: splash; banded: splash"


def tiny_run_cfg(tmp_path):
  """test_loop's small corpus run, with banded layers and attention dropout, two steps."""
  c = corpus_cfg(tmp_path, steps=2)
  c.model.update(ctx=32, d_model=32, attention="alternating", local_window=8, attn_dropout=0.1)
  c.train.update(global_batch=4, eval_every=0, eval_batches=1, log_every=1, sample_tokens=0)
  c.optim.warmup_steps = 1
  return c


def test_a_run_says_and_records_its_kernels(tmp_path, capsys):
  attention.say_once.cache_clear()
  workdir = str(tmp_path / "run")
  loop.run(tiny_run_cfg(tmp_path), workdir, devices=jax.devices()[:1])
  out = capsys.readouterr().out
  for kind in ("dense", "banded"):  # each line once, though the model was traced several times
    assert out.count(f"gptjax: attention: {kind} layers run 'xla' (one masked product) when "
                     "training, not 'blocked': model.attn_dropout=0.1 needs dropout") == 1
    assert out.count(f"gptjax: attention: {kind} layers run 'blocked' (gptjax's blocked causal "
                     "kernel) when evaluating: model.attention_impl='auto' on cpu") == 1
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    recorded = json.load(f)["model"]["attention_kernels"]
  assert recorded == "dense: train xla, eval blocked; banded: train xla, eval blocked"
  # Resuming on the same backend: the record is the same, so no setting changed.
  loop.run(tiny_run_cfg(tmp_path), workdir, devices=jax.devices()[:1])
  assert "changed settings" not in capsys.readouterr().out
