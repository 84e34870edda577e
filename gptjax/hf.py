"""Hugging Face `transformers` GPT-2 interop: import and export weights and configs.

    args, params = load_hf_model("path/to/gpt2")      # a local save_pretrained() folder
    logits_BxLxV = GPT(args).apply({"params": params}, tokens_BxL)
    to_hf_model(params, args).save_pretrained("out/")  # and back

The layouts differ only by reshapes: HF `Conv1D` weights are already [in, out] like Flax kernels,
and `c_attn`'s output axis is q|k|v, each heads-major ([N, H]), i.e. our [3, N, H] flattened.
One table (`_leaf_targets`) says which HF tensors each gptjax leaf becomes, in either layout; it
serves the in-memory export and the streaming one (`export_safetensors`: one leaf in memory at a
time, for models larger than host RAM). Local folders are read one tensor at a time too
(`gptjax.safetensors_io` reads and writes the files).
torch and transformers are imported inside the functions that need them (the `hf` extra), so the
core library works without them; `params_from_hf` and `params_to_hf` need neither.
"""

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from gptjax import layout, safetensors_io
from gptjax.model import ModelArgs

__all__ = ["args_from_hf_config", "hf_config_from_args", "params_from_hf", "params_to_hf",
           "to_hf_model", "load_hf_model", "export_safetensors", "hf_dir_logits", "fixed_tokens"]

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


def _leaf_targets(path: tuple[str, ...], shape: tuple[int, ...],
                  a: ModelArgs) -> list[tuple[str, tuple[int, ...], Callable[[Any], Any]]]:
  """The HF tensors one gptjax leaf becomes: (name, HF shape, leaf -> tensor) for each.

  `path` is the leaf's key path in either layout; a stacked leaf (`layers/block_j/...`, leading axis
  of n_layers / period) gives one tensor per layer. Padded vocabulary rows are dropped.
  """
  v, d = a.vocab_size, a.d_model
  block = {p: (name, hf_shape) for p, name, _, hf_shape in _block_leaves(a)}
  if path == ("wte", "embedding"):
    return [("transformer.wte.weight", (v, d), lambda x: x[:v])]
  if path == ("wpe", "embedding"):
    return [("transformer.wpe.weight", (a.ctx, d), lambda x: x)]
  if path in (("ln_f", "scale"), ("ln_f", "bias")):
    return [(f"transformer.ln_f.{'weight' if path[1] == 'scale' else 'bias'}", (d,), lambda x: x)]
  if path == ("lm_head",):
    return [("lm_head.weight", (v, d), lambda x: x[:, :v].T)]
  if path[0] == "layers" and path[2:] in block:
    name, hf_shape = block[path[2:]]
    j, period = int(path[1].removeprefix("block_")), len(a.pattern)
    return [(f"transformer.h.{g * period + j}.{name}", hf_shape,
             lambda x, g=g: x[g].reshape(hf_shape)) for g in range(shape[0])]
  if path[0].startswith("block_") and path[1:] in block:
    name, hf_shape = block[path[1:]]
    return [(f"transformer.h.{int(path[0].removeprefix('block_'))}.{name}", hf_shape,
             lambda x: x.reshape(hf_shape))]
  raise ValueError(f"parameter {'/'.join(path)} {shape} has no Hugging Face GPT-2 counterpart")


def _hf_names(a: ModelArgs) -> set[str]:
  """Every tensor of a `GPT2LMHeadModel` state dict except a tied `lm_head.weight`."""
  names = {f"transformer.{n}" for n in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
  names |= {f"transformer.h.{l}.{name}" for l in range(a.n_layers)
            for _, name, _, _ in _block_leaves(a)}
  return names if a.tie_embeddings else names | {"lm_head.weight"}


def _check_complete(names, a: ModelArgs) -> None:
  missing, extra = sorted(_hf_names(a) - set(names)), sorted(set(names) - _hf_names(a))
  if missing or extra:
    raise ValueError(f"the params do not match the model args (n_layers={a.n_layers}, "
                     f"tie_embeddings={a.tie_embeddings}): missing {missing[:8]}, "
                     f"unexpected {extra[:8]}")


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
  if a.output_mult != 1.0 or a.query_scale != 1.0:
    problems.append(f"parametrization='mup' at width multiplier {a.width_mult:g}: HF GPT-2 has no "
                    "logit multiplier (1/m) nor µP's 1/d_head attention scale (export the base "
                    "width, or train with model.parametrization='sp')")
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
    x = safetensors_io.to_numpy(sd[name])
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
  sd = {}
  for path, x in traverse_util.flatten_dict(nn.meta.unbox(dict(params))).items():
    x = np.asarray(jax.device_get(x), np.float32)
    for name, hf_shape, fn in _leaf_targets(path, x.shape, args):
      sd[name] = np.array(fn(x), np.float32, order="C")  # a copy: torch must not alias jax's
      if sd[name].shape != hf_shape:
        raise ValueError(f"{'/'.join(path)} gives {name} of shape {sd[name].shape}, expected "
                         f"{hf_shape} from the model args")
  _check_complete(sd, args)
  if args.tie_embeddings:
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
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
      `save_pretrained` (never downloads). A folder's safetensors are read one tensor at a time.
    scan_layers: params layout and `ModelArgs.scan_layers`.
    pad_vocab_to: round the vocabulary up to a multiple of this (e.g. 128 for TPU/GPU tiling).
  """
  if hasattr(model_or_dir, "state_dict"):
    config, state_dict = model_or_dir.config, model_or_dir.state_dict()
  else:
    _, transformers = _require_hf()
    config = transformers.GPT2Config.from_pretrained(model_or_dir, local_files_only=True)
    state_dict = safetensors_io.SafetensorsDir(model_or_dir)
    if not state_dict:  # e.g. only pytorch_model.bin: let transformers read it
      state_dict = transformers.GPT2LMHeadModel.from_pretrained(
          model_or_dir, local_files_only=True).state_dict()
  args = args_from_hf_config(config, pad_vocab_to=pad_vocab_to, scan_layers=scan_layers)
  return args, params_from_hf(state_dict, args)


def export_safetensors(stored: Mapping[str, Any], read: Callable[[tuple[str, ...]], np.ndarray],
                       args: ModelArgs, out_dir: str, dtype: str = "float32",
                       **config_kwargs) -> str:
  """Writes a GPT-2 folder (`config.json`, `model.safetensors`), one gptjax leaf in memory at once.

  Args:
    stored: the params' structure, either layout: a tree of anything with `.shape` (e.g. a
      checkpoint's `ArrayMetadata`, or the arrays themselves).
    read: returns the leaf at a key path as a numpy array (e.g. `checkpoint.Reader.read`).
    args: the model; must be representable by HF GPT-2 (see `hf_config_from_args`).
    out_dir: the folder to write (created); `from_pretrained(out_dir)` loads it.
    dtype: 'float32' or 'bfloat16' tensors in the file.
    **config_kwargs: extra `GPT2Config` fields.

  Returns:
    The path of the safetensors file.
  """
  config = hf_config_from_args(args, **config_kwargs)
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  plan = {path: _leaf_targets(path, tuple(leaf.shape), args)
          for path, leaf in traverse_util.flatten_dict(dict(stored)).items()}
  specs = {name: (hf_shape, np_dtype) for targets in plan.values() for name, hf_shape, _ in targets}
  _check_complete(specs, args)
  os.makedirs(out_dir, exist_ok=True)
  config.save_pretrained(out_dir)
  path = os.path.join(out_dir, "model.safetensors")
  with safetensors_io.SafetensorsWriter(path, specs) as writer:
    for leaf_path, targets in plan.items():
      x = np.asarray(read(leaf_path)).astype(np.float32, copy=False)
      for name, _, fn in targets:
        writer.write(name, fn(x).astype(np_dtype, copy=False))
      del x
  return path


def fixed_tokens(args: ModelArgs, batch: int = 2, length: int = 32, seed: int = 0) -> np.ndarray:
  """A few fixed token sequences [batch, min(length, ctx)] to compare logits on."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, args.vocab_size, (batch, min(length, args.ctx)), dtype=np.int32)


def hf_dir_logits(hf_dir: str, tokens_BxL: np.ndarray,
                  bfloat16_weights: bool = False) -> np.ndarray:
  """Float32 logits [B, L, V] of a local GPT-2 folder, computed by transformers in float32.

  Args:
    hf_dir: a folder with config.json and weights.
    tokens_BxL: int token ids.
    bfloat16_weights: round the weights to bfloat16 first (to compare with a bfloat16 export).
  """
  torch, transformers = _require_hf()
  model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True,
                                                       dtype=torch.float32).eval()
  if bfloat16_weights:
    model = model.to(torch.bfloat16).float()
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens_BxL, np.int64))).logits.numpy()
