"""Weight quantization with Qwix: post-training (PTQ) for serving, and quantization-aware training.

Every `Linear` layer (attention `qkv`/`out`, MLP `fc`/`proj`) is quantized through Qwix's
interception of its `jax.lax.dot_general`: int8 with one scale per output channel, or int4 (or
int8) with one scale per `group_size` weights along the contraction axis (for `attn/out`, whose
contraction is (heads, d_head), per head and per group along d_head).

    spec = quantize.Spec(bits=4, group_size=64, embeddings=True)
    qmodel, qparams = quantize.quantize(model, params, spec)
    quantize.save("runs/x-int4", qparams, spec, cfg, source="runs/x")  # Orbax, + config, tokenizer
    q = quantize.load("runs/x-int4")            # Quantized(cfg, tokenizer, model, params, spec)
    new = generate.generate(q.model, q.params, [[464]], 32)
    with quantize.routing():                    # see `routing`: needed by gptjax.evaluate
      ppl = evaluate.perplexity(evaluate.Scorer(q.model, q.tokenizer), q.params, docs)

Embeddings (`wte`, `wpe`, an untied `lm_head`) are read by a gather, which Qwix does not
intercept, and the tied output projection reads `wte` too. With `embeddings=True` they are stored
as Qwix `QArray`s (int8 per row, or grouped along d_model) and dequantized where the model reads
the parameter, inside the same jitted function: the storage shrinks, the gather and the output
matmul run in the compute dtype.

QAT: `qat_loss(loss_fn, spec)` wraps a train-step objective (`gptjax.train.LossFn`) so that the
student model it applies is Qwix's QT model: every Linear sees fake-quantized weights (and, with
`activations`, int8 inputs quantized per token) in the forward pass, with straight-through
gradients. The parameters and optimizer state are unchanged, so QAT works with every scan, remat
and sharding layout of the plain step; `config.compress.qat` switches it on.
"""

import contextlib
import dataclasses
import threading
import weakref
from typing import Any

import flax
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

try:
  import qwix
  # WithAux (a quantized weight with how it was quantized) is Qwix's PTQ leaf type; Qwix's own
  # contrib providers extend it the same way.
  from qwix._src.providers import ptq as qwix_ptq
except ImportError as e:  # an optional dependency
  raise ImportError("gptjax.quantize needs Qwix: pip install -e '.[compress]'") from e

from gptjax import checkpoint, run as run_lib, sharding
from gptjax.errors import ConfigError
from gptjax.data import tokenizer as tokenizer_lib
from gptjax.model import GPT, ModelArgs

from gptjax.quantize_spec import LINEARS, METHODS, QTYPES, Spec  # noqa: F401  (re-exported)

_OUT = r"(.*/)?attn/out"
_TABLES = ("embedding", "lm_head")  # parameter names of the embedding tables


def _tile(spec: Spec, args: ModelArgs, out_layer: bool):
  """Qwix `tile_size` of a Linear: None (per channel), or groups along the contraction axis."""
  if not spec.group_size:
    return None
  if out_layer:  # kernel [N, H, D] contracts (N, H): a scale per head and per group along H
    return {0: 1, 1: min(spec.group_size, args.d_head)}
  return spec.group_size


def rules(spec: Spec, args: ModelArgs, rule_type=qwix.QuantizationRule) -> list:
  """Qwix rules for the Linear layers (`attn/out` first: its contraction spans two axes)."""
  qtype = QTYPES[spec.bits]
  act = jnp.int8 if spec.activations else None
  return [rule_type(module_path=path, op_names=("dot_general",), weight_qtype=qtype,
                    act_qtype=act, tile_size=_tile(spec, args, out))
          for path, out in ((_OUT, True), (LINEARS, False))]


# ---- PTQ ----------------------------------------------------------------------------------------
@flax.struct.dataclass
class _Weight(qwix_ptq.WithAux):
  """A quantized kernel as the model reads it: `astype` casts the dequantized dtype.

  (`Linear` casts its kernel to the compute dtype before the matmul; Qwix's WithAux.astype only
  handles boxed arrays, not the unboxed QArray that `apply` sees.)
  """

  def astype(self, dtype):
    return self.replace(array=self.array.astype(dtype))


class _PtqProvider(qwix.PtqProvider):
  """Qwix PTQ, plus embedding tables stored as QArrays and dequantized where they are read."""

  def nn_param(self, module: nn.Module, name: str, *args, **kwargs):
    stored = module.get_variable("params", name)
    if isinstance(stored, qwix.QArray):
      return qwix.dequantize(nn.unbox(stored))
    value = super().nn_param(module, name, *args, **kwargs)
    return _Weight(value.array, value.how) if isinstance(value, qwix_ptq.WithAux) else value


_QUANTIZED = weakref.WeakSet()  # model classes made by `quantized_model`


def quantized_model(model: GPT, spec: Spec) -> GPT:
  """The GPT whose Linear layers run on Qwix-quantized weights (give it `quantize_params`)."""
  spec.check(model.args)
  qmodel = qwix.quantize_model(model, _PtqProvider(rules(spec, model.args)), methods=METHODS)
  _QUANTIZED.add(type(qmodel))
  return qmodel


def _table_axes(path: tuple[str, ...]) -> tuple[int, int]:
  """(row axis, feature axis) of an embedding table: [V or ctx, D]; an untied head is [D, V]."""
  return (1, 0) if path[-1] == "lm_head" else (0, 1)


def _quantize_table(x: jax.Array, spec: Spec, path: tuple[str, ...]) -> qwix.QArray:
  row, feature = _table_axes(path)
  tiles = {feature: spec.group_size} if spec.group_size else None
  return qwix.quantize(x, QTYPES[spec.bits], channelwise_axes=(row,), tiled_axes=tiles)


def _is_table(path: tuple[str, ...], spec: Spec) -> bool:
  return spec.embeddings and path[-1] in _TABLES


def abstract_params(qmodel: GPT, spec: Spec) -> Any:
  """The quantized parameter tree as ShapeDtypeStructs, boxed with logical axes (for shardings).

  Raises:
    ConfigError: a Linear kernel that Qwix did not intercept (it would silently stay float).
  """
  length = min(qmodel.args.ctx, 8)
  boxed = jax.eval_shape(
      lambda rng: qmodel.init(rng, jnp.zeros((1, length), jnp.int32))["params"],
      jax.random.key(0))
  flat = flax.traverse_util.flatten_dict(boxed)
  missed = ["/".join(p) for p, v in flat.items()
            if p[-1] == "kernel" and not isinstance(v, qwix_ptq.WithAux)]
  if missed:
    raise ConfigError(f"quantize: Qwix intercepted no dot_general for {', '.join(missed)}, so "
                      "these layers cannot be quantized (Qwix quantizes jax.lax.dot_general and "
                      "jnp.einsum calls inside the model's methods only).")
  for path, v in flat.items():
    if _is_table(path, spec):
      q = jax.eval_shape(lambda x, p=path: _quantize_table(x, spec, p), v.value)
      row, _ = _table_axes(path)
      scale_names = tuple(n if i == row else None for i, n in enumerate(v.names))
      flat[path] = qwix.QArray(qvalue=v.replace_boxed(q.qvalue),
                               scale=nn.LogicallyPartitioned(q.scale, scale_names),
                               qtype=q.qtype)
  return flax.traverse_util.unflatten_dict(flat)


def quantize_params(params: Any, qmodel: GPT, spec: Spec) -> Any:
  """Quantizes float parameters for `qmodel` (jit it with out_shardings to place them).

  Kernels are quantized as Qwix recorded for each Linear (per layer, also when the layers are
  stacked by nn.scan); embedding tables too if `spec.embeddings`; the rest stays as it is.
  """
  abstract = flax.traverse_util.flatten_dict(abstract_params(qmodel, spec))
  out = {}
  for path, x in flax.traverse_util.flatten_dict(params).items():
    a = abstract[path]
    if isinstance(a, qwix_ptq.WithAux):
      how = a.how

      def one(w, how=how):
        return qwix.quantize(w, how.qtype, channelwise_axes=how.channelwise_axes,
                             tiled_axes=how.tiled_axes,
                             calibration_method=how.calibration_method)

      # Under nn.scan Qwix saw one layer's kernel: quantize the stacked ones layer by layer.
      stacked = qmodel.args.scan_layers and path[0] == "layers"
      out[path] = qwix_ptq.WithAux((jax.vmap(one) if stacked else one)(x), how)
    elif _is_table(path, spec):
      out[path] = _quantize_table(x, spec, path)
    else:
      out[path] = x
  return flax.traverse_util.unflatten_dict(out)


def quantize(model: GPT, params: Any, spec: Spec) -> tuple[GPT, Any]:
  """(quantized model, quantized params) from a float model and its parameters."""
  qmodel = quantized_model(model, spec)
  return qmodel, jax.jit(lambda p: quantize_params(p, qmodel, spec))(params)


_ROUTE = threading.local()


def _route(next_fun, args, kwargs, context):
  module = context.module
  if (getattr(_ROUTE, "inside", False) or context.method_name not in METHODS
      or type(module) not in _QUANTIZED):
    return next_fun(*args, **kwargs)
  _ROUTE.inside = True
  try:  # the quantized class's own (intercepted) method
    return getattr(module, context.method_name)(*args, **kwargs)
  finally:
    _ROUTE.inside = False


@contextlib.contextmanager
def routing():
  """Routes `model.apply(..., method=GPT.hidden)`-style calls through Qwix.

  Qwix wraps the quantized model's methods; a caller that passes the base class's function
  (`method=GPT.hidden`, `method=GPT.logits`, as `gptjax.evaluate.score_batch` does) would bypass
  it. Inside this context (while tracing), such calls on a quantized model run its quantized
  methods. Calls by name (`model.hidden(...)`, `method="hidden"`, gptjax.generate) need no context.
  """
  with nn.intercept_methods(_route):
    yield


# ---- quantized checkpoints ----------------------------------------------------------------------
@dataclasses.dataclass
class Quantized:
  """A quantized run restored for serving."""

  cfg: ml_collections.ConfigDict
  tokenizer: Any
  model: GPT  # the quantized model
  params: Any
  spec: Spec
  mesh: Any
  rules: tuple
  step: int = 0  # the checkpoint's step


def save(workdir: str, qparams: Any, spec: Spec, cfg: ml_collections.ConfigDict,
         source: str | None = None, step: int = 0) -> str:
  """Writes a quantized params-only checkpoint (Orbax) with its config, spec and tokenizer.

  Args:
    workdir: the output folder (created).
    qparams: from `quantize` / `quantize_params`.
    spec: how they were quantized (recorded in the checkpoint's meta).
    cfg: the run's resolved config.
    source: the float run's workdir, whose tokenizer is copied along.
    step: the step to file the checkpoint under.

  Returns:
    The checkpoints directory.
  """
  meta = {"step": step, "config": checkpoint.config_json(cfg), "quantize": dataclasses.asdict(spec)}
  directory = run_lib.save_params(workdir, step, qparams, meta)
  if source and jax.process_index() == 0:
    tokenizer_lib.copy_saved(source, workdir)
  return directory


def load(workdir: str, step: int | None = None, devices=None) -> Quantized:
  """Restores a checkpoint written by `save`, sharded as its config's mesh rules say over
  `run.inference_mesh` (the run's mesh if it fits `devices`, default all; else all of them form the
  data axis and the weights are replicated)."""
  reader, step = run_lib.checkpoint_step(workdir, step)
  meta = reader.meta(step)
  if "quantize" not in meta:
    raise ConfigError(f"{workdir!r} holds a float checkpoint, not a quantized one. Open it with "
                      "gptjax.run.restore, or quantize it first (scripts/compress.py).")
  cfg = ml_collections.ConfigDict(meta["config"])
  spec = Spec(**meta["quantize"])
  mesh, rule_table = run_lib.inference_mesh(cfg, devices)
  qmodel = quantized_model(GPT(ModelArgs.from_config(cfg.model)), spec)
  with sharding.context(mesh, rule_table):
    boxed = abstract_params(qmodel, spec)
  shardings = sharding.logical_shardings(boxed, mesh, rule_table)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(boxed), shardings)
  params = reader.restore(step, target)
  reader.close()
  tokenizer = run_lib.load_tokenizer(cfg, workdir) if run_lib.has_tokenizer(workdir) else None
  return Quantized(cfg, tokenizer, qmodel, params, spec, mesh, rule_table, step)


# ---- QAT ----------------------------------------------------------------------------------------
def qat_model(model: GPT, spec: Spec) -> GPT:
  """`model` with Qwix's quantized-training (fake-quant, straight-through) Linear layers."""
  provider = qwix.QtProvider(rules(spec, model.args, qwix.QtRule))
  return qwix.quantize_model(model, provider, methods=METHODS)


def qat_loss(loss_fn, spec: Spec):
  """A `gptjax.train.LossFn` that applies `loss_fn` to the QAT version of the student model."""

  def loss(params, frozen, micro, rng, model, *rest):
    return loss_fn(params, frozen, micro, rng, qat_model(model, spec), *rest)

  return loss


def describe(spec: Spec) -> str:
  """'int8 per-channel', 'int4 g64 + embeddings', ... (for tables and logs)."""
  text = f"int{spec.bits} " + (f"g{spec.group_size}" if spec.group_size else "per-channel")
  return text + (" + embeddings" if spec.embeddings else "")
