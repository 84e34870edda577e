"""Hugging Face `transformers` GPT-2 interop: import and export weights and configs.

    args, params = load_hf_model("path/to/gpt2")      # a local save_pretrained() folder
    logits_BxLxV = GPT(args).apply({"params": params}, tokens_BxL)
    to_hf_model(params, args).save_pretrained("out/")  # and back

The layouts differ only by reshapes: HF `Conv1D` weights are already [in, out] like Flax kernels,
and `c_attn`'s output axis is q|k|v, each heads-major ([N, H]), i.e. our [3, N, H] flattened.
torch and transformers are imported inside the functions that need them (the `hf` extra), so the
core library works without them; `params_from_hf` and `params_to_hf` need neither.
"""

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gptjax import layout
from gptjax.model import ModelArgs

__all__ = ["args_from_hf_config", "hf_config_from_args", "params_from_hf", "params_to_hf",
           "to_hf_model", "load_hf_model"]

_HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # = jax.nn.gelu(approximate=True)
_BUFFER = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # mask buffers of older transformers


def _require_hf():
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "gptjax.hf needs torch and transformers: pip install 'gptjax[hf]' "
        f"(missing: {e.name})") from e
  return torch, transformers


def _block_leaves(a: ModelArgs):
  """(gptjax path inside a block, HF name inside `h.{l}.`, gptjax shape, HF shape) per leaf."""
  d, n, h, f = a.d_model, a.n_heads, a.d_head, a.d_ff
  leaves = []
  for ln in ("ln_1", "ln_2"):
    leaves += [((ln, "scale"), f"{ln}.weight", (d,), (d,)),
               ((ln, "bias"), f"{ln}.bias", (d,), (d,))]
  return leaves + [
      (("attn", "qkv", "kernel"), "attn.c_attn.weight", (d, 3, n, h), (d, 3 * n * h)),
      (("attn", "qkv", "bias"), "attn.c_attn.bias", (3, n, h), (3 * n * h,)),
      (("attn", "out", "kernel"), "attn.c_proj.weight", (n, h, d), (n * h, d)),
      (("attn", "out", "bias"), "attn.c_proj.bias", (d,), (d,)),
      (("mlp", "fc", "kernel"), "mlp.c_fc.weight", (d, f), (d, f)),
      (("mlp", "fc", "bias"), "mlp.c_fc.bias", (f,), (f,)),
      (("mlp", "proj", "kernel"), "mlp.c_proj.weight", (f, d), (f, d)),
      (("mlp", "proj", "bias"), "mlp.c_proj.bias", (d,), (d,)),
  ]


def _hf_incompatibilities(a: ModelArgs) -> list[str]:
  problems = []
  if a.norm != "pre":
    problems.append(f"norm={a.norm!r}: HF GPT-2 is pre-LN only (set model.norm='pre')")
  if a.attention != "dense":
    problems.append(f"attention={a.attention!r}: HF GPT-2 has no locally banded layers "
                    "(set model.attention='dense')")
  if a.n_heads * a.d_head != a.d_model:
    problems.append(f"n_heads * d_head = {a.n_heads} * {a.d_head} != d_model = {a.d_model}: "
                    "HF GPT-2 derives d_head as d_model // n_heads (set model.d_head=0)")
  return problems


def _check_representable(a: ModelArgs) -> None:
  problems = _hf_incompatibilities(a)
  if problems:
    raise ValueError("This model cannot be represented as a Hugging Face GPT-2:\n  "
                     + "\n  ".join(problems))


def args_from_hf_config(hf_config, *, pad_vocab_to: int = 1, scan_layers: bool = True) -> ModelArgs:
  """The `ModelArgs` of a Hugging Face `GPT2Config`.

  Args:
    hf_config: a `transformers.GPT2Config` (or any object with its attributes).
    pad_vocab_to: round the embedding rows up to a multiple of this (1 = the exact vocabulary).
    scan_layers: stack the blocks for `nn.scan` (True) or unroll them (False).

  Returns:
    ModelArgs of the same network. Runtime-only fields (remat, dtype, attention_impl) keep their
    defaults; change them with `dataclasses.replace`.

  Raises:
    ValueError: the config uses a feature gptjax does not implement.
  """
  c = hf_config
  problems = []
  if getattr(c, "model_type", "gpt2") != "gpt2":
    problems.append(f"model_type={c.model_type!r}: only GPT-2 configs are supported")
  if c.activation_function not in _HF_ACTIVATIONS:
    problems.append(f"activation_function={c.activation_function!r}: gptjax uses the tanh GELU "
                    f"({' or '.join(_HF_ACTIVATIONS)})")
  if not getattr(c, "scale_attn_weights", True):
    problems.append("scale_attn_weights=False: gptjax always scales scores by 1/sqrt(d_head)")
  if getattr(c, "scale_attn_by_inverse_layer_idx", False):
    problems.append("scale_attn_by_inverse_layer_idx=True is not implemented in gptjax")
  if getattr(c, "add_cross_attention", False):
    problems.append("add_cross_attention=True: gptjax is decoder-only")
  if c.n_embd % c.n_head:
    problems.append(f"n_embd={c.n_embd} is not a multiple of n_head={c.n_head}")
  if problems:
    raise ValueError("Unsupported GPT-2 config:\n  " + "\n  ".join(problems))
  return ModelArgs(
      vocab_size=c.vocab_size, pad_vocab_to=pad_vocab_to, ctx=c.n_positions, n_layers=c.n_layer,
      d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
      d_ff=c.n_inner or 4 * c.n_embd, norm="pre", ln_eps=c.layer_norm_epsilon,
      tie_embeddings=getattr(c, "tie_word_embeddings", True), attention="dense",
      embd_dropout=c.embd_pdrop, attn_dropout=c.attn_pdrop, resid_dropout=c.resid_pdrop,
      init_std=c.initializer_range, scan_layers=scan_layers)


def hf_config_from_args(args: ModelArgs, **config_kwargs):
  """The `transformers.GPT2Config` of a gptjax model.

  Args:
    args: the model; must be pre-LN, dense attention, with n_heads * d_head == d_model. Untied
      embeddings and any d_ff (HF `n_inner`) are fine.
    **config_kwargs: extra `GPT2Config` fields, e.g. bos_token_id / eos_token_id of your tokenizer
      (by default GPT-2's 50256 when it is in the vocabulary, else None).

  Raises:
    ValueError: naming every setting that HF GPT-2 cannot represent.
  """
  _check_representable(args)
  _, transformers = _require_hf()
  special = 50256 if args.vocab_size > 50256 else None
  kwargs = dict(
      vocab_size=args.vocab_size, n_positions=args.ctx, n_embd=args.d_model, n_layer=args.n_layers,
      n_head=args.n_heads, n_inner=None if args.d_ff == 4 * args.d_model else args.d_ff,
      activation_function="gelu_new", layer_norm_epsilon=args.ln_eps,
      resid_pdrop=args.resid_dropout, embd_pdrop=args.embd_dropout, attn_pdrop=args.attn_dropout,
      initializer_range=args.init_std, tie_word_embeddings=args.tie_embeddings,
      bos_token_id=special, eos_token_id=special)
  return transformers.GPT2Config(**(kwargs | config_kwargs))


def _to_numpy(x) -> np.ndarray:
  """A torch tensor, jax array or numpy array as float32 numpy."""
  if hasattr(x, "detach"):  # torch; bfloat16 has no numpy dtype
    x = x.detach().cpu()
    x = x.float() if x.is_floating_point() else x
    x = x.numpy()
  return np.asarray(x, dtype=np.float32)


def params_from_hf(state_dict: Mapping[str, Any], args: ModelArgs) -> dict[str, Any]:
  """gptjax params from a GPT-2 state dict.

  Args:
    state_dict: `GPT2LMHeadModel.state_dict()` or `GPT2Model.state_dict()` (with or without the
      `transformer.` prefix); values are torch tensors or numpy/jax arrays of any float dtype.
    args: the target model, e.g. from `args_from_hf_config`; decides the vocabulary padding and the
      layout (stacked under `layers/block_0` if `scan_layers`, else `block_{l}`).

  Returns:
    Plain (unboxed) float32 jax arrays with the structure of
    `nn.meta.unbox(GPT(args).init(...)["params"])`; padded vocabulary rows are zero.

  Raises:
    ValueError: a missing, misshapen or unused weight, or an untied lm_head for tied args.
  """
  sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
  used = {k for k in sd if _BUFFER.search(k)}

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in sd:
      raise ValueError(f"state_dict has no {name!r} (args: n_layers={args.n_layers})")
    x = _to_numpy(sd[name])
    if x.shape != shape:
      raise ValueError(f"state_dict[{name!r}] has shape {x.shape}, expected {shape} from args "
                       f"(vocab_size={args.vocab_size}, ctx={args.ctx}, d_model={args.d_model}, "
                       f"n_heads={args.n_heads}, d_head={args.d_head}, d_ff={args.d_ff})")
    used.add(name)
    return x

  v, vpad, d = args.vocab_size, args.padded_vocab, args.d_model
  wte_VxD = get("wte.weight", (v, d))
  flat = {("wte", "embedding"): np.pad(wte_VxD, ((0, vpad - v), (0, 0))),
          ("wpe", "embedding"): get("wpe.weight", (args.ctx, d))}
  for l in range(args.n_layers):
    for path, name, shape, hf_shape in _block_leaves(args):
      flat[(f"block_{l}",) + path] = get(f"h.{l}.{name}", hf_shape).reshape(shape)
  if args.norm == "pre":
    flat[("ln_f", "scale")] = get("ln_f.weight", (d,))
    flat[("ln_f", "bias")] = get("ln_f.bias", (d,))
  if args.tie_embeddings:
    if "lm_head.weight" in sd:
      if not np.array_equal(get("lm_head.weight", (v, d)), wte_VxD):
        raise ValueError("lm_head.weight differs from wte.weight but args.tie_embeddings=True; "
                         "use tie_embeddings=False (HF config tie_word_embeddings=False)")
  else:
    lm_head_VxD = get("lm_head.weight", (v, d))
    flat[("lm_head",)] = np.pad(lm_head_VxD.T, ((0, 0), (0, vpad - v)))
  unused = sorted(set(sd) - used)
  if unused:
    raise ValueError(f"state_dict has weights that args do not use: {unused[:8]}"
                     f"{' ...' if len(unused) > 8 else ''} "
                     "(check n_layers / norm / tie_embeddings)")
  params = layout.convert(traverse_util.unflatten_dict(flat), args.scan_layers, len(args.pattern))
  return jax.tree.map(jnp.asarray, params)


def params_to_hf(params: Mapping[str, Any], args: ModelArgs) -> dict[str, np.ndarray]:
  """A `GPT2LMHeadModel` state dict (float32 numpy, vocabulary padding removed) from gptjax params.

  Args:
    params: the model's params (boxed or not, scanned or unrolled layout), fully addressable from
      this process (on multi-host meshes, gather them first).
    args: the model; must be representable by HF GPT-2 (see `hf_config_from_args`).

  Returns:
    `transformer.*` weights and `lm_head.weight` (the same array as `transformer.wte.weight` when
    tied). No attention-mask buffers: a fresh HF model already has them (see `to_hf_model`).
  """
  _check_representable(args)
  p = layout.unstack(nn.meta.unbox(dict(params)), len(args.pattern))
  flat = traverse_util.flatten_dict(p)

  def host(*path: str) -> np.ndarray:  # a writable float32 copy: torch must not alias jax buffers
    return np.array(jax.device_get(flat[path]), np.float32, order="C")

  v = args.vocab_size
  sd = {"transformer.wte.weight": host("wte", "embedding")[:v],
        "transformer.wpe.weight": host("wpe", "embedding")}
  for l in range(args.n_layers):
    for path, name, _, hf_shape in _block_leaves(args):
      sd[f"transformer.h.{l}.{name}"] = host(f"block_{l}", *path).reshape(hf_shape)
  sd["transformer.ln_f.weight"] = host("ln_f", "scale")
  sd["transformer.ln_f.bias"] = host("ln_f", "bias")
  sd["lm_head.weight"] = (sd["transformer.wte.weight"] if args.tie_embeddings
                          else np.ascontiguousarray(host("lm_head")[:, :v].T))
  return sd


def to_hf_model(params: Mapping[str, Any], args: ModelArgs, **config_kwargs):
  """A `transformers.GPT2LMHeadModel` (float32, eval mode) holding the gptjax params.

  Args:
    params: as for `params_to_hf`.
    args: as for `hf_config_from_args`.
    **config_kwargs: extra `GPT2Config` fields (e.g. bos_token_id, eos_token_id).
  """
  config = hf_config_from_args(args, **config_kwargs)
  torch, transformers = _require_hf()
  model = transformers.GPT2LMHeadModel(config).float()
  sd = {k: torch.from_numpy(x) for k, x in params_to_hf(params, args).items()}
  # Older transformers keep the causal mask as persistent `attn.bias` buffers: keep the model's own.
  sd |= {k: x for k, x in model.state_dict().items() if _BUFFER.search(k)}
  model.load_state_dict(sd, strict=True)
  return model.eval()


def load_hf_model(model_or_dir, *, scan_layers: bool = True,
                  pad_vocab_to: int = 1) -> tuple[ModelArgs, dict[str, Any]]:
  """(args, params) of a Hugging Face GPT-2.

  Args:
    model_or_dir: a `GPT2LMHeadModel` / `GPT2Model` instance, or a local folder written by
      `save_pretrained` (never downloads: `local_files_only=True`).
    scan_layers: params layout and `ModelArgs.scan_layers`.
    pad_vocab_to: round the vocabulary up to a multiple of this (e.g. 128 for TPU/GPU tiling).
  """
  model = model_or_dir
  if not hasattr(model, "state_dict"):
    _, transformers = _require_hf()
    model = transformers.GPT2LMHeadModel.from_pretrained(model_or_dir, local_files_only=True)
  args = args_from_hf_config(model.config, pad_vocab_to=pad_vocab_to, scan_layers=scan_layers)
  return args, params_from_hf(model.state_dict(), args)


