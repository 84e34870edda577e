"""The fused output-projection + cross-entropy equals the plain one on materialised logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import configs
from gptjax import loss as loss_lib, sharding, train


def problem(b=3, l=10, d=16, v=56, vocab_size=50, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (b, l, d))
  w = jax.random.normal(keys[1], (v, d))  # logits of order 4: a peaked softmax, as in training
  targets = jax.random.randint(keys[2], (b, l), 0, vocab_size)
  weights = (jax.random.uniform(keys[3], (b, l)) > 0.3).astype(jnp.float32)
  return x, w, targets, weights


def plain(x, w, targets, weights, z_loss, vocab_size):
  """What the model and `cross_entropy_sum` compute: logits, padded ids at -1e30, the loss."""
  logits = jnp.einsum("bld,vd->blv", x, w)
  logits = jnp.where(jnp.arange(w.shape[0]) < vocab_size, logits, -1e30)
  return loss_lib.cross_entropy_sum(logits, targets, weights, z_loss)


@pytest.mark.parametrize("chunk_rows", [1, 7, 30, 512])  # many chunks, a ragged last one, one
@pytest.mark.parametrize("z_loss, masked", [(0.0, False), (1e-2, True)])
def test_value_and_gradients_equal_the_plain_loss(chunk_rows, z_loss, masked):
  x, w, targets, weights = problem()
  weights = weights if masked else None
  fused = functools.partial(loss_lib.unembed_cross_entropy_sum, z_loss=z_loss, vocab_size=50,
                            chunk_rows=chunk_rows)
  ref = functools.partial(plain, z_loss=z_loss, vocab_size=50)

  def total(f, x, w, weights):
    return f(x, w, targets, weights)[0]

  (t1, c1) = jax.jit(fused)(x, w, targets, weights)
  (t0, c0) = ref(x, w, targets, weights)
  np.testing.assert_allclose(t1, t0, rtol=1e-6)
  assert c1 == c0
  argnums = (0, 1, 2) if masked else (0, 1)
  g1 = jax.jit(jax.grad(functools.partial(total, fused), argnums))(x, w, weights)
  g0 = jax.grad(functools.partial(total, ref), argnums)(x, w, weights)
  for a, b, name in zip(g1, g0, ("x", "w", "weights")):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5, err_msg=name)
  # Padded vocabulary rows can never be predicted, so they get no gradient.
  assert np.all(np.asarray(g1[1])[50:] == 0.0)


def test_gradients_scale_with_the_cotangent_and_compose():
  x, w, targets, weights = problem()

  def f(loss, x, w):
    total, count = loss(x, w, targets, weights)
    return 3.0 * jnp.tanh(total / count)

  fused = functools.partial(loss_lib.unembed_cross_entropy_sum, vocab_size=50, chunk_rows=8)
  ref = functools.partial(plain, z_loss=0.0, vocab_size=50)
  g1 = jax.grad(functools.partial(f, fused), (0, 1))(x, w)
  g0 = jax.grad(functools.partial(f, ref), (0, 1))(x, w)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), g1, g0)


@pytest.mark.parametrize("layout", [(8, 1), (2, 4)], ids=["data8", "data2_fsdp4"])
def test_sharded_over_the_batch_equals_one_device(layout):
  data, fsdp = layout
  c = configs.load("tiny")
  c.mesh.update(data=data, fsdp=fsdp, tensor=1)
  mesh = sharding.make_mesh(c.mesh, jax.devices())
  x, w, targets, weights = problem(b=8)
  axes = ("data", "fsdp")
  x = jax.device_put(x, NamedSharding(mesh, P(axes, None, None)))
  targets, weights = (jax.device_put(a, NamedSharding(mesh, P(axes, None)))
                      for a in (targets, weights))

  def total(x, w):
    return loss_lib.unembed_cross_entropy_sum(x, w, targets, weights, 1e-3, vocab_size=50,
                                              chunk_rows=16, mesh=mesh, batch_axes=axes)[0]

  with jax.set_mesh(mesh):
    v1 = jax.jit(total)(x, w)
    g1 = jax.jit(jax.grad(total, (0, 1)))(x, w)
  v0 = plain(x, w, targets, weights, 1e-3, 50)[0]
  g0 = jax.grad(lambda x, w: plain(x, w, targets, weights, 1e-3, 50)[0], (0, 1))(x, w)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_train_and_eval_losses_equal_the_models_logits_loss():
  c = configs.load("tiny")
  c.model.update(n_layers=2, d_model=32, n_heads=2, vocab_size=100, pad_vocab_to=64, ctx=16)
  c.train.update(global_batch=4, steps=1000)
  trainer = train.Trainer.build(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
  params = trainer.init_state().params
  tokens = np.random.default_rng(0).integers(0, 100, (4, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  logits = trainer.model.apply({"params": params}, batch["inputs"])
  ref = loss_lib.cross_entropy_sum(logits, batch["targets"])[0]
  np.testing.assert_allclose(trainer.eval(params, batch)["loss_sum"], ref, rtol=1e-6)
  state, metrics = trainer.step(trainer.init_state(), {k: v[None] for k, v in batch.items()})
  np.testing.assert_allclose(metrics["loss"], ref / tokens[:, 1:].size, rtol=1e-6)
