"""Compression: Qwix PTQ (int8 / int4) and QAT, distillation, magnitude and 2:4 pruning."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs
from gptjax import checkpoint, distill, evaluate, generate, optim, prune, quantize, sharding
from gptjax import loop, run as run_lib, train
from gptjax import config as config_lib
from gptjax.config import ConfigError
from gptjax.model import GPT, ModelArgs

VOCAB, LENGTH = 250, 32
METHODS = ("baseline", "int8", "int4", "float+ft", "qat", "pruned50", "pruned24", "student",
           "distilled")  # scripts/compress.py's table rows, in order


def small_cfg(steps=40, data=1, fsdp=1, tensor=1, **model):
  c = configs.load("tiny")
  c.model.update({"n_layers": 2, "d_model": 128, "n_heads": 4, "d_ff": 1024,
                  "vocab_size": VOCAB, "pad_vocab_to": 128, "ctx": LENGTH, **model})
  c.train.update(global_batch=8, steps=steps)
  c.optim.update(warmup_steps=2, peak_lr=3e-3)
  c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return c


def markov_batches(n, batch=8, seed=0):
  """Token sequences from a fixed sparse Markov chain: something a model can learn fast."""
  table = np.random.default_rng(123).integers(0, VOCAB, (VOCAB, 3))
  rng = np.random.default_rng(seed)
  toks = np.zeros((n, batch, LENGTH + 1), np.int32)
  toks[..., 0] = rng.integers(0, VOCAB, (n, batch))
  for i in range(1, LENGTH + 1):
    toks[..., i] = table[toks[..., i - 1], rng.integers(0, 3, (n, batch))]
  return [{"inputs": t[None, :, :-1], "targets": t[None, :, 1:]} for t in toks]


def build(cfg, devices=1, **kw):
  return train.Trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:devices]), **kw)


def run_steps(trainer, data, state):
  losses = []
  for b in data:
    state, m = trainer.step(state, jax.device_put(b, trainer.batch_sharding()))
    losses.append(float(m["loss"]))
  return state, np.array(losses)


def fresh_state(trainer, params, frozen=None):
  """A step-0 state of `trainer` from given parameters (its own optimizer's initial state), placed
  as the trainer shards it: one compiled init serves every trainer of the same model."""
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=jax.jit(trainer.tx.init)(params), frozen=frozen)
  return jax.device_put(state, trainer.state_shardings, may_alias=False)  # the step donates it


@pytest.fixture(scope="module")
def plain():
  """The plain trainer of `small_cfg()` (compiled once, shared)."""
  return build(small_cfg())


@pytest.fixture(scope="module")
def init(plain):
  """Its initial parameters."""
  return plain.init_state().params


@pytest.fixture(scope="module")
def trained(plain, init):
  """A tiny model trained 30 steps on the Markov chain, with held-out batches."""
  state, losses = run_steps(plain, markov_batches(30), fresh_state(plain, init))
  assert losses[-1] < losses[0] - 1.0
  val = [{k: v[0] for k, v in b.items()} for b in markov_batches(2, seed=1)]
  return plain.cfg, plain.model, state.params, val


@functools.partial(jax.jit, static_argnames="model")
def _scores(params, batch, model):
  batch = {**batch, "weights": jnp.ones(batch["targets"].shape, jnp.float32)}
  return evaluate.score_batch(params, batch, model=model)


def val_loss(model, params, val):
  """Nats per token through gptjax.evaluate's scoring (routed to Qwix for a quantized model)."""
  with quantize.routing():
    out = [_scores(params, b, model) for b in val]
  return -sum(float(o["logprob"].sum()) for o in out) / sum(float(o["tokens"].sum()) for o in out)


# ---- post-training quantization -----------------------------------------------------------------
def test_int8_weights_change_the_validation_loss_by_under_one_percent(trained):
  cfg, model, params, val = trained
  base = val_loss(model, params, val)
  losses = {}
  for spec in (quantize.Spec(8), quantize.Spec(4, group_size=32)):
    qmodel, qparams = quantize.quantize(model, params, spec)
    kernel = qparams["layers"]["block_0"]["mlp"]["fc"]["kernel"].array
    assert kernel.qvalue.dtype == quantize.QTYPES[spec.bits]
    losses[quantize.describe(spec)] = val_loss(qmodel, qparams, val)
  print(f"\nval loss float {base:.4f}, " + ", ".join(f"{k} {v:.4f} ({v / base - 1:+.3%})"
                                                 for k, v in losses.items()))
  int8, int4 = losses["int8 per-channel"], losses["int4 g32"]
  assert int8 != base and abs(int8 / base - 1) < 0.01
  assert abs(int4 / base - 1) < 0.1  # reported above; int4 costs more than int8


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _array_bytes(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
             if os.path.basename(r) == "d")


class _Bytes:
  """A stand-in tokenizer: one id per UTF-8 byte (folded into the vocabulary), EOS = 0."""

  eos_id = 0

  def encode(self, text):
    return [1 + b % (VOCAB - 1) for b in text.encode()]


def test_int8_checkpoint_is_3_5x_smaller_round_trips_exactly_and_serves(trained, tmp_path):
  cfg, model, params, _ = trained
  float_dir = checkpoint.save_params(str(tmp_path / "float"), 0, params,
                                     {"config": checkpoint.config_json(cfg)})
  spec = quantize.Spec(8, embeddings=True)
  _, qparams = quantize.quantize(model, params, spec)
  q_dir = quantize.save(str(tmp_path / "int8"), qparams, spec, cfg)
  # The stored array chunks (Orbax's `d/` folders): Orbax's bookkeeping files (metadata naming the
  # arrays and the temporary path, commit markers: ~30 KiB) would otherwise move the ratio of this
  # tiny model by a few percent from one folder name to another.
  ratio = _array_bytes(float_dir) / _array_bytes(q_dir)
  whole = _dir_bytes(float_dir) / _dir_bytes(q_dir)
  print(f"\nint8 checkpoint (Linear kernels and embeddings) {ratio:.2f}x smaller "
        f"({whole:.2f}x with Orbax's metadata)")
  assert ratio >= 3.5

  q = quantize.load(str(tmp_path / "int8"), devices=jax.devices()[:1])
  assert q.spec == spec
  assert jax.tree.structure(q.params) == jax.tree.structure(qparams)
  for a, b in zip(jax.tree.leaves(q.params), jax.tree.leaves(qparams)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The restored model generates (gptjax.generate) and is scored (gptjax.evaluate).
  new = generate.generate(q.model, q.params, [[5, 17, 3], [9]], 6, temperature=0.0)
  assert [len(s) for s in new] == [6, 6] and all(0 <= i < VOCAB for s in new for i in s)
  scorer = evaluate.Scorer(q.model, _Bytes(), batch_size=4)
  docs = ["the quick brown fox jumps over the lazy dog " * 3, "pack my box with five dozen jugs"]
  with quantize.routing():
    ppl = evaluate.perplexity(scorer, q.params, docs)
  assert np.isfinite(ppl["bits_per_byte"]) and ppl["bits_per_byte"] > 0
  with pytest.raises(ConfigError, match="float checkpoint"):
    quantize.load(str(tmp_path / "float"))


def test_qwix_misses_and_bad_specs_raise_errors_naming_the_setting(trained, monkeypatch):
  _, model, params, _ = trained
  with pytest.raises(ConfigError, match=r"quantize\.bits: 3-bit"):
    quantize.quantized_model(model, quantize.Spec(bits=3))
  with pytest.raises(ConfigError, match=r"quantize\.group_size: groups of 48"):
    quantize.quantized_model(model, quantize.Spec(bits=4, group_size=48))
  # A Linear that no rule reaches (as a layer Qwix cannot intercept would) is an error, not float.
  monkeypatch.setattr(quantize, "_OUT", "nothing")
  monkeypatch.setattr(quantize, "LINEARS", r"(.*/)?(qkv|fc|proj)")
  with pytest.raises(ConfigError, match=r"no dot_general for layers/block_0/attn/out/kernel"):
    quantize.quantize(model, params, quantize.Spec(8))


# ---- quantization-aware training ----------------------------------------------------------------
def _fake_quant_int8(params):
  """Reference: Linear kernels rounded to int8 with one absmax scale per output channel (Qwix's
  convention: the largest magnitude maps to 127.5, the edge of the 127 bucket)."""
  def fq(path, w):
    names = [k.key for k in path]
    if names[-1] != "kernel":
      return w
    w = np.asarray(w, np.float64)
    n_in = 2 if names[-2] == "out" else 1
    axes = tuple(range(1, 1 + n_in))  # [layers, *in, *out]: reduce the input axes
    scale = np.abs(w).max(axis=axes, keepdims=True) / 127.5
    return jnp.asarray(np.clip(np.round(w / scale), -128, 127) * scale, jnp.float32)

  return jax.tree_util.tree_map_with_path(fq, params)


def test_qat_step_uses_fake_quantized_weights_and_is_the_same_under_fsdp_and_tp(plain, init):
  data = markov_batches(3)
  loss_fn = quantize.qat_loss(train.lm_loss_sum, quantize.Spec(8))
  # Single device, scanned layers, full remat.
  single = build(small_cfg(remat="full"), loss_fn=loss_fn)
  _, ref = run_steps(single, data, fresh_state(single, init))
  # The first step's loss is the plain model's loss on int8 fake-quantized weights.
  _, fake_quant = run_steps(plain, data[:1], fresh_state(plain, _fake_quant_int8(init)))
  _, full_precision = run_steps(plain, data[:1], fresh_state(plain, init))
  assert ref[0] == pytest.approx(fake_quant[0], rel=1e-5)
  assert ref[0] != pytest.approx(full_precision[0], rel=1e-6)
  # FSDP=2 x TP=2 (vocab-parallel loss), no remat: the same losses.
  sharded = build(small_cfg(fsdp=2, tensor=2), devices=4, loss_fn=loss_fn)
  _, losses = run_steps(sharded, data, fresh_state(sharded, init))
  np.testing.assert_allclose(losses, ref, rtol=1e-5)


# ---- distillation -------------------------------------------------------------------------------
def _teacher():
  return GPT(ModelArgs.from_config(small_cfg(n_layers=1, d_model=64, d_ff=256).model))


def _teacher_params(teacher, tokens):
  boxed = jax.jit(lambda r: teacher.init(r, tokens)["params"])(jax.random.key(1))
  return jax.tree.map(lambda x: x.unbox(), boxed, is_leaf=lambda x: hasattr(x, "unbox"))


def test_distillation_with_alpha_zero_is_plain_training_exactly(plain, init):
  data, teacher = markov_batches(3), _teacher()
  plain_state, plain_losses = run_steps(plain, data, fresh_state(plain, init))
  kd = build(small_cfg(), loss_fn=distill.loss_fn(teacher, 0.0, 2.0),
             init_params=distill.init_params(teacher))
  frozen = _teacher_params(teacher, data[0]["inputs"][0])
  state, losses = run_steps(kd, data, fresh_state(kd, init, frozen))
  assert jax.tree.leaves(state.frozen)  # the teacher is in the state and runs in the step
  np.testing.assert_array_equal(losses, plain_losses)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain_state.params)):
    np.testing.assert_array_equal(a, b)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_distillation_loss_is_the_mix_of_cross_entropy_and_scaled_kl(plain, init):
  model, teacher = plain.model, _teacher()
  batch = {k: v[0] for k, v in markov_batches(1)[0].items()}
  tokens = batch["inputs"]
  student_p, teacher_p = init, _teacher_params(teacher, tokens)
  alpha, t = 0.3, 2.0
  sc = train.StepConfig(seed=0, z_loss=0.0, dropout=False, vocab_parallel=False)
  fn = distill.loss_fn(teacher, alpha, t)

  @jax.jit
  def loss_and_logits(s, f, b):
    return (fn(s, f, b, None, model, sc, None, None),
            (model.apply({"params": s}, b["inputs"]), teacher.apply({"params": f}, b["inputs"])))

  (total, count, parts), logits = loss_and_logits(student_p, teacher_p, batch)
  assert parts == {}  # no z-loss
  # Reference in float64 numpy from the two models' logits.
  ls, lt = (np.asarray(x, np.float64)[..., :VOCAB] for x in logits)
  ce = -np.take_along_axis(_log_softmax(ls), batch["targets"][..., None], -1).sum()
  ps, pt = _log_softmax(ls / t), _log_softmax(lt / t)
  kl = (np.exp(pt) * (pt - ps)).sum()
  assert float(count) == tokens.size
  assert float(total) == pytest.approx((1 - alpha) * ce + alpha * t * t * kl, rel=1e-5)


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
  teacher_cfg = small_cfg()
  teacher_cfg.model.vocab_size = 300
  os.makedirs(tmp_path / "teacher")
  with open(tmp_path / "teacher" / "config.json", "w", encoding="utf-8") as f:
    f.write(teacher_cfg.to_json_best_effort())
  cfg = small_cfg()
  cfg.compress.distill.teacher = str(tmp_path / "teacher")
  with pytest.raises(ConfigError, match=r"compress\.distill\.teacher: .* predicts 300 tokens, "
                                        r"this student 250"):
    distill.objective(cfg)
  cfg.compress.distill.teacher = str(tmp_path / "nothing")
  with pytest.raises(ConfigError, match=r"compress\.distill\.teacher: .* no config\.json"):
    distill.objective(cfg)


# ---- pruning ------------------------------------------------------------------------------------
# The model's kernel layout, stacked by nn.scan: [layers, *inputs, *outputs] (attn/out has the
# inputs (heads, d_head)), beside parameters that stay dense.
_SHAPES = {"qkv": (2, 16, 3, 2, 4), "out": (2, 2, 4, 16), "fc": (2, 16, 32), "proj": (2, 32, 16)}
_INPUTS = {"qkv": 1, "out": 2, "fc": 1, "proj": 1}


def _toy_training(cfg, steps):
  """Fits a model-shaped parameter tree to random targets with gptjax.optim's optimizer for `cfg`
  (AdamW, clipping and the pruning hook); yields (step, params, loss) after each update."""
  rng = np.random.default_rng(0)
  params = {"layers": {"block_0": {n: {"kernel": rng.normal(size=s).astype(np.float32),
                                       "bias": np.full(s[-1], 0.1, np.float32)}
                                   for n, s in _SHAPES.items()}},
            "wte": {"embedding": rng.normal(size=(16, 16)).astype(np.float32)}}
  targets = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  tx, _ = optim.make(cfg, optim.plan(cfg))

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      pairs = zip(jax.tree.leaves(p), jax.tree.leaves(targets))
      return sum(jnp.sum((a - b) ** 2) for a, b in pairs)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = jax.jit(tx.init)(params)
  for t in range(steps):
    params, opt_state, loss = step(params, opt_state)
    yield t, jax.device_get(params), float(loss)


def _per_layer(blk, name):
  """A kernel as [layers, inputs, outputs]."""
  w = np.asarray(blk[name]["kernel"])
  return w.reshape(w.shape[0], int(np.prod(w.shape[1:1 + _INPUTS[name]])), -1)


def test_magnitude_pruning_follows_its_schedule_and_pruned_weights_stay_zero():
  cfg = small_cfg(steps=10)
  cfg.optim.peak_lr = 1e-2
  cfg.compress.prune.update(method="magnitude", sparsity=0.5, begin_step=1, end_step=5)
  schedule = optax.polynomial_schedule(0.0, 0.5, 3.0, 4, 1)  # the Zhu & Gupta ramp, t in [1, 5]
  zeros_before, losses = None, []
  for t, params, loss in _toy_training(cfg, 10):
    losses.append(loss)
    blk = params["layers"]["block_0"]
    zeros = {}
    for name in _SHAPES:
      w = _per_layer(blk, name).reshape(2, -1)  # each layer is pruned on its own
      expect = int(np.floor(np.float32(schedule(t)) * w.shape[1]))
      assert [(row == 0).sum() for row in w] == [expect, expect], (t, name)
      zeros[name] = w == 0
    if zeros_before is not None:  # once pruned, always zero
      assert all((zeros[k] | ~zeros_before[k]).all() for k in zeros)
    zeros_before = zeros
    assert (blk["fc"]["bias"] != 0).all() and (params["wte"]["embedding"] != 0).all()
  assert set(prune.sparsity_of(params).values()) == {0.5}
  assert losses[-1] < losses[5]  # the kept weights go on learning at the final sparsity


def test_2_4_pruning_zeroes_two_of_every_four_inputs_through_training():
  cfg = small_cfg(steps=12)
  cfg.optim.peak_lr = 1e-2
  cfg.compress.prune.update(method="2:4", begin_step=2)
  losses = []
  for t, params, loss in _toy_training(cfg, 12):
    losses.append(loss)
    for name in _SHAPES:
      w = _per_layer(params["layers"]["block_0"], name)
      groups = (w.reshape(w.shape[0], -1, 4, w.shape[-1]) == 0).sum(axis=2)  # 4 inputs a group
      assert (groups == (2 if t >= 2 else 0)).all(), (t, name)
  assert losses[-1] < losses[2]


def test_bad_compression_settings_fail_validation_naming_the_setting():
  cases = [
      (lambda c: c.compress.qat.update(enabled=True, bits=3), r"compress\.qat\.bits"),
      (lambda c: c.compress.qat.update(enabled=True, bits=4, group_size=24),
       r"compress\.qat\.group_size"),
      (lambda c: c.compress.distill.update(alpha=1.5), r"compress\.distill\.alpha"),
      (lambda c: c.compress.distill.update(temperature=0.0), r"compress\.distill\.temperature"),
      (lambda c: c.compress.prune.update(method="3:4"), r"compress\.prune\.method"),
      (lambda c: c.compress.prune.update(method="magnitude", sparsity=1.0),
       r"compress\.prune\.sparsity"),
      (lambda c: c.compress.prune.update(begin_step=5, end_step=2), r"compress\.prune\.begin_step"),
  ]
  for edit, message in cases:
    c = small_cfg()
    edit(c)
    with pytest.raises(ConfigError, match=message):
      config_lib.validate(c, n_devices=1)
  c = small_cfg(d_model=66, n_heads=3)  # 66 inputs do not split into groups of 4
  c.compress.prune.method = "2:4"
  with pytest.raises(ConfigError, match=r"compress\.prune\.method: '2:4' .* has 66 inputs"):
    build(c)


def test_distillation_presets_parse_and_validate():
  for spec in ("distill_tiny:teacher", "distill_tiny", "distill_gpt2:small"):
    config_lib.validate(configs.load(spec), n_devices=1)
  student = configs.load("distill_tiny")
  assert student.compress.distill.teacher and student.compress.distill.alpha > 0


# ---- end to end (slow) --------------------------------------------------------------------------
WORDS = ("the cat sat on a mat and the dog ran to it while a bird sang in the tree above them "
         "def return class import value token model data step loss").split()


def corpus_cfg(tmp_path, steps):
  """A run on 400 documents of a word-level Markov chain (something a teacher can know well)."""
  rng = np.random.default_rng(0)
  successors = rng.integers(0, len(WORDS), (len(WORDS), 2))
  path = tmp_path / "docs.jsonl"
  if not path.exists():
    with open(path, "w", encoding="utf-8") as f:
      for _ in range(400):
        w = [int(rng.integers(len(WORDS)))]
        for _ in range(int(rng.integers(20, 80))):
          w.append(int(successors[w[-1], rng.integers(2)]))
        f.write(json.dumps({"text": " ".join(WORDS[i] for i in w)}) + "\n")
  c = configs.load("tiny")
  c.data.update(source="files", paths=str(path), val_fraction=0.1,
                cache_dir=str(tmp_path / "cache"))
  c.data.tokenizer.vocab_size = 320
  c.model.update(n_layers=2, d_model=64, n_heads=2, ctx=64)
  c.train.update(global_batch=8, steps=steps, log_every=10, eval_every=0, eval_batches=4,
                 sample_tokens=0, progress=False)
  c.checkpoint.update(save_every=0, keep_best=0)
  c.optim.update(warmup_steps=5, peak_lr=3e-3)
  c.mesh.data = 1
  return c


@pytest.mark.slow
def test_a_distilled_student_beats_the_same_student_trained_alone(tmp_path):
  devices = jax.devices()[:1]
  teacher_cfg = corpus_cfg(tmp_path, steps=300)
  teacher_cfg.model.update(n_layers=4, d_model=128, n_heads=4)
  teacher = loop.run(teacher_cfg, str(tmp_path / "teacher"), devices=devices)
  alone = loop.run(corpus_cfg(tmp_path, steps=60), str(tmp_path / "alone"), devices=devices)
  cfg = corpus_cfg(tmp_path, steps=60)
  cfg.compress.distill.update(teacher=str(tmp_path / "teacher"), alpha=0.5, temperature=1.0)
  distilled = loop.run(cfg, str(tmp_path / "distilled"), devices=devices)
  print(f"\nval loss: teacher {teacher['val_loss']:.4f}, student alone {alone['val_loss']:.4f}, "
        f"distilled {distilled['val_loss']:.4f}")
  assert distilled["val_loss"] < alone["val_loss"]
  # Resuming a distillation run restores the teacher (it is not in the student's checkpoints).
  cfg.train.steps = 70
  again = loop.run(cfg, str(tmp_path / "distilled"), devices=devices)
  assert again["steps"] == 70 and np.isfinite(again["val_loss"])


@pytest.mark.slow
def test_the_compress_script_tabulates_every_method(tmp_path):
  loop.run(corpus_cfg(tmp_path, steps=40), str(tmp_path / "run"), devices=jax.devices()[:1])
  script = os.path.join(os.path.dirname(__file__), "..", "scripts", "compress.py")
  subprocess.run([sys.executable, script, f"--workdir={tmp_path / 'run'}",
                  f"--out={tmp_path / 'out'}",
                  "--finetune_steps=8", "--student_steps=10", "--val_docs=8", "--decode_tokens=8",
                  "--group_size=32", "--num_devices=1"], check=True)
  rows = json.load(open(tmp_path / "out" / "results.json", encoding="utf-8"))
  assert list(rows) == list(METHODS)
  base = rows["baseline"]
  assert base["checkpoint_mib"] / rows["int8"]["checkpoint_mib"] > 2.5  # Orbax metadata weighs
  assert abs(rows["int8"]["val_nll"] / base["val_nll"] - 1) < 0.01
  for name, r in rows.items():
    assert np.isfinite(r["val_nll"]) and r["decode_tok_s"] > 0 and r["peak_mib"] > 0, name
  sparsity = prune.sparsity_of(run_lib.restore(str(tmp_path / "out" / "pruned50")).params)
  assert set(sparsity.values()) == {0.5}
  assert quantize.load(str(tmp_path / "out" / "serve" / "qat")).spec.bits == 8
  # The serving checkpoints work with the sampling and evaluation scripts, quantized or not.
  scripts = os.path.join(os.path.dirname(__file__), "..", "scripts")
  for name in ("int4", "baseline"):
    serve = tmp_path / "out" / "serve" / name
    out = subprocess.run([sys.executable, os.path.join(scripts, "sample.py"), f"--workdir={serve}",
                          "--max_new_tokens=8", "--temperature=0"],
                         capture_output=True, text=True, check=True).stdout
    assert "8 new tokens in" in out, out
    subprocess.run([sys.executable, os.path.join(scripts, "evaluate.py"), f"--workdir={serve}",
                    "--val_docs=8"], check=True)
    scored = json.load(open(serve / "eval" / "step_0.json", encoding="utf-8"))["tasks"]["val"]
    np.testing.assert_allclose(scored["bits_per_byte"], rows[name]["bits_per_byte"], rtol=1e-4)


def test_2_4_pruning_groups_inputs_under_a_nested_layers_tree():
  """Fine-tuning nests the GPT under `base`: groups of 4 still run along the inputs of each layer,
  never along the stacked layer axis (numpy reference: the 2 largest |w| of each group of 4)."""
  cfg = small_cfg()
  cfg.compress.prune.update(method="2:4", begin_step=0)
  tx = prune.transform(cfg.compress.prune, total_steps=4)
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3, 8, 5)).astype(np.float32)  # [layers, inputs, outputs]
  params = {"base": {"layers": {"block_0": {"mlp": {"fc": {"kernel": jnp.asarray(w)}}}}}}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  pruned = np.asarray(optax.apply_updates(params, updates)["base"]["layers"]["block_0"]["mlp"]
                      ["fc"]["kernel"])
  groups = np.abs(w).reshape(3, 2, 4, 5)
  keep = np.argsort(np.argsort(groups, axis=2), axis=2) >= 2
  np.testing.assert_array_equal(pruned, np.where(keep.reshape(w.shape), w, 0.0))
