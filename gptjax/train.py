"""The train state and the pure train / eval steps, and their jitted, sharded versions.

    trainer = Trainer.build(cfg, mesh)            # shardings from jax.eval_shape + logical rules
    state = trainer.init_state()                  # created already sharded, never on one device
    state, metrics = trainer.step(state, batch)   # batch: {"inputs", "targets"} [accum, B, L]

Other objectives reuse the same step: `Trainer.build(cfg, mesh, loss_fn=..., init_params=...)`
trains any parameters against any token-loss sum, with `TrainState.frozen` holding parameters the
step reads but never updates (a fine-tuning base under adapters, a distillation teacher).

`train_step` and `eval_step` are plain functions of arrays; jit, shardings and donation are applied
in `Trainer.build`, not inside them.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from gptjax import feed, loss as loss_lib, optim, sharding
from gptjax.errors import ConfigError
from gptjax.model import GPT, ModelArgs

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken (int32 scalar)
  params: Any  # what the optimizer updates
  opt_state: Any
  frozen: Any = None  # what the loss reads but nothing updates (no gradient, no optimizer state)


# loss_fn(params, frozen, micro_batch, rng, model, step_config, mesh, batch_axes)
#   -> (sum of weighted token losses, sum of weights[, {name: part of that sum}])
# The optional third element names regularisers inside the loss sum (the z-loss): they are logged
# apart, and the reported `loss` is the sum without them, the cross-entropy validation reports.
LossFn = Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static (hashable) settings a step is specialised on."""

  seed: int
  z_loss: float
  dropout: bool  # any dropout rate > 0
  vocab_parallel: bool  # use the shard_map cross-entropy (tensor axis > 1)
  loss_chunk_rows: int = loss_lib.CHUNK_ROWS  # tokens per chunk of the fused loss (train.*)


def hidden_and_output_embedding(model: GPT, tokens_BxL, segment_ids_BxL, deterministic,
                                positions_BxL=None):
  """`GPT.apply(..., method=...)`: final hidden states and the output projection, for losses that
  fuse the projection (`loss.unembed_cross_entropy_sum`) instead of forming [B, L, V] logits."""
  return (model.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, deterministic),
          model.output_embedding())


def lm_loss_sum(params, frozen, micro: Batch, rng, model: GPT, sc: StepConfig, mesh: Mesh | None,
                batch_axes) -> tuple[jax.Array, jax.Array]:
  """The language-modelling objective: next-token cross-entropy sums (see `loss`)."""
  del frozen
  return _loss_sum(params, micro, rng, model, sc, mesh, batch_axes)


def _loss_sum(params, micro: Batch, rng, model: GPT, sc: StepConfig, mesh: Mesh | None,
              batch_axes):
  variables, rngs = {"params": params}, {"dropout": rng} if sc.dropout else None
  # Packed documents (data.document_mask) carry their own positions, restarting at each document.
  segment_ids, positions = micro.get("segment_ids"), micro.get("positions")
  weights = micro.get("weights")
  if sc.vocab_parallel:
    logits = model.apply(variables, micro["inputs"], positions, segment_ids,
                         deterministic=not sc.dropout, rngs=rngs)
    total, count, z = loss_lib.vocab_parallel_cross_entropy_sum(
        logits, micro["targets"], weights, sc.z_loss, mesh, batch_axes, return_z=True)
  else:
    # The output projection is fused into the loss: the [B, L, V] logits are never materialised.
    x_BxLxD, w_VxD = model.apply(variables, micro["inputs"], segment_ids, not sc.dropout,
                                 positions, rngs=rngs, method=hidden_and_output_embedding)
    total, count, z = loss_lib.unembed_cross_entropy_sum(
        x_BxLxD.astype(w_VxD.dtype), w_VxD, micro["targets"], weights, sc.z_loss,
        vocab_size=model.args.vocab_size, chunk_rows=sc.loss_chunk_rows, mesh=mesh,
        batch_axes=batch_axes, return_z=True)
  return total, count, ({"z_loss": z} if sc.z_loss else {})


def train_step(state: TrainState, batch: Batch, *, model: GPT, tx: optax.GradientTransformation,
               lr: Callable[[jax.Array, Any], jax.Array], sc: StepConfig,
               mesh: Mesh | None = None, batch_axes=None, loss_fn: LossFn = lm_loss_sum
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `batch` = [accum, B, L] arrays: accumulate, then update once.

  Gradients of the token-loss sums are accumulated over the micro-batches and divided once by the
  total token weight, so k micro-batches give exactly the step of one k-times larger batch.
  """
  rng = jax.random.fold_in(jax.random.key(sc.seed), state.step)
  frozen = jax.lax.stop_gradient(state.frozen)

  def objective(params, micro, rng, *rest):
    total, count, *parts = loss_fn(params, frozen, micro, rng, *rest)
    return total, (count, parts[0] if parts else {})

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def micro_step(carry, xs):
    grads_acc, total_acc, count_acc, parts_acc = carry
    micro, i = xs
    (total, (count, parts)), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, i),
                                             model, sc, mesh, batch_axes)
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    return (grads_acc, total_acc + total, count_acc + count,
            jax.tree.map(jnp.add, parts_acc, parts)), None

  accum = batch["inputs"].shape[0]
  first = jax.tree.map(lambda x: x[0], batch)
  if accum == 1:  # no accumulator to zero, add into and carry through a loop
    (total, (count, parts)), grads = grad_fn(state.params, first, jax.random.fold_in(rng, 0),
                                             model, sc, mesh, batch_axes)
  else:
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    scalar = jnp.zeros((), jnp.float32)
    part_names = jax.eval_shape(  # which regulariser parts the objective reports
        lambda p, m, r: grad_fn(p, m, r, model, sc, mesh, batch_axes), state.params, first,
        rng)[0][1][1]
    (grads, total, count, parts), _ = jax.lax.scan(
        micro_step, (zeros, scalar, scalar, jax.tree.map(lambda _: scalar, part_names)),
        (batch, jnp.arange(accum)))
  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  reported = total - sum(parts.values(), jnp.zeros((), jnp.float32))
  metrics = {"loss": reported / count, "grad_norm": optax.global_norm(grads),
             "lr": lr(state.step, state.opt_state), "tokens": count,
             **{k: v / count for k, v in parts.items()}}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                    frozen=state.frozen), metrics


def eval_step(params, batch: Batch, *, model: GPT, sc: StepConfig, mesh: Mesh | None = None,
              batch_axes=None) -> dict[str, jax.Array]:
  """Sum of token losses and token count on one [B, L] batch (no dropout)."""
  sc = dataclasses.replace(sc, dropout=False, z_loss=0.0)
  total, count, _ = _loss_sum(params, batch, None, model, sc, mesh, batch_axes)
  return {"loss_sum": total, "tokens": count}


@dataclasses.dataclass
class Trainer:
  """A model, optimizer and mesh, with the jitted sharded functions built once."""

  cfg: ml_collections.ConfigDict
  mesh: Mesh
  rules: tuple
  model: GPT
  tx: optax.GradientTransformation
  lr: Callable[[jax.Array, Any], jax.Array]  # (step, opt_state) -> learning rate
  run: optim.RunPlan
  state_shardings: Any
  abstract_state: Any = None  # ShapeDtypeStructs with shardings: the target of a restore
  _step: Any = None
  _eval: Any = None
  _init: Any = None

  @classmethod
  def build(cls, cfg: ml_collections.ConfigDict, mesh: Mesh, *, loss_fn: LossFn = lm_loss_sum,
            init_params=None) -> "Trainer":
    """Shardings, jitted init / step / eval for `cfg` on `mesh`.

    Args:
      cfg: the full config.
      mesh: the device mesh.
      loss_fn: the objective (see `LossFn`); default next-token cross-entropy.
      init_params: `(model, rng, tokens) -> (params, frozen)`, both boxed with logical axes (as
        `model.init` makes them); default `(model.init(...)["params"], None)`.
    """
    args = ModelArgs.from_config(cfg.model)
    model = GPT(args)
    run = optim.plan(cfg)
    tx, lr = optim.make(cfg, run)
    rules = sharding.rules(cfg.mesh.rules)
    sc = StepConfig(seed=cfg.seed, z_loss=cfg.train.z_loss,
                    dropout=max(args.embd_dropout, args.attn_dropout, args.resid_dropout) > 0,
                    vocab_parallel=mesh.shape["tensor"] > 1,
                    # A run saved before the key existed ran with the fixed CHUNK_ROWS.
                    loss_chunk_rows=cfg.train.get("loss_chunk_rows", loss_lib.CHUNK_ROWS))
    if sc.loss_chunk_rows < 1:
      raise ConfigError(f"config.train.loss_chunk_rows: must be >= 1, got {sc.loss_chunk_rows}. "
                        f"Use e.g. {loss_lib.CHUNK_ROWS} (tokens per chunk of the fused loss).")
    seq_len = run.seq_len

    def init_boxed(rng):
      tokens = jnp.zeros((1, seq_len), jnp.int32)
      if init_params is None:
        params, frozen = model.init(rng, tokens)["params"], None
      else:
        params, frozen = init_params(model, rng, tokens)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                        frozen=frozen)

    with sharding.context(mesh, rules):
      abstract = jax.eval_shape(init_boxed, jax.random.key(0))
    state_shardings = sharding.logical_shardings(abstract, mesh, rules)
    abstract_state = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        nn.meta.unbox(abstract), state_shardings)
    trainer = cls(cfg, mesh, rules, model, tx, lr, run, state_shardings, abstract_state)
    batch_axes = sharding.batch_axes(rules)
    micro_sh = sharding.batch_sharding(mesh, rules)
    accum_sh = sharding.batch_sharding(mesh, rules, leading=1)
    repl = sharding.replicated(mesh)

    trainer._init = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)),
                            out_shardings=state_shardings)
    trainer._step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, lr=lr, sc=sc, mesh=mesh,
                          batch_axes=batch_axes, loss_fn=loss_fn),
        in_shardings=(state_shardings, accum_sh), out_shardings=(state_shardings, repl),
        donate_argnums=0)
    trainer._eval = jax.jit(
        functools.partial(eval_step, model=model, sc=sc, mesh=mesh, batch_axes=batch_axes),
        in_shardings=(state_shardings.params, micro_sh), out_shardings=repl)
    return trainer

  def _ctx(self):
    return sharding.context(self.mesh, self.rules)

  def init_state(self) -> TrainState:
    with self._ctx():
      return self._init(jax.random.key(self.cfg.seed))

  def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    with self._ctx():
      return self._step(state, batch)

  def lower_step(self, batch: Batch) -> jax.stages.Lowered:
    """The train step lowered for the abstract state and `batch` (arrays or ShapeDtypeStructs);
    `.compile()` it for the compiler's view (memory, cost) without allocating anything."""
    with self._ctx():
      return self._step.lower(self.abstract_state, batch)

  def eval(self, params, batch: Batch) -> dict[str, jax.Array]:
    with self._ctx():
      return self._eval(params, batch)

  def batch_sharding(self, leading: int = 1):
    return sharding.batch_sharding(self.mesh, self.rules, leading=leading)

  def host_rows(self, global_batch: int) -> feed.HostRows:
    """The rows of a `global_batch`-row batch this process loads, and how to assemble them."""
    return feed.HostRows.of(self.mesh, sharding.batch_axes(self.rules), global_batch)
