"""The GPT model against an independent jax.numpy reference, and its structural guarantees."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import attention_kernels as attention_lib
from gptjax import layout
from gptjax.loss import cross_entropy
from gptjax.model import GPT, Attention, ModelArgs

SMALL = ModelArgs(vocab_size=97, ctx=32, n_layers=4, d_model=48, n_heads=4, d_head=12, d_ff=192)


@functools.lru_cache(maxsize=None)
def init(args, length=16, seed=0):
  """Random tokens and initial params; jitted (eager init compiles op by op) and cached per args."""
  tokens = jax.random.randint(jax.random.key(seed + 1), (3, length), 0, args.vocab_size)
  params = nn.meta.unbox(jax.jit(GPT(args).init)(jax.random.key(seed), tokens)["params"])
  return params, tokens


def perturb(params, seed=7):
  """Random values everywhere (LayerNorm gains/biases and biases included), so tests see all."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# ---- independent reference -------------------------------------------------------------------
def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def reference_logits(params, tokens, a: ModelArgs):
  """Plain numpy GPT forward pass, written from the papers, independent of gptjax.model."""
  p = jax.tree.map(np.asarray, layout.unstack(params, len(a.pattern)))
  tokens = np.asarray(tokens)
  # µP (Tensor Programs V): scores q.k / d_head (times sqrt of the base model's d_head, so that the
  # base width scores as SP does), logits times base_width / width.
  scale, out_mult = 1 / np.sqrt(a.d_head), 1.0
  if a.parametrization == "mup":
    base_d_head = a.mup_base_d_head or a.d_head * a.mup_base_width / a.d_model
    scale, out_mult = np.sqrt(base_d_head) / a.d_head, a.mup_base_width / a.d_model
  length = tokens.shape[1]
  x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][:length][None]
  for l in range(a.n_layers):
    b = p[f"block_{l}"]
    window = a.window(l)

    def attn(h, b=b, window=window):
      qkv = np.einsum("btd,dsnh->btsnh", h, b["attn"]["qkv"]["kernel"]) + b["attn"]["qkv"]["bias"]
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      s = np.einsum("bqnh,bknh->bnqk", q, k) * scale
      i, j = np.arange(length)[:, None], np.arange(length)[None, :]
      allowed = (j <= i) & ((i - j < window) if window else True)
      s = np.where(allowed, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w = w / w.sum(-1, keepdims=True)
      o = np.einsum("bnqk,bknh->bqnh", w, v)
      return np.einsum("bqnh,nhd->bqd", o, b["attn"]["out"]["kernel"]) + b["attn"]["out"]["bias"]

    def mlp(h, b=b):
      f = _gelu(h @ b["mlp"]["fc"]["kernel"] + b["mlp"]["fc"]["bias"])
      return f @ b["mlp"]["proj"]["kernel"] + b["mlp"]["proj"]["bias"]

    if a.norm == "pre":
      x = x + attn(_ln(x, b["ln_1"], a.ln_eps))
      x = x + mlp(_ln(x, b["ln_2"], a.ln_eps))
    else:
      x = _ln(x + attn(x), b["ln_1"], a.ln_eps)
      x = _ln(x + mlp(x), b["ln_2"], a.ln_eps)
  if a.norm == "pre":
    x = _ln(x, p["ln_f"], a.ln_eps)
  w = p["wte"]["embedding"].T if a.tie_embeddings else p["lm_head"]
  return (x @ w * out_mult)[..., :a.vocab_size]


@pytest.mark.parametrize("overrides", [
    dict(norm="pre"),
    dict(norm="post"),
    dict(attention="alternating", local_window=5),
    dict(tie_embeddings=False, pad_vocab_to=64),
    dict(scan_layers=False, norm="post"),
    dict(parametrization="mup", mup_base_width=8),
    dict(parametrization="mup", mup_base_width=16, mup_base_d_head=2, tie_embeddings=False),
], ids=["pre_ln", "post_ln", "banded", "untied_padded", "unrolled_post_ln", "mup", "mup_heads"])
def test_matches_numpy_reference(overrides):
  args = dataclasses.replace(SMALL, **overrides)
  params, tokens = init(args)
  params = perturb(params)
  logits = GPT(args).apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32
  assert logits.shape == (3, 16, args.padded_vocab)
  np.testing.assert_allclose(logits[..., :args.vocab_size], reference_logits(params, tokens, args),
                             atol=2e-4, rtol=2e-4)
  if args.padded_vocab > args.vocab_size:  # padded ids can never be predicted
    assert np.all(np.asarray(logits[..., args.vocab_size:]) <= -1e29)


@pytest.mark.parametrize("length, window, segments", [
    (256, None, False), (200, None, True), (200, 70, False), (130, 5, True)])
def test_blocked_causal_attention_equals_one_masked_product(length, window, segments):
  """Long sequences skip fully masked query x key blocks; values and gradients stay the same."""
  rng = np.random.default_rng(length)
  q, k, v, g = (jnp.asarray(rng.normal(size=(2, length, 3, 8)), jnp.float32) for _ in range(4))
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (2, length)), axis=1)) if segments else None
  # Independent reference: numpy, the full [L, L] mask.
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  allowed = (j <= i) & ((i - j < window) if window else True)
  allowed = allowed[None, None] & (
      (np.asarray(seg)[:, None, :, None] == np.asarray(seg)[:, None, None, :])
      if segments else True)
  s = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(8)
  w = np.exp(np.where(allowed, s, -np.inf) - np.where(allowed, s, -np.inf).max(-1, keepdims=True))
  expect = np.einsum("bnqk,bknh->bqnh", w / w.sum(-1, keepdims=True), v)
  blocked = lambda q, k, v: attention_lib.blocked_causal_attention(q, k, v, window, seg)
  full = lambda q, k, v: attention_lib.xla_attention(
      q, k, v, attention_lib.causal_mask(length, window, seg))
  np.testing.assert_allclose(jax.jit(blocked)(q, k, v), expect, rtol=1e-5, atol=1e-5)
  grads = [jax.jit(jax.vjp(f, q, k, v)[1])(g) for f in (blocked, full)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gpt2_init_statistics():
  args = dataclasses.replace(SMALL, d_model=256, n_heads=4, d_head=64, d_ff=1024)
  params, _ = init(args)
  blocks = params["layers"]["block_0"]
  np.testing.assert_allclose(np.std(blocks["mlp"]["fc"]["kernel"]), 0.02, rtol=0.05)
  resid = 0.02 / np.sqrt(2 * args.n_layers)  # GPT-2: residual projections scaled by 1/sqrt(N)
  np.testing.assert_allclose(np.std(blocks["mlp"]["proj"]["kernel"]), resid, rtol=0.05)
  np.testing.assert_allclose(np.std(blocks["attn"]["out"]["kernel"]), resid, rtol=0.05)
  assert np.all(blocks["ln_1"]["scale"] == 1) and np.all(blocks["attn"]["qkv"]["bias"] == 0)
  # Each scanned layer gets its own initialisation.
  assert not np.allclose(blocks["mlp"]["fc"]["kernel"][0], blocks["mlp"]["fc"]["kernel"][1])


@pytest.mark.parametrize("attention", ["dense", "alternating"])
def test_causality_by_gradient(attention):
  """d logits[t] / d (position embedding t') is exactly zero for every t' > t."""
  args = dataclasses.replace(SMALL, attention=attention, local_window=3)
  params, tokens = init(args, length=12)
  model = GPT(args)

  def out_at(wpe, t):
    p = dict(params, wpe={"embedding": wpe})
    return model.apply({"params": p}, tokens)[:, t].sum()

  for t in (0, 5, 11):
    g = jax.grad(out_at)(params["wpe"]["embedding"], t)
    norms = np.abs(np.asarray(g)).sum(-1)
    assert np.all(norms[t + 1:] == 0.0), f"position {t} sees the future"
    assert np.all(norms[: t + 1] > 0.0), f"position {t} ignores its past"


def test_banded_layer_ignores_tokens_beyond_window():
  window = 4
  args = dataclasses.replace(SMALL, attention="alternating", local_window=window)
  attn = Attention(args, window=window)
  x = jax.random.normal(jax.random.key(0), (2, 12, args.d_model))
  p = attn.init(jax.random.key(1), x, None, True)

  for t in (2, 7, 11):
    g = jax.grad(lambda x, t=t: attn.apply(p, x, None, True)[:, t].sum())(x)
    norms = np.abs(np.asarray(g)).sum((0, 2))
    seen = np.nonzero(norms)[0]
    assert seen.min() == max(0, t - window + 1) and seen.max() == t


def test_segment_ids_block_attention_across_documents():
  params, tokens = init(SMALL)
  segments = jnp.array([[0] * 6 + [1] * 10] * 3)
  model = GPT(SMALL)
  full = model.apply({"params": params}, tokens, segment_ids_BxL=segments)
  # The second document alone, at the same positions, gives the same logits.
  other = tokens.at[:, :6].set(0)
  alone = model.apply({"params": params}, other, segment_ids_BxL=segments)
  np.testing.assert_allclose(full[:, 6:], alone[:, 6:], atol=1e-5)
  assert not np.allclose(full[:, 6:], model.apply({"params": params}, tokens)[:, 6:], atol=1e-3)


BANDED = dataclasses.replace(SMALL, attention="alternating", local_window=5)


def _loss(p, args, tokens):
  return cross_entropy(GPT(args).apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])[0]


@pytest.fixture(scope="module")
def plain_loss_and_grads():
  """Loss and gradients of the scanned, non-remat model: the reference for every variant."""
  params, tokens = init(BANDED)
  loss, grads = jax.jit(jax.value_and_grad(_loss), static_argnums=1)(params, BANDED, tokens)
  return params, tokens, loss, grads


# Every remat policy, scanned and unrolled, but ("none", scanned): that one is the reference.
VARIANTS = [(remat, scan) for remat in ("none", "full", "dots", "dots_no_batch", "qkv_attn")
            for scan in (True, False) if (remat, scan) != ("none", True)]


@pytest.mark.parametrize("remat, scan_layers", VARIANTS)
def test_scan_and_remat_give_the_same_loss_and_grads(plain_loss_and_grads, remat, scan_layers):
  params, tokens, l0, g0 = plain_loss_and_grads
  variant = dataclasses.replace(BANDED, remat=remat, scan_layers=scan_layers)
  vparams = layout.convert(params, scan_layers, period=2)
  l1, g1 = jax.jit(jax.value_and_grad(_loss), static_argnums=1)(vparams, variant, tokens)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)  # tolerance: fp32 reassociation only
  g1 = layout.convert(g1, True, period=2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g0, g1)


def test_jit_and_eager_agree():
  params, tokens = init(SMALL)
  model = GPT(SMALL)
  eager = model.apply({"params": params}, tokens)
  with jax.disable_jit():
    no_jit = model.apply({"params": params}, tokens)
  jitted = jax.jit(model.apply)({"params": params}, tokens)
  np.testing.assert_allclose(eager, jitted, atol=1e-5)
  np.testing.assert_allclose(no_jit, jitted, atol=1e-5)


def test_dropout_is_seeded_and_off_when_deterministic():
  args = dataclasses.replace(SMALL, embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
  params, tokens = init(args)
  model = GPT(args)
  run = lambda seed: model.apply({"params": params}, tokens, deterministic=False,
                                 rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  # Deterministic mode equals the dropout-free model.
  np.testing.assert_allclose(model.apply({"params": params}, tokens),
                             GPT(SMALL).apply({"params": params}, tokens), atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  args = dataclasses.replace(SMALL, dtype=jnp.bfloat16)
  params, tokens = init(args)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = GPT(args).apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32
  ref = GPT(SMALL).apply({"params": params}, tokens)
  # Measured max |bf16 - f32| on these logits (|logits| <= ~1): 3.5e-3 to 4.1e-3 over init seeds
  # 0-7 (this one: seed 0, 4.1e-3); the tolerance is 2.4x the largest.
  np.testing.assert_allclose(logits, ref, atol=1e-2, rtol=0)


def test_parameters_carry_logical_axes():
  args = dataclasses.replace(SMALL, tie_embeddings=False)
  boxed = GPT(args).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  axes = nn.get_partition_spec(boxed)
  assert tuple(axes["wte"]["embedding"]) == ("vocab", "embed")
  assert tuple(axes["lm_head"]) == ("embed", "vocab")
  block = axes["layers"]["block_0"]
  assert tuple(block["attn"]["qkv"]["kernel"]) == ("layers", "embed", None, "heads", "kv")
  assert tuple(block["attn"]["out"]["kernel"]) == ("layers", "heads", "kv", "embed")
  assert tuple(block["mlp"]["fc"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(block["mlp"]["proj"]["kernel"]) == ("layers", "mlp", "embed")
  assert tuple(block["ln_1"]["scale"]) == ("layers", "embed")


def test_cross_entropy_matches_optax():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 3
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
  weights = jnp.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]], jnp.float32)
  loss, count = cross_entropy(logits, targets, weights)
  ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(loss, (ref * weights).sum() / weights.sum(), rtol=1e-6)
  assert count == 8
  z = jax.nn.logsumexp(logits, -1)
  zl, _ = cross_entropy(logits, targets, z_loss=1e-2)
  np.testing.assert_allclose(zl, (ref + 1e-2 * z**2).mean(), rtol=1e-6)


# ---- attention dropout -------------------------------------------------------------------------
def _probe_attention(dtype, rate=0.5, batch=8, seed=0):
  """Attention whose output reads out the dropped attention probabilities, and the scores.

  L = H = 16 positions, N = 4 heads, D = N * H. The input at position j is [e_j, r_j, s_j, 0]:
  every head has q_j = r_j, k_j = s_j and v_j = e_j (one-hot), and the output projection is the
  identity from (head n, dim h) to n * H + h, so y[b, i, n * H + j] = dropout(probs)[b, n, i, j].
  All rows and heads have the same inputs; r, s are bfloat16-exact, so every dtype sees the same
  scores. Returns (y [B, L, N, L] as float64, scores [L, L] in float64).
  """
  length, n = 16, 4
  args = dataclasses.replace(SMALL, n_heads=n, d_head=length, d_model=n * length,
                             attn_dropout=rate, dtype=dtype)
  rng = np.random.default_rng(seed)
  r, s = (np.asarray(jnp.asarray(1.5 * rng.normal(size=(length, length)), jnp.bfloat16),
                     np.float64) for _ in range(2))
  x = np.zeros((length, args.d_model))
  x[:, :length], x[:, length:2 * length], x[:, 2 * length:3 * length] = np.eye(length), r, s
  qkv = np.zeros((args.d_model, 3, n, length))
  for part, first in ((0, length), (1, 2 * length), (2, 0)):
    qkv[first + np.arange(length), part, :, np.arange(length)] = 1.0
  params = {"qkv": {"kernel": qkv, "bias": np.zeros((3, n, length))},
            "out": {"kernel": np.eye(args.d_model).reshape(n, length, args.d_model),
                    "bias": np.zeros(args.d_model)}}
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  x_BxLxD = jnp.asarray(np.broadcast_to(x, (batch,) + x.shape), jnp.float32)
  y = Attention(args).apply({"params": params}, x_BxLxD, None, False,
                            rngs={"dropout": jax.random.key(seed)})
  return np.asarray(y, np.float64).reshape(batch, length, n, length), r @ s.T / np.sqrt(length)


def _softmax_reference(scores):
  """float64 numpy causal softmax over the last axis."""
  length = scores.shape[-1]
  s = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def test_attention_dropout_masks_each_row_and_head_on_its_own():
  """GPT-2 (and HF's torch GPT-2) drops each attention probability independently; one [L, L] mask
  shared by every batch row and head (Flax's `broadcast_dropout=True`) is far less noise."""
  rate = 0.5
  y_BxLxNxL, scores = _probe_attention(jnp.float32, rate)
  probs = _softmax_reference(scores)
  causal = np.tril(np.ones(probs.shape, bool))
  kept_BxNxLxL = y_BxLxNxL.transpose(0, 2, 1, 3) != 0
  assert not kept_BxNxLxL[..., ~causal].any()  # the future stays masked
  # Kept probabilities are scaled by 1 / (1 - rate); the rest are exactly 0.
  np.testing.assert_allclose(y_BxLxNxL.transpose(0, 2, 1, 3),
                             np.where(kept_BxNxLxL, probs / (1 - rate), 0.0), rtol=1e-5, atol=1e-7)
  masks = kept_BxNxLxL[..., causal]  # [B, N, L(L+1)/2]: 8 * 4 * 136 = 4352 draws
  # Keep rate: 1 - rate, binomial standard deviation 0.0076; 4 sigma is 0.03.
  assert abs(masks.mean() - (1 - rate)) < 0.03, masks.mean()
  flat = masks.reshape(-1, masks.shape[-1])
  assert len({m.tobytes() for m in flat}) == len(flat), "a mask repeats across rows or heads"


def test_attention_dropout_softmax_runs_in_float32_under_bfloat16():
  """Under bfloat16 compute the probabilities before dropout are a float32 softmax, rounded once
  to bfloat16 (relative error <= 2^-8); a bfloat16 softmax errs by several percent on these
  scores (|s| up to ~10; the Flax path this replaced: 3.7e-2)."""
  rate = 0.5
  y_BxLxNxL, scores = _probe_attention(jnp.bfloat16, rate)
  probs = _softmax_reference(scores)[:, None, :]  # [L, 1, L]
  kept = y_BxLxNxL != 0
  assert kept.mean() > 0.2
  probs = np.broadcast_to(probs, y_BxLxNxL.shape)[kept]
  rel = np.abs(y_BxLxNxL[kept] * (1 - rate) - probs) / probs
  assert rel.max() <= 2.0**-8 + 1e-6, rel.max()  # measured 3.7e-3


@pytest.mark.parametrize("prefix_len", [0, 2], ids=["plain", "prefix_tuning"])
def test_attention_dropout_differs_between_identical_rows(prefix_len):
  args = dataclasses.replace(SMALL, attn_dropout=0.3, prefix_len=prefix_len)
  params, tokens = init(args)
  tokens = jnp.broadcast_to(tokens[:1], tokens.shape)  # three identical rows
  apply = jax.jit(functools.partial(GPT(args).apply, deterministic=False))
  logits = apply({"params": params}, tokens, rngs={"dropout": jax.random.key(0)})
  for row in (1, 2):
    assert np.abs(np.asarray(logits[0] - logits[row])).max() > 1e-4, row
