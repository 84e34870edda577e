"""Knowledge distillation: a student learns from a frozen teacher's next-token distribution.

    kw = distill.objective(cfg, tokenizer)    # teacher from cfg.compress.distill.teacher
    trainer = Trainer.build(cfg, mesh, **kw)  # teacher params live in TrainState.frozen
    state = state.replace(frozen=distill.restore_teacher(cfg, trainer.abstract_state.frozen))

The loss of a micro-batch, summed over its weighted tokens (Hinton et al. 2015):

    (1 - alpha) * CE(targets, student)
      + alpha * T^2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T))

The teacher's forward pass runs inside the same jitted step as the student's, on its own
parameters, which are sharded by their logical axes as the student's are and receive no gradient
and no optimizer state. The KL is formed a slice of positions at a time (the [B, slice, V] logits
of both models, recomputed in the backward pass), so neither model's [B, L, V] logits are held
whole; the cross-entropy is the train step's own (`gptjax.loss`), so alpha = 0 is plain training.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections

from gptjax import checkpoint, loss as loss_lib, optim, run as run_lib
from gptjax.errors import ConfigError
from gptjax.data import tokenizer as tokenizer_lib
from gptjax.model import GPT, ModelArgs
from gptjax.train import hidden_and_output_embedding

LOGITS_BUDGET = 1 << 24  # logits of one model formed at once, over the batch (float32: 64 MiB)


def teacher_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The teacher run's resolved config (its `config.json`)."""
  return run_lib.read_config(cfg.compress.distill.teacher, "config.compress.distill.teacher")


def teacher_model(cfg: ml_collections.ConfigDict, tokenizer=None) -> GPT:
  """The teacher network, checked against the student of `cfg` (vocabulary, context, tokenizer).

  Raises:
    ConfigError: naming `config.compress.distill.teacher`, if the two cannot be compared token by
      token.
  """
  path, t = cfg.compress.distill.teacher, teacher_config(cfg)
  if t.model.vocab_size != cfg.model.vocab_size:
    raise ConfigError(
        f"config.compress.distill.teacher: the teacher {path!r} predicts {t.model.vocab_size} "
        f"tokens, this student {cfg.model.vocab_size}. Distillation matches the two next-token "
        "distributions token by token, so both need the same tokenizer: set data.tokenizer.path "
        f"to {os.path.join(path, tokenizer_lib.WORKDIR_SPM)!r} (or the teacher's gpt2_bpe folder).")
  if tokenizer is not None:
    kind = t.data.tokenizer.kind
    if run_lib.has_tokenizer(path):
      theirs = run_lib.load_tokenizer(t, path, "config.compress.distill.teacher")
      if theirs.fingerprint != tokenizer.fingerprint:
        raise ConfigError(
            f"config.compress.distill.teacher: the teacher {path!r} has another tokenizer than "
            f"this run (same size, different {kind} model), so token ids mean different things. "
            f"Set data.tokenizer.path to the teacher's tokenizer in {path!r}.")
  seq_len = optim.seq_len(cfg)
  if t.model.ctx < seq_len:
    raise ConfigError(f"config.compress.distill.teacher: the teacher's context ({t.model.ctx}) is "
                      f"shorter than the student's sequences ({seq_len}). Lower train.seq_len.")
  args = ModelArgs.from_config(t.model)
  # No dropout and no backward pass through the teacher: nothing to rematerialise.
  return GPT(dataclasses.replace(args, embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0,
                                 remat="none"))


def init_params(teacher: GPT):
  """`Trainer.build`'s init_params: (student params, teacher params), both boxed.

  The teacher's values are placeholders (a fresh init) that `restore_teacher` replaces.
  """

  def init(model: GPT, rng, tokens_BxL):
    student = model.init(rng, tokens_BxL)["params"]
    return student, teacher.init(jax.random.fold_in(rng, 1), tokens_BxL)["params"]

  return init


def restore_teacher(cfg: ml_collections.ConfigDict, abstract_frozen):
  """The teacher's trained parameters, placed as `abstract_frozen` (ShapeDtypeStructs) says."""
  return checkpoint.restore_params(cfg.compress.distill.teacher, abstract_frozen)


def kl_sum(x_s_BxLxD, w_s_VxD, x_t_BxLxE, w_t_VxE, weights_BxL, temperature: float,
           vocab_size: int) -> jax.Array:
  """Sum over tokens of weight * KL(softmax(teacher / T) || softmax(student / T)).

  Logits are formed from hidden states and output embeddings (padded vocabulary rows dropped) for
  a slice of positions at a time and rematerialised in the backward pass.
  """
  b, length, _ = x_s_BxLxD.shape
  step = length
  while step % 2 == 0 and b * step * vocab_size > LOGITS_BUDGET:
    step //= 2

  @jax.checkpoint
  def positions(xs):
    x_s, x_t, w = xs
    logits_s = jnp.einsum("bsd,vd->bsv", x_s, w_s_VxD[:vocab_size],
                          preferred_element_type=jnp.float32)
    logits_t = jnp.einsum("bse,ve->bsv", x_t, w_t_VxE[:vocab_size],
                          preferred_element_type=jnp.float32)
    log_p_s = jax.nn.log_softmax(logits_s / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(logits_t / temperature, axis=-1)
    kl_BxS = (jnp.exp(log_p_t) * (log_p_t - log_p_s)).sum(-1)
    return (kl_BxS * w).sum()

  xs = (x_s_BxLxD, x_t_BxLxE, weights_BxL.astype(jnp.float32))
  if step == length:
    return positions(xs)
  # [L / step, B, step, ...]: slices of positions, the batch (and its sharding) kept whole.
  xs = jax.tree.map(lambda a: jnp.moveaxis(a.reshape(b, length // step, step, *a.shape[2:]), 1, 0),
                    xs)
  return jax.lax.map(positions, xs).sum()


def loss_fn(teacher: GPT, alpha: float, temperature: float):
  """The distillation objective as a `gptjax.train.LossFn` (teacher params in `frozen`)."""
  alpha, temperature = float(alpha), float(temperature)

  def loss(params, frozen, micro, rng, model: GPT, sc, mesh, batch_axes):
    variables, rngs = {"params": params}, {"dropout": rng} if sc.dropout else None
    segment_ids, positions = micro.get("segment_ids"), micro.get("positions")
    targets = micro["targets"]
    weights = micro.get("weights")
    if weights is None:
      weights = jnp.ones(targets.shape, jnp.float32)
    vocab = model.args.vocab_size
    if sc.vocab_parallel:  # the vocabulary is sharded: logits are formed whole (as in train.py)
      logits_s = model.apply(variables, micro["inputs"], positions, segment_ids,
                             deterministic=not sc.dropout, rngs=rngs)
      total, count, z = loss_lib.vocab_parallel_cross_entropy_sum(
          logits_s, targets, weights, sc.z_loss, mesh, batch_axes, return_z=True)
      logits_t = teacher.apply({"params": frozen}, micro["inputs"], positions, segment_ids)
      log_p_s = jax.nn.log_softmax(logits_s[..., :vocab] / temperature, axis=-1)
      log_p_t = jax.nn.log_softmax(logits_t[..., :vocab] / temperature, axis=-1)
      kl = ((jnp.exp(log_p_t) * (log_p_t - log_p_s)).sum(-1) * weights).sum()
    else:
      x_s, w_s = model.apply(variables, micro["inputs"], segment_ids, not sc.dropout, positions,
                             rngs=rngs, method=hidden_and_output_embedding)
      total, count, z = loss_lib.unembed_cross_entropy_sum(
          x_s.astype(w_s.dtype), w_s, targets, weights, sc.z_loss, vocab_size=vocab, mesh=mesh,
          batch_axes=batch_axes, return_z=True)
      x_t, w_t = teacher.apply({"params": frozen}, micro["inputs"], segment_ids, True, positions,
                               method=hidden_and_output_embedding)
      kl = kl_sum(x_s.astype(w_s.dtype), w_s, x_t.astype(w_t.dtype), w_t, weights, temperature,
                  vocab)
    parts = {"z_loss": (1.0 - alpha) * z} if sc.z_loss else {}
    return (1.0 - alpha) * total + alpha * temperature**2 * kl, count, parts

  return loss


def objective(cfg: ml_collections.ConfigDict, tokenizer=None) -> dict:
  """`Trainer.build` keyword arguments (loss_fn, init_params) distilling from the configured
  teacher; `tokenizer`, if given, is checked to be the teacher's."""
  kd = cfg.compress.distill
  teacher = teacher_model(cfg, tokenizer)
  return {"loss_fn": loss_fn(teacher, kd.alpha, kd.temperature),
          "init_params": init_params(teacher)}
