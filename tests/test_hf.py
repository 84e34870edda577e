"""Hugging Face GPT-2 interop: logits match transformers both ways, and the round trip is exact."""

import dataclasses
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

import torch  # the `hf` extra; `make test` installs it
import transformers

from gptjax import hf, layout  # pylint: disable=wrong-import-position
from gptjax.loss import cross_entropy  # pylint: disable=wrong-import-position
from gptjax.model import GPT, ModelArgs  # pylint: disable=wrong-import-position

B, L = 2, 40
# Float32 logits, gptjax vs transformers (README, Hugging Face GPT-2). Measured max abs error:
# 3.6e-7 for the imported random GPT-2s here (|logits| <= 0.9), 3.6e-6 for the gptjax-native
# model of test_round_trip_is_exact (|logits| up to 4.5); 0.0 from HF through gptjax back to HF.
LOGITS_TOL = 1e-6  # imported models, and HF -> gptjax -> HF
NATIVE_LOGITS_TOL = 1e-5  # the gptjax-native model, logits 5x larger


def hf_model(seed: int = 0, **overrides) -> "transformers.GPT2LMHeadModel":
  """A random GPT-2 in eval mode with every 1-D weight (LayerNorms, biases) perturbed too."""
  config = transformers.GPT2Config(**(dict(
      n_layer=3, n_embd=96, n_head=3, vocab_size=1000, n_positions=64, attn_pdrop=0.0,
      resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=None, eos_token_id=None) | overrides))
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(config).to(torch.float32).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:  # HF inits LN to (1, 0) and biases to 0: a swapped pair would go unseen
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, tokens_BxL: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens_BxL)).logits.numpy()


def tokens(vocab_size: int = 1000, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab_size, (B, L), dtype=np.int64)


def gptjax_logits(args: ModelArgs, params, tokens_BxL: np.ndarray) -> np.ndarray:
  return np.asarray(GPT(args).apply({"params": params}, tokens_BxL.astype(np.int32)))


def init_structure(args: ModelArgs):
  """Shapes and dtypes of `nn.meta.unbox(GPT(args).init(...)["params"])`, without allocating."""
  abstract = jax.eval_shape(lambda: GPT(args).init(jax.random.key(0), np.zeros((1, 8), np.int32)))
  return nn.meta.unbox(abstract["params"])


@pytest.mark.parametrize("scan_layers,pad_vocab_to", [(True, 1), (False, 1), (True, 128)])
def test_import_matches_hf_logits(scan_layers, pad_vocab_to):
  model = hf_model()
  args, params = hf.load_hf_model(model, scan_layers=scan_layers, pad_vocab_to=pad_vocab_to)
  assert (args.n_layers, args.d_model, args.n_heads, args.d_head, args.d_ff) == (3, 96, 3, 32, 384)
  assert args.padded_vocab == (1024 if pad_vocab_to == 128 else 1000)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
      lambda x: (x.shape, x.dtype), init_structure(args))
  if pad_vocab_to > 1:
    np.testing.assert_array_equal(params["wte"]["embedding"][1000:], 0.0)

  t = tokens()
  ours = gptjax_logits(args, params, t)
  want = hf_logits(model, t)
  assert want.std() > 0.1  # not a vacuous comparison
  assert np.abs(ours[..., :1000] - want).max() < LOGITS_TOL
  if pad_vocab_to > 1:
    assert (ours[..., 1000:] <= -1e29).all()


def test_untied_lm_head_imports_and_exports():
  model = hf_model(tie_word_embeddings=False)
  assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
  args, params = hf.load_hf_model(model, pad_vocab_to=128)
  assert not args.tie_embeddings and params["lm_head"].shape == (96, 1024)
  t = tokens()
  assert np.abs(gptjax_logits(args, params, t)[..., :1000] - hf_logits(model, t)).max() < LOGITS_TOL
  back = hf.to_hf_model(params, args)
  np.testing.assert_allclose(hf_logits(back, t), hf_logits(model, t), atol=LOGITS_TOL, rtol=0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_export_reproduces_hf_model(scan_layers):
  model = hf_model(seed=1)
  args, params = hf.load_hf_model(model, scan_layers=scan_layers, pad_vocab_to=128)
  fresh = hf.to_hf_model(params, args)
  assert fresh.config.n_inner is None and fresh.config.tie_word_embeddings
  t = tokens(seed=1)
  np.testing.assert_allclose(hf_logits(fresh, t), hf_logits(model, t), atol=LOGITS_TOL, rtol=0)
  for k, v in model.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v.numpy(), err_msg=k)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_is_exact(scan_layers):
  args = ModelArgs(vocab_size=1000, pad_vocab_to=128, ctx=64, n_layers=3, d_model=96, n_heads=3,
                   d_head=32, d_ff=256, scan_layers=scan_layers)
  # Random values in the init structure (no init compile). Padded wte rows are dropped on export and
  # come back as zeros, so they start as zeros here.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (path[-1].key == "scale") + 0.1 * rng.standard_normal(s.shape, np.float32),
      init_structure(args))
  params["wte"]["embedding"][1000:] = 0.0
  sd = hf.params_to_hf(params, args)
  assert sd["transformer.wte.weight"].shape == (1000, 96)
  back = hf.params_from_hf(sd, args)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # A gptjax-native model (d_ff != 4 * d_model) also runs the same in transformers.
  exported = hf.to_hf_model(params, args)
  t = tokens()
  assert exported.config.n_inner == 256
  np.testing.assert_allclose(hf_logits(exported, t), gptjax_logits(args, params, t)[..., :1000],
                             atol=NATIVE_LOGITS_TOL, rtol=0)


@pytest.mark.parametrize("change,setting", [
    (dict(norm="post"), "norm='post'"),
    (dict(attention="alternating", n_layers=4), "attention='alternating'"),
    (dict(d_head=8), "n_heads \\* d_head"),
])
def test_unrepresentable_models_are_refused(change, setting):
  args = dataclasses.replace(
      ModelArgs(vocab_size=100, ctx=16, n_layers=2, d_model=32, n_heads=2, d_head=16, d_ff=128),
      **change)
  with pytest.raises(ValueError, match=setting):
    hf.hf_config_from_args(args)
  with pytest.raises(ValueError, match="cannot be represented"):
    hf.params_to_hf({}, args)


def test_unsupported_hf_configs_are_refused():
  with pytest.raises(ValueError, match="activation_function='relu'"):
    hf.args_from_hf_config(transformers.GPT2Config(activation_function="relu"))
  with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
    hf.args_from_hf_config(transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True))


def test_hub_style_state_dict_loads():
  """The GPT-2 checkpoints on the Hub: no `transformer.` prefix, no lm_head, mask buffers."""
  model = hf_model()
  args, params = hf.load_hf_model(model)
  sd = {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items()
        if k != "lm_head.weight"}
  sd |= {f"h.{l}.attn.{name}": np.zeros((1, 1, 64, 64))
         for l in range(3) for name in ("bias", "masked_bias")}
  jax.tree.map(np.testing.assert_array_equal, hf.params_from_hf(sd, args), params)


def test_mismatched_state_dict_is_refused():
  model = hf_model()
  args = hf.args_from_hf_config(model.config)
  with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.weight.*shape"):
    hf.params_from_hf(model.state_dict(), dataclasses.replace(args, d_ff=256))
  with pytest.raises(ValueError, match="do not use.*h.2"):
    hf.params_from_hf(model.state_dict(), dataclasses.replace(args, n_layers=2))


def test_save_pretrained_and_load_from_local_directory(tmp_path):
  model = hf_model()
  args, params = hf.load_hf_model(model, scan_layers=False)
  hf.to_hf_model(params, args).save_pretrained(tmp_path)
  args_back, params_back = hf.load_hf_model(str(tmp_path), scan_layers=False)
  assert args_back == args
  jax.tree.map(np.testing.assert_array_equal, params_back, params)
  t = tokens()
  assert np.abs(gptjax_logits(args, params_back, t) - hf_logits(model, t)).max() < LOGITS_TOL


def test_core_import_does_not_need_torch():
  code = ("import sys, gptjax.hf; "
          "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extra_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "transformers", None)
  with pytest.raises(ImportError, match=r"pip install 'gptjax\[hf\]'"):
    hf.hf_config_from_args(ModelArgs())


# ---- gradients against torch autograd ----------------------------------------------------------
GRAD_L = 130  # > 2 blocks of 64 queries: the blocked attention path, with a ragged last block
GRAD_VOCAB = 250


def grad_problem(seed: int = 0):
  """A small HF GPT-2 with peaked attention (c_attn weights of std ~0.1, scores of order 1; HF's
  0.02 init leaves attention nearly uniform and its softmax gradient small), and tokens."""
  model = hf_model(seed, n_layer=2, n_embd=32, n_head=2, vocab_size=GRAD_VOCAB,
                   n_positions=GRAD_L + 8, attn_implementation="eager")
  with torch.no_grad():
    for block in model.transformer.h:
      block.attn.c_attn.weight.mul_(5.0)
  t = np.random.default_rng(seed).integers(0, GRAD_VOCAB, (B, GRAD_L), dtype=np.int64)
  return model, t


def torch_grads(model, tokens_BxL: np.ndarray) -> dict[str, "torch.Tensor"]:
  """Gradients of the mean next-token cross-entropy, by torch autograd through transformers."""
  model.zero_grad()
  t = torch.from_numpy(tokens_BxL)
  logits = model(t).logits
  torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                    t[:, 1:].reshape(-1)).backward()
  return {name: p.grad for name, p in model.named_parameters()}


def gptjax_grads(args: ModelArgs, params, tokens_BxL: np.ndarray):
  """The same loss's gradients through gptjax's model and loss, jitted."""
  t = jax.numpy.asarray(tokens_BxL, jax.numpy.int32)

  def loss(p):
    return cross_entropy(GPT(args).apply({"params": p}, t)[:, :-1], t[:, 1:])[0]

  return jax.jit(jax.grad(loss))(params)


def max_scaled_errors(got, want) -> dict[str, float]:
  """max |got - want| / max |want| for each leaf, by its path."""
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  return {jax.tree_util.keystr(path): float(np.abs(np.asarray(flat_got[path]) - w).max()
                                            / np.abs(w).max())
          for path, w in jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, want))[0]}


# Float32 on CPU, torch and XLA summing in different orders. Measured, per leaf,
# max |ours - torch| / max |torch|, largest over the leaves: 7.0e-7 dense and padded
# (mlp/fc/kernel), 8.5e-7 banded (block_0/ln_2/bias).
# A sign flipped in the custom softmax VJP (gptjax/attention_kernels.py `_softmax_bwd`) gives 1.69
# dense and padded (attn/qkv/kernel) and 0.39 banded: the tolerance is 6x the first and far below
# the second.
GRAD_TOL = 5e-6


@pytest.mark.parametrize("pad_vocab_to", [1, 128], ids=["dense", "padded_vocab"])
def test_gradients_match_torch_autograd_through_transformers(pad_vocab_to):
  model, t = grad_problem()
  args, params = hf.load_hf_model(model, pad_vocab_to=pad_vocab_to)
  ours = gptjax_grads(args, params, t)
  # HF's gradients in gptjax's layout (reshapes; padded vocabulary rows are zeros).
  want = hf.params_from_hf(torch_grads(model, t), args)
  errors = max_scaled_errors(ours, want)
  assert len(errors) == 16 and max(errors.values()) < GRAD_TOL, errors
  if pad_vocab_to > 1:
    assert args.padded_vocab == 256
    np.testing.assert_array_equal(ours["wte"]["embedding"][GRAD_VOCAB:], 0.0)


def torch_reference_loss(p, tokens_BxL: np.ndarray, args: ModelArgs) -> "torch.Tensor":
  """Pre-LN GPT loss in plain torch, from unrolled gptjax params (torch tensors), with each layer's
  causal mask written out explicitly, banded where `args.window(l)` says. HF GPT-2 has no banded
  layers; this stands in for it there."""
  fn = torch.nn.functional
  t = torch.from_numpy(tokens_BxL)
  length, d = t.shape[1], args.d_model
  ln = lambda x, q: fn.layer_norm(x, (d,), q["scale"], q["bias"], args.ln_eps)
  x = p["wte"]["embedding"][t] + p["wpe"]["embedding"][:length]
  i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
  for l in range(args.n_layers):
    b, window = p[f"block_{l}"], args.window(l)
    allowed = (j <= i) & ((i - j < window) if window else True)
    qkv = torch.einsum("btd,dsnh->btsnh", ln(x, b["ln_1"]),
                       b["attn"]["qkv"]["kernel"]) + b["attn"]["qkv"]["bias"]
    q, k, v = qkv.unbind(2)
    s = torch.einsum("bqnh,bknh->bnqk", q, k) / args.d_head**0.5
    w = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    o = torch.einsum("bnqk,bknh->bqnh", w, v)
    x = x + torch.einsum("bqnh,nhd->bqd", o, b["attn"]["out"]["kernel"]) + b["attn"]["out"]["bias"]
    f = fn.gelu(ln(x, b["ln_2"]) @ b["mlp"]["fc"]["kernel"] + b["mlp"]["fc"]["bias"],
                approximate="tanh")
    x = x + f @ b["mlp"]["proj"]["kernel"] + b["mlp"]["proj"]["bias"]
  logits = ln(x, p["ln_f"]) @ p["wte"]["embedding"][:args.vocab_size].T
  return fn.cross_entropy(logits[:, :-1].reshape(-1, args.vocab_size), t[:, 1:].reshape(-1))


def test_banded_gradients_match_torch_autograd():
  """GPT-3's alternating dense / locally banded layers (window 40 of 130 tokens), scanned."""
  model, t = grad_problem(seed=1)
  dense_args, unrolled = hf.load_hf_model(model, scan_layers=False, pad_vocab_to=128)
  args = dataclasses.replace(dense_args, attention="alternating", local_window=40,
                             scan_layers=True)
  ours = layout.convert(gptjax_grads(args, layout.convert(unrolled, True, period=2), t), False,
                        period=2)
  leaves = jax.tree.map(lambda x: torch.tensor(np.asarray(x), requires_grad=True), unrolled)
  torch_reference_loss(leaves, t, dataclasses.replace(args, scan_layers=False)).backward()
  errors = max_scaled_errors(ours, jax.tree.map(lambda x: x.grad.numpy(), leaves))
  assert len(errors) == 28 and max(errors.values()) < GRAD_TOL, errors
  np.testing.assert_array_equal(ours["wte"]["embedding"][GRAD_VOCAB:], 0.0)
  # The band matters: the dense model's gradients are far from these.
  dense = gptjax_grads(dense_args, unrolled, t)
  assert max(max_scaled_errors(dense, ours).values()) > 1e-2
