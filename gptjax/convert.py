"""Converts checkpoints: gptjax -> Hugging Face GPT-2 (`to_hf`), Hugging Face GPT-2 -> gptjax
(`from_hf`), and gptjax -> params-only gptjax, with no optimizer state, for serving (`params_only`).

    convert.to_hf("runs/x", None, "hf/x", dtype="bfloat16")     # latest step
    convert.from_hf("hf/x", "runs/imported", scan_layers=False)
    convert.params_only("runs/x", None, "runs/serve", dtype="bfloat16")

scripts/convert.py is their command line. `to_hf` streams: one array of the checkpoint is in memory
at a time, so a model larger than host RAM converts. Every conversion is checked before success is
reported: the HF ones compare logits on fixed inputs in both frameworks (`atol` + `rtol` x the
largest logit), `params_only` compares every array; a mismatch raises `ConversionError`. The check
itself holds one copy of the model in memory at a time (skip it with `verify=False`). A gptjax
output is a workdir (`config.json`, `checkpoints/<step>/`) that `--config.checkpoint.restore_from`
and these functions accept. Progress goes to stdout as `convert: ...` lines.
"""

import ctypes
import dataclasses
import os
from collections.abc import Callable
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

import configs
from gptjax import checkpoint, hf, layout, run
from gptjax.errors import ConfigError
from gptjax.model import GPT, ModelArgs

__all__ = ["ConversionError", "to_hf", "from_hf", "params_only", "model_args", "gptjax_logits",
           "compare_logits"]


class ConversionError(RuntimeError):
  """The converted weights do not reproduce the source model."""


def _check_out(out: str) -> str:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConfigError(f"--out={out!r} is not an empty folder; choose a new one (or empty it).")
  return out


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
  return np.asarray(x).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32,
                              copy=False)


def _map_in_place(tree: dict, fn: Callable[[Any], Any]) -> dict:
  """Replaces every leaf of nested dicts by fn(leaf), one at a time: each old leaf is freed as its
  replacement is made, so two copies of a model never coexist."""
  for k, v in tree.items():
    tree[k] = _map_in_place(v, fn) if isinstance(v, dict) else fn(v)
  return tree


def _release_freed_memory() -> None:
  """Hands freed heap pages back to the OS: glibc keeps them, and the next model (in the other
  framework) would be allocated beside them rather than in them."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


def _load_params(reader: checkpoint.Reader, step: int, dtype: str) -> dict:
  """A checkpoint's params as float32 jax arrays, rounded through `dtype`; read one array at a
  time, so the host holds one copy of the model (plus one array in flight)."""
  keys = traverse_util.flatten_dict(reader.tree(step))
  return traverse_util.unflatten_dict({
      k: jnp.asarray(_cast(reader.read(step, k), dtype).astype(np.float32, copy=False))
      for k in keys})


def model_args(config: dict, params_tree) -> ModelArgs:
  """The model a config describes, in the layout of `params_tree`, computing in float32 with XLA."""
  args = ModelArgs.from_config(ml_collections.ConfigDict(config["model"]))
  return dataclasses.replace(args, scan_layers=layout.is_scanned(params_tree), remat="none",
                             dtype=jnp.float32, attention_impl="xla")


def gptjax_logits(args: ModelArgs, params, tokens_BxL: np.ndarray) -> np.ndarray:
  """The model's logits on `tokens_BxL` as numpy, without the padded vocabulary columns."""
  logits = jax.jit(GPT(args).apply)({"params": params}, tokens_BxL)
  return np.asarray(logits)[..., :args.vocab_size]


def compare_logits(ours: np.ndarray, theirs: np.ndarray, atol: float, rtol: float,
                   what: str) -> float:
  """Raises ConversionError unless max |ours - theirs| <= atol + rtol * max |theirs|."""
  err, tol = float(np.abs(ours - theirs).max()), atol + rtol * float(np.abs(theirs).max())
  print(f"convert: logits on {ours.shape[0]}x{ours.shape[1]} fixed tokens: max abs error "
        f"{err:.3g} (tolerance {tol:.3g})", flush=True)
  if not err <= tol:
    raise ConversionError(f"{what} does not reproduce the source model: max abs logit error "
                          f"{err:.3g} > tolerance {tol:.3g}. The written files are wrong; do not "
                          "use them.")
  return err


def _source_config(reader: checkpoint.Reader, step: int) -> dict:
  config, where = run.checkpoint_config(reader, step)
  if config is None:
    raise ValueError(f"{reader.directory} step {step} records no config and its workdir has no "
                     "config.json, so its model is unknown.")
  print(f"convert: model config from {where}", flush=True)
  return config


def to_hf(workdir: str, step: int | None, out: str, dtype: str = "float32", verify: bool = True,
          atol: float = 1e-4, rtol: float = 1e-5) -> float | None:
  """gptjax checkpoint -> HF folder. Returns the max abs logit error (None if not verified).

  Raises:
    ConfigError: `out` is not an empty folder.
    ValueError: the model cannot be represented as a HF GPT-2 (before anything is written), or the
      checkpoint records no config.
    ConversionError: the export does not reproduce the checkpoint's logits.
  """
  reader = checkpoint.Reader(workdir)
  step, out = reader.resolve(step), _check_out(out)
  stored = reader.tree(step)
  args = model_args(_source_config(reader, step), stored)
  hf.hf_config_from_args(args)  # refuses what GPT-2 cannot represent, before anything is written
  path = hf.export_safetensors(stored, lambda keys: reader.read(step, keys), args, out, dtype)
  print(f"convert: wrote {path} ({os.path.getsize(path) / 2**20:,.1f} MiB, {dtype})", flush=True)
  if not verify:
    return None
  tokens = hf.fixed_tokens(args)
  params = _load_params(reader, step, dtype)
  ours = gptjax_logits(args, params, tokens)
  del params  # one model in memory at a time
  _release_freed_memory()
  theirs = hf.hf_dir_logits(out, tokens)
  return compare_logits(ours, theirs, atol, rtol, f"the export in {out}")


def from_hf(hf_dir: str, out: str, scan_layers: bool = True, pad_vocab_to: int = 128,
            dtype: str = "float32", verify: bool = True, atol: float = 1e-4,
            rtol: float = 1e-5) -> float | None:
  """HF folder -> params-only gptjax workdir (step 0). Returns the max abs logit error (None if not
  verified).

  The workdir's config is the base preset (`configs.load("base")`, what a fresh run starts from)
  with the imported model's settings, and the folder's GPT-2 BPE tokenizer when it has one.

  Raises:
    ConfigError: `out` is not an empty folder.
    ConversionError: the import does not reproduce the HF model's logits.
  """
  _check_out(out)
  args, params = hf.load_hf_model(hf_dir, scan_layers=scan_layers, pad_vocab_to=pad_vocab_to)
  cfg = configs.load("base")
  for f in dataclasses.fields(args):
    if f.name in cfg.model and f.name not in ("dtype", "attention_impl", "remat"):
      cfg.model[f.name] = getattr(args, f.name)
  cfg.name = f"hf:{os.path.basename(os.path.abspath(hf_dir))}"
  if all(os.path.exists(os.path.join(hf_dir, f)) for f in ("vocab.json", "merges.txt")):
    cfg.data.tokenizer.update(kind="gpt2_bpe", path=os.path.abspath(hf_dir))
  params = _map_in_place(params, lambda x: _cast(x, dtype))
  config = checkpoint.config_json(cfg)
  run.save_params(out, 0, params, {"step": 0, "tokens": 0, "config": config,
                                   "source": os.path.abspath(hf_dir)})
  print(f"convert: wrote {out}/checkpoints/0 (params only, {dtype}) and {out}/config.json",
        flush=True)
  del params
  _release_freed_memory()
  if not verify:
    return None
  reader = checkpoint.Reader(out)
  written = _load_params(reader, 0, dtype)
  tokens = hf.fixed_tokens(args)
  ours = gptjax_logits(model_args(config, written), written, tokens)
  del written
  _release_freed_memory()
  theirs = hf.hf_dir_logits(hf_dir, tokens, bfloat16_weights=dtype == "bfloat16")
  return compare_logits(ours, theirs, atol, rtol, f"the import in {out}")


def params_only(workdir: str, step: int | None, out: str, dtype: str = "float32",
                verify: bool = True) -> float | None:
  """gptjax checkpoint -> params-only gptjax workdir (same step). Returns 0.0 once verified (None
  if not verified).

  Raises:
    ConfigError: `out` is not an empty folder.
    ValueError: the checkpoint records no config.
    ConversionError: an array written differs from the source's (cast to `dtype`).
  """
  reader = checkpoint.Reader(workdir)
  step, out = reader.resolve(step), _check_out(out)
  meta = reader.meta(step)
  meta = {"step": meta["step"], "tokens": meta.get("tokens", 0),
          "config": _source_config(reader, step), "source": reader.path(step)}
  params = _map_in_place(reader.read_all(step), lambda x: _cast(x, dtype))
  run.save_params(out, step, params, meta)
  del params
  print(f"convert: wrote {out}/checkpoints/{step} (params only, {dtype})", flush=True)
  if not verify:
    return None
  written = checkpoint.Reader(out)
  for keys in traverse_util.flatten_dict(reader.tree(step)):
    a, b = _cast(reader.read(step, keys), dtype), written.read(step, keys)
    if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b):
      raise ConversionError(f"{'/'.join(keys)} differs after the export to {out}; do not use it.")
  print(f"convert: every array equals the source's (cast to {dtype})", flush=True)
  return 0.0
