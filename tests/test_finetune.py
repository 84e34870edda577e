"""Fine-tuning: GPT-1's input transformations, task heads, SFT masking and packing, whole runs."""

import dataclasses
import functools
import glob
import json
import os
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from gptjax import checkpoint, config as config_lib, finetune, heads, loop, metrics, peft
from gptjax import run as run_lib, sharding
from gptjax.config import ConfigError
from gptjax.data import sft, tokenizer as tokenizer_lib
from gptjax.data.errors import DataError
from gptjax.model import GPT, ModelArgs
from gptjax.train import StepConfig, Trainer

WORDS = ("the cat sat on a mat and dog ran to it while bird sang in tree above them red blue green "
         "big small old new fast slow one two three four what says question answer :").split()
MARKER = "zebra"


class WordTokenizer:
  """One token per whitespace-separated word: exact, instant, and enough for these tests."""

  kind, threaded = "words", False
  pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

  def __init__(self, words):
    self.words = ["<pad>", "<unk>", "<bos>", "<eos>"] + list(words)
    self.ids = {w: i for i, w in enumerate(self.words)}
    self.vocab_size = len(self.words)

  def encode(self, text):
    return [self.ids.get(w, self.unk_id) for w in text.split()]

  def decode(self, ids):
    return " ".join(self.words[i] for i in ids)


TOK = WordTokenizer(WORDS + [MARKER])


def marker_records(n, seed=0, marker=MARKER):
  """Random word sequences; the label is 1 iff the marker word occurs (half of them)."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    words = rng.choices(WORDS[:24], k=rng.randint(4, 20))
    label = i % 2
    if label:
      words.insert(rng.randrange(len(words) + 1), marker)
    out.append((f"mem:{i}", {"text": " ".join(words), "label": label}))
  return out


def small_cfg(task="classify", method="none", steps=40, seq_len=32, **finetune_overrides):
  c = configs.load("tiny")
  c.model.update(n_layers=2, d_model=32, n_heads=2, ctx=seq_len, vocab_size=TOK.vocab_size,
                 pad_vocab_to=1)
  c.train.update(global_batch=16, steps=steps, seq_len=seq_len, sample_tokens=0)
  c.optim.update(warmup_steps=min(5, steps - 1), peak_lr=3e-3, weight_decay=0.0)
  c.finetune.update(task=task, peft=method, head_dropout=0.0, **finetune_overrides)
  c.mesh.data = 1
  return c


def build(cfg, devices=None):
  return finetune.FineTune.build(cfg, sharding.make_mesh(cfg.mesh, devices or jax.devices()[:1]))


def run_steps(ft, state, rows, steps):
  """`steps` optimizer steps on shuffled batches of `rows`; returns (state, losses)."""
  ds = sft.train_batches(rows, micro_batch=ft.trainer.cfg.train.global_batch,
                         seed=ft.trainer.cfg.seed)
  losses = []
  for step in range(steps):
    state, m = ft.trainer.step(state, {k: v[None] for k, v in ds[step].items()})
    losses.append(float(m["loss"]))
  return state, losses


def train(cfg, rows, devices=None):
  """Fine-tunes on `rows` for cfg.train.steps steps; returns (ft, state, losses)."""
  ft = build(cfg, devices)
  state, losses = run_steps(ft, ft.trainer.init_state(), rows, cfg.train.steps)
  return ft, state, losses


def fmt(task, **kw):
  return sft.Format(task=task, seq_len=kw.pop("seq_len", 16), **kw)


# ---- GPT-1 input transformations -----------------------------------------------------------------
def test_sequences_follow_gpt1_input_transformations():
  ids = lambda s: TOK.encode(s)
  s, e, d = TOK.bos_id, TOK.eos_id, ids(":")
  one = lambda task, record, **kw: sft.encode([("x:1", record)], fmt(task, **kw), TOK).rows[0]
  row = one("classify", {"text": "the cat", "label": 1})
  assert list(row["inputs"][:4]) == [s] + ids("the cat") + [e] and row["extract"].tolist() == [3]
  assert row["labels"].tolist() == [1] and (row["inputs"][4:] == TOK.pad_id).all()
  pair = {"premise": "the cat", "hypothesis": "a dog", "label": 0}
  row = one("entail", pair, text_fields=("premise", "hypothesis"), delimiter=":")
  assert list(row["inputs"][:7]) == [s] + ids("the cat") + d + ids("a dog") + [e]
  assert row["extract"].tolist() == [6]
  row = one("similarity", pair, text_fields=("premise", "hypothesis"), delimiter=":")
  assert row["inputs"].shape == (2, 8)  # both orderings, padded to the longest (a multiple of 8)
  assert list(row["inputs"][1, :7]) == [s] + ids("a dog") + d + ids("the cat") + [e]
  row = one("multiple_choice", {"text": "the cat", "choices": ["sat", "ran on"], "label": "ran on"},
            delimiter=":")
  assert list(row["inputs"][0, :6]) == [s] + ids("the cat") + d + ids("sat") + [e]
  assert list(row["inputs"][1, :7]) == [s] + ids("the cat") + d + ids("ran on") + [e]
  assert row["extract"].tolist() == [5, 6] and row["labels"].tolist() == [1]
  row = one("token_classify", {"text": ["the", "zebra"], "label": ["O", "X"]}, classes=("O", "X"),
            lm=True)
  assert list(row["inputs"][:3]) == [s] + ids("the zebra")
  assert row["labels"][:3].tolist() == [0, 0, 1] and row["label_weights"][:3].tolist() == [0, 1, 1]
  assert row["targets"][:2].tolist() == ids("the zebra") and row["weights"].sum() == 2
  # Too long: the first part loses its front, the extract token stays last.
  row = one("classify", {"text": " ".join(["cat"] * 30) + " dog", "label": 0})
  assert row["inputs"][-1] == e and row["inputs"][-2] == TOK.ids["dog"] and row["inputs"][0] == s
  lm = one("classify", {"text": "the cat", "label": 1}, lm=True)
  assert lm["targets"][:3].tolist() == ids("the cat") + [e] and lm["weights"].sum() == 3


def test_sft_masks_the_prompt_and_packs_examples_apart():
  records = [("x:1", {"q": "one two", "completion": "three"}),
             ("x:2", {"q": "four", "completion": "red blue green"}),
             ("x:3", {"q": "cat " * 12, "completion": "dog"})]
  enc = sft.encode(records, fmt("sft", seq_len=16, template="question {q} answer"), TOK)
  rows = enc.rows.arrays
  assert rows["inputs"].shape == (2, 16)  # the first two share a row, the third needs its own
  n1 = 1 + 4 + 1  # [BOS] question one two answer | three [EOS]: 7 tokens, 6 positions
  assert rows["segment_ids"][0, :n1].tolist() == [1] * n1
  assert rows["positions"][0, :n1].tolist() == list(range(n1))
  assert rows["positions"][0, n1] == 0 and rows["segment_ids"][0, n1] == 2  # restarts
  # Loss only where the target is a completion token or the EOS.
  assert rows["weights"][0, :n1].tolist() == [0, 0, 0, 0, 1, 1]
  assert TOK.decode(rows["targets"][0, 4:6]) == "three <eos>"
  assert rows["weights"][0].sum() == 2 + 4 and rows["weights"][1].sum() == 2
  assert enc.pairs[1] == ([TOK.bos_id] + TOK.encode("question four answer"),
                          TOK.encode("red blue green") + [TOK.eos_id])
  unpacked = sft.encode(records, fmt("sft", seq_len=16, template="question {q} answer",
                                     pack=False), TOK).rows.arrays
  assert unpacked["inputs"].shape == (3, 16)  # the longest fills seq_len


@functools.lru_cache(maxsize=None)
def _tiny_model():
  """A small GPT and its initial params (jitted, from an RBG key: both compile much faster)."""
  args = ModelArgs(vocab_size=TOK.vocab_size, ctx=32, n_layers=2, d_model=32, n_heads=2, d_head=16,
                   d_ff=64)
  model = GPT(args)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), tokens))
  return model, params["params"]


def test_sft_prompt_tokens_get_no_gradient_and_packing_equals_unpacked():
  model, params = _tiny_model()
  spec = finetune.Spec(task="sft", num_classes=0)
  sc = StepConfig(seed=0, z_loss=0.0, dropout=False, vocab_parallel=False)
  records = [(f"x:{i}", {"prompt": " ".join(random.Random(i).choices(WORDS, k=3 + i)),
                         "completion": "red blue"}) for i in range(4)]
  packed = sft.encode(records, fmt("sft", seq_len=32), TOK).rows.arrays
  alone = sft.encode(records, fmt("sft", seq_len=32, pack=False), TOK).rows.arrays
  assert len(packed["inputs"]) == 1 and len(alone["inputs"]) == 4
  assert packed["weights"].sum() == alone["weights"].sum() == 4 * 3  # 'red blue <eos>' each
  pad = lambda v: np.concatenate([v, np.zeros((3,) + v.shape[1:], v.dtype)])  # 4 rows, as alone
  packed = {k: pad(v) for k, v in packed.items()}

  @jax.jit
  @jax.value_and_grad
  def loss(p, batch):
    return finetune.loss_sums({"base": p}, None, batch, None, None, sc, None, None, spec=spec,
                              model=model, head=None)[0]

  # Segment ids and restarting positions: a packed row trains exactly as its examples alone.
  (t_packed, g_packed), (t_alone, _) = loss(params, packed), loss(params, alone)
  np.testing.assert_allclose(t_packed, t_alone, rtol=1e-5)

  @jax.jit
  def grad_hidden(batch):
    h = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                    method="hidden")
    return jax.grad(lambda h: finetune._lm_sums(model, params, h, batch["targets"],
                                                batch["weights"], sc, None, None)[0])(h)

  # d loss / d hidden state is exactly zero at every prompt (and padding) position ...
  g = np.asarray(grad_hidden(packed))
  masked = packed["weights"] == 0
  assert np.abs(g[masked]).max() == 0.0 and np.abs(g[~masked]).min() > 0
  # ... so changing what the prompt "should" predict changes neither the loss nor the gradients.
  t_other, g_other = loss(params, dict(packed, targets=np.where(masked, 5, packed["targets"])))
  assert float(t_other) == float(t_packed)
  jax.tree.map(np.testing.assert_array_equal, g_other, g_packed)


# ---- task heads ----------------------------------------------------------------------------------
def _head_logits(task, records, **kw):
  """heads.task_logits of a random GPT and head on the encoded records."""
  model, params = _tiny_model()
  head = heads.Head(heads.num_outputs(task, 2))
  head_params = jax.jit(head.init)(jax.random.key(1), jnp.zeros((1, 32)))["params"]
  batch = sft.encode(records, fmt(task, **kw), TOK).rows.arrays

  @jax.jit
  def logits(batch):
    trunk = lambda t: model.apply({"params": params}, t, method="hidden")
    return heads.task_logits(task, trunk, lambda x: head.apply({"params": head_params}, x),
                             batch)[0]
  return np.asarray(logits(batch))


def test_multiple_choice_scores_each_choice_alone_and_shuffling_permutes_the_prediction():
  choices = ["red", "blue green", "big old cat", "one"]
  record = lambda cs: ("x:1", {"text": "what says the dog", "choices": cs, "label": 0})
  rng = np.random.default_rng(0)
  perms = [rng.permutation(4) for _ in range(3)]
  changed = choices[:3] + ["two three"]
  logits = _head_logits("multiple_choice", [record(choices), record(changed)]
                        + [record([choices[i] for i in p]) for p in perms], delimiter=":")
  assert logits.shape == (5, 4)
  for p, row in zip(perms, logits[2:]):
    np.testing.assert_allclose(row, logits[0][p], rtol=1e-5, atol=1e-6)
    assert choices[p[row.argmax()]] == choices[logits[0].argmax()]
  # Replacing one choice leaves the other choices' scores as they were.
  np.testing.assert_allclose(logits[1, :3], logits[0, :3], rtol=1e-5, atol=1e-6)
  assert abs(logits[1, 3] - logits[0, 3]) > 1e-4


def test_similarity_sums_both_orderings_so_it_is_symmetric_and_token_heads_label_tokens():
  pair = lambda a, b: ("x:1", {"a": a, "b": b, "label": 1})
  logits = _head_logits("similarity", [pair("the cat sat", "a dog"), pair("a dog", "the cat sat")],
                        text_fields=("a", "b"), delimiter=":")
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-6)
  tokens = _head_logits("token_classify", [("x:1", {"text": ["the", "cat"], "label": [0, 1]})])
  assert tokens.shape == (1, 8, 2)


def test_aux_lm_loss_adds_lambda_times_the_lm_loss_per_example():
  model, params = _tiny_model()
  head = heads.Head(2)
  hp = jax.jit(head.init)(jax.random.key(1), jnp.zeros((1, 32)))["params"]
  sc = StepConfig(seed=0, z_loss=0.0, dropout=False, vocab_parallel=False)
  batch = sft.encode(marker_records(8), fmt("classify", lm=True), TOK).rows.arrays

  @jax.jit
  def sums():
    out = []
    for lam in (0.0, 0.5):
      spec = finetune.Spec(task="classify", num_classes=2, aux_lm_weight=lam)
      out.append(finetune.loss_sums({"base": params, "head": hp}, None, batch, None, None, sc,
                                    None, None, spec=spec, model=model, head=head))
    h = model.apply({"params": params}, batch["inputs"], method="hidden")
    return out, finetune._lm_sums(model, params, h, batch["targets"], batch["weights"], sc, None,
                                  None)

  (plain, with_lm), (lm, n) = sums()
  assert plain[1] == with_lm[1] == 8  # per example
  np.testing.assert_allclose(with_lm[0] / 8, plain[0] / 8 + 0.5 * lm / n, rtol=1e-5)


# ---- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def marker_data():
  f = fmt("classify", seq_len=32)
  return sft.encode(marker_records(512, seed=0), f, TOK), sft.encode(marker_records(200, seed=1),
                                                                     f, TOK)


def test_full_finetuning_learns_the_marker_task(marker_data):
  train_set, val_set = marker_data
  ft, state, losses = train(small_cfg(steps=40), train_set.rows)
  result = ft.evaluate(state, sft.eval_batches(val_set.rows, 16))
  print(f"full fine-tuning: {result}")
  assert result["val_accuracy"] >= 0.95 and losses[-1] < losses[0]


METHODS = {  # name: (finetune settings, peak learning rate)
    "full": (dict(), 3e-3),
    "frozen (head only)": (dict(freeze="."), 1e-2),
    "lora r=4": (dict(method="lora"), 1e-2),
    "adapters d=16": (dict(method="adapters", adapter_dim=16), 1e-2),
    "prefix P=8": (dict(method="prefix", prefix_len=8), 1e-2),
}


def story_records(n, seed=0):
  """Pre-training text in which the marker matters: after it, only colours and sizes follow, so a
  language model learns to keep track of whether it has been seen."""
  rng, out = random.Random(seed), []
  for i in range(n):
    words = rng.choices(WORDS[:24], k=rng.randint(4, 20))
    if i % 2:
      at = rng.randrange(len(words) + 1)
      words = words[:at] + [MARKER] + rng.choices(WORDS[16:24], k=len(words) - at)
    out.append((f"story:{i}", {"text": " ".join(words), "label": i % 2}))
  return out


def pretrained_base(steps=400):
  """A small GPT trained as a language model on `story_records` (host arrays)."""
  cfg = small_cfg(steps=steps)
  trainer = Trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  text = sft.encode(story_records(4096, seed=7), fmt("classify", seq_len=32, lm=True), TOK).rows
  ds = sft.train_batches(text, micro_batch=16, seed=0)
  state = trainer.init_state()
  for step in range(steps):
    batch = {k: v[None] for k, v in ds[step].items() if k in ("inputs", "targets", "weights")}
    state, m = trainer.step(state, batch)
  print(f"\nbase: language-model loss {float(m['loss']):.3f} after {steps} steps")
  return jax.device_get(state.params)  # on the host: each run's first step donates its copy


@pytest.mark.slow
def test_accuracy_of_full_frozen_lora_adapter_and_prefix_fine_tuning(marker_data):
  """Each method fine-tunes a random base and one pre-trained on related text (150 steps each)."""
  train_set, val_set = marker_data
  bases = {"random base": None, "pre-trained base": pretrained_base()}
  results = {}
  for name, (settings, lr) in METHODS.items():
    for base_name, base in bases.items():
      cfg = small_cfg(steps=150, **settings)
      cfg.finetune.lora.rank = 4
      cfg.optim.peak_lr = lr
      ft = build(cfg)
      state = ft.trainer.init_state()
      state, _ = run_steps(ft, state if base is None else ft.load_base(state, base),
                           train_set.rows, 150)
      accuracy = ft.evaluate(state, sft.eval_batches(val_set.rows, 16))["val_accuracy"]
      trainable, total = ft.counts()
      results[name, base_name] = (accuracy, trainable / total)
      if base is None:
        print(f"{name}: {trainable:,} of {total:,} parameters train")
  print("| method | trainable | " + " | ".join(bases) + " |\n|---|---|---|---|")
  for name in METHODS:
    print(f"| {name} | {100 * results[name, 'random base'][1]:.2f}% | "
          + " | ".join(f"{results[name, b][0]:.3f}" for b in bases) + " |")
  for base_name in bases:
    assert results["full", base_name][0] >= 0.95 and results["lora r=4", base_name][0] >= 0.95
  assert results["lora r=4", "random base"][1] < 0.05
  assert all(results[name, "pre-trained base"][0] >= 0.9 for name in METHODS)


SFT_PAIRS = [("cat", "sat on a mat"), ("dog", "ran to it"), ("bird", "sang in tree"),
             ("red", "blue"), ("one", "two three four"), ("old", "new"), ("fast", "slow slow"),
             ("big", "small cat"), ("tree", "above them"), ("green", "red red blue"),
             ("two", "one"), ("mat", "the cat sat")]


def test_sft_learns_a_fixed_mapping_to_exact_match():
  records = [(f"x:{i}", {"prompt": f"what says the {p}", "completion": c})
             for i, (p, c) in enumerate(SFT_PAIRS)]
  cfg = small_cfg(task="sft", steps=150, template="question {prompt} answer :")
  cfg.optim.peak_lr = 1e-2
  enc = sft.encode(records * 8, sft.Format.from_config(cfg.finetune, 32), TOK)
  ft, state, losses = train(cfg, enc.rows)
  pairs = enc.pairs[:len(SFT_PAIRS)]
  match = ft.exact_match(state, pairs, TOK.eos_id)
  print(f"sft exact match {match:.2f}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  assert match >= 0.9


# ---- errors and configs --------------------------------------------------------------------------
def test_bad_inputs_raise_errors_naming_the_setting(tmp_path):
  f = fmt("classify", classes=("neg", "pos"))
  with pytest.raises(DataError, match=r"finetune\.classes.*x:1.*'maybe'"):
    sft.encode([("x:1", {"text": "the cat", "label": "maybe"})], f, TOK)
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"text": "the cat", "label": "pos"}) + "\n" + json.dumps({"txt": "a"})
                  + "\n")
  with pytest.raises(DataError, match=r"finetune\.text_fields.*bad\.jsonl:2.*'text'"):
    sft.load(str(path), "finetune.train_path", f, TOK)
  with pytest.raises(DataError, match=r"finetune\.completion_field.*'completion'"):
    sft.encode([("x:1", {"prompt": "the"})], fmt("sft"), TOK)
  with pytest.raises(DataError, match=r"finetune\.template.*'question'"):
    sft.encode([("x:1", {"prompt": "the", "completion": "a"})], fmt("sft", template="{question}"),
               TOK)
  with pytest.raises(DataError, match=r"finetune\.label_field.*neither a choice"):
    sft.encode([("x:1", {"text": "a", "choices": ["b", "c"], "label": 2})],
               fmt("multiple_choice"), TOK)
  with pytest.raises(DataError, match=r"finetune\.train_path"):
    sft.load(str(tmp_path / "missing.jsonl"), "finetune.train_path", f, TOK)
  for task, method, key, value, match in [
      ("classify", "none", "task", "summarise", r"finetune\.task"),
      ("classify", "none", "peft", "ia3", r"finetune\.peft"),
      ("classify", "lora", "lora.rank", 0, r"finetune\.lora\.rank"),
      ("classify", "lora", "lora.rank", -2, r"finetune\.lora\.rank"),
      ("classify", "none", "classes", "pos", r"finetune\.classes"),
      ("entail", "none", "text_fields", "premise", r"finetune\.text_fields"),
      ("classify", "lora", "freeze", "wte", r"finetune\.freeze")]:
    cfg = small_cfg(task, method, text_fields="a,b" if task == "entail" else "text")
    section = cfg.finetune.lora if key.startswith("lora.") else cfg.finetune
    section[key.removeprefix("lora.")] = value
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(cfg, n_devices=1)


def test_every_finetune_preset_parses_and_validates():
  presets = sorted(glob.glob(os.path.join(os.path.dirname(configs.__file__), "finetune_*.py")))
  assert len(presets) >= 2
  for path in presets:
    for arg in ("",) + heads.TASKS[:-1] if "gpt1" in path else ("",) + peft.METHODS:
      cfg = configs.load(f"{path}:{arg}" if arg else path)
      config_lib.validate(cfg, n_devices=jax.device_count())
      assert cfg.finetune.task == (arg or "classify") or "gpt1" not in path, (path, arg)


# ---- whole runs ----------------------------------------------------------------------------------
def write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for _, record in records:
      f.write(json.dumps(record) + "\n")
  return str(path)


def make_base(root, name, d_model=32):
  """A gptjax run to fine-tune: a SentencePiece tokenizer and a params-only checkpoint."""
  workdir = str(root / name)
  c = configs.load("tiny")
  docs = write_jsonl(root / "docs.jsonl", marker_records(200, seed=5))
  c.data.update(source="files", paths=docs, val_fraction=0.0, cache_dir=str(root / "cache"))
  c.data.tokenizer.vocab_size = 300
  tok = tokenizer_lib.load_or_train(c.data, workdir)
  c.model.update(n_layers=2, d_model=d_model, n_heads=2, ctx=64, vocab_size=tok.vocab_size)
  shapes = jax.eval_shape(GPT(ModelArgs.from_config(c.model)).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(3)
  init = lambda path, x: (np.ones if path[-1].key == "scale" else np.zeros)(x.shape, np.float32) \
      if path[-1].key in ("scale", "bias") else rng.normal(0, 0.02, x.shape).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(init, nn.meta.unbox(shapes))
  run_lib.save_params(workdir, 0, params, {"config": json.loads(c.to_json_best_effort())})
  return workdir


def test_run_fine_tunes_a_gptjax_base_with_lora_and_restores_onto_it(tmp_path):
  base = make_base(tmp_path, "base")
  cfg = small_cfg(method="lora", steps=20, seq_len=64, base=base,
                  train_path=write_jsonl(tmp_path / "train.jsonl", marker_records(256, seed=0)),
                  val_path=write_jsonl(tmp_path / "val.jsonl", marker_records(64, seed=1)))
  cfg.finetune.update(head_dropout=0.1)  # dropout in the trunk and before the head
  cfg.model.resid_dropout = 0.1
  cfg.finetune.lora.rank = 4
  cfg.optim.peak_lr = 1e-2
  cfg.train.update(log_every=5, eval_every=10, progress=False)
  cfg.checkpoint.save_every = 10
  workdir = str(tmp_path / "ft")
  summary = finetune.run(cfg, workdir, devices=jax.devices()[:1])
  for name in ("config.json", "tokenizer.model", "metrics.jsonl", "checkpoints/20"):
    assert os.path.exists(os.path.join(workdir, name)), name
  rows = metrics.read(workdir)
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  assert "val_accuracy" in rows[1] and rows[-1]["loss"] < rows[0]["loss"]
  assert summary["steps"] == 20 and summary["trainable_fraction"] < 0.05
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["vocab_size"] == 300
  # The run's checkpoint holds the LoRA pairs and the head; the frozen base is read from `base`.
  restored = finetune.restore(workdir, devices=jax.devices()[:1])
  assert restored.step == 20 and set(restored.state.params) == {"head", "lora"}
  stored = checkpoint.Reader(base).read_all(0)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state.frozen["base"]), stored)
  val = sft.load(cfg.finetune.val_path, "finetune.val_path",
                 sft.Format.from_config(restored.cfg.finetune, 64), restored.tokenizer)
  again = restored.ft.evaluate(restored.state, sft.eval_batches(val.rows, 16))
  assert again["val_accuracy"] == pytest.approx(summary["val_accuracy"])
  # LoRA weights refuse a base of another shape, naming the setting.
  with pytest.raises(ConfigError, match=r"config\.finetune\.base: the LoRA weights do not fit"):
    finetune.restore(workdir, base=make_base(tmp_path, "wider", d_model=64),
                     devices=jax.devices()[:1])


def make_hf_base(root):
  """A local Hugging Face GPT-2 folder (random weights) with a small byte-level BPE vocabulary."""
  from gptjax import hf  # pylint: disable=import-outside-toplevel
  from gptjax.data import gpt2_bpe  # pylint: disable=import-outside-toplevel

  path = root / "hf"
  path.mkdir()
  vocab = {c: i for i, c in enumerate(gpt2_bpe.bytes_to_unicode().values())}
  merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  vocab[gpt2_bpe.EOS_TOKEN] = len(vocab)
  (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                   encoding="utf-8")
  args = ModelArgs(vocab_size=len(vocab), ctx=64, n_layers=2, d_model=32, n_heads=2, d_head=16,
                   d_ff=128, scan_layers=False)
  shapes = jax.eval_shape(GPT(args).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(0)
  # LayerNorm gains near 1; token embeddings large enough that frozen, they can still give the
  # logits a LoRA-tuned trunk asks for.
  std = lambda key: 0.5 if "wte" in key else 0.05
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: (rng.normal(0, std(jax.tree_util.keystr(p)), s.shape)
                    + ("scale" in jax.tree_util.keystr(p))).astype(np.float32),
      nn.meta.unbox(shapes["params"]))
  hf.to_hf_model(params, args).save_pretrained(str(path))
  return str(path), hf.params_from_hf(hf.to_hf_model(params, args).state_dict(),
                                      dataclasses.replace(args, scan_layers=True))


@pytest.mark.slow
def test_run_fine_tunes_a_hugging_face_base_with_sft(tmp_path):
  base, hf_params = make_hf_base(tmp_path)
  records = [(f"x:{i}", {"prompt": f"the cat {p}", "completion": f" {c}"})
             for i, (p, c) in enumerate(SFT_PAIRS)]
  cfg = small_cfg(task="sft", method="lora", steps=150, seq_len=64, base=base,
                  train_path=write_jsonl(tmp_path / "train.jsonl", records * 4),
                  val_path=write_jsonl(tmp_path / "val.jsonl", records), match_examples=12)
  cfg.finetune.lora.targets = "attn|mlp"
  cfg.optim.peak_lr = 3e-2
  cfg.model.pad_vocab_to = 1
  cfg.train.update(log_every=25, eval_every=75, progress=False)
  workdir = str(tmp_path / "ft")
  summary = finetune.run(cfg, workdir, devices=jax.devices()[:1])
  rows = metrics.read(workdir)
  assert "val_exact_match" in rows[-1] and rows[-1]["val_loss"] < 0.5 * rows[0]["loss"]
  assert sorted(os.listdir(os.path.join(workdir, "tokenizer"))) == ["merges.txt", "vocab.json"]
  restored = finetune.restore(workdir, devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_allclose, jax.device_get(restored.state.frozen["base"]),
               jax.tree.map(np.asarray, hf_params))
  print(f"HF base + LoRA SFT: {summary}")


def test_gpt1_warmup_fraction_never_rounds_to_no_warmup():
  # GPT-1: 0.2% of the run. int(0.002 * 300) was 0: no warmup at all below 500 steps.
  assert [finetune.warmup_steps(0.002, n) for n in (10, 300, 499, 1000, 10_000)] == [1, 1, 1, 2, 20]
  assert finetune.warmup_steps(0.0, 300) == 0


@pytest.mark.parametrize("key, value", [
    ("compress.qat.enabled", True), ("compress.distill.teacher", "runs/teacher"),
    ("eval.tasks", "qa:tests/data/mc.jsonl:mc"), ("checkpoint.restore_from", "runs/x"),
    ("train.sample_tokens", 32)])
def test_finetuning_refuses_settings_it_does_not_implement(tmp_path, key, value):
  cfg = configs.load("finetune_gpt1:classify")
  section, name = key.rsplit(".", 1)
  node = cfg
  for part in section.split("."):
    node = node[part]
  node[name] = value
  cfg.finetune.train_path = str(tmp_path / "train.jsonl")
  with pytest.raises(ConfigError, match=f"config.{key}: fine-tuning does not do"):
    finetune.run(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def _lifecycle_cfg(tmp_path, base, steps=12):
  cfg = small_cfg(method="lora", steps=steps, seq_len=64, base=base,
                  train_path=write_jsonl(tmp_path / "train.jsonl", marker_records(128, seed=0)),
                  val_path=write_jsonl(tmp_path / "val.jsonl", marker_records(32, seed=1)))
  cfg.finetune.update(head_dropout=0.1)  # dropout keys must resume too
  cfg.finetune.lora.rank = 4
  cfg.train.update(log_every=1, eval_every=6, progress=False)
  cfg.checkpoint.save_every = 4
  return cfg


@pytest.mark.slow
def test_fine_tuning_runs_the_one_loop_sigterm_resume_nonfinite_skip_and_workdir_check(
    tmp_path, monkeypatch):
  """SIGTERM saves and the resumed fine-tune equals the uninterrupted one bit for bit;
  train.nonfinite='skip' skips (it raised on the first NaN before); another run's workdir is
  refused before anything is written."""
  from test_checkpoint import preempt_at, snapshot  # pylint: disable=import-outside-toplevel
  base = make_base(tmp_path, "base")
  one = jax.devices()[:1]
  straight = str(tmp_path / "straight")
  finetune.run(_lifecycle_cfg(tmp_path, base), straight, devices=one)
  with monkeypatch.context() as m:
    preempt_at(m, 6)  # as after SIGTERM: a checkpoint at step 6, between save points
    summary = finetune.run(_lifecycle_cfg(tmp_path, base), str(tmp_path / "resumed"), devices=one)
  assert summary["preempted"] and summary["steps"] == 6
  assert checkpoint.Reader(str(tmp_path / "resumed")).steps() == [4, 6]
  finetune.run(_lifecycle_cfg(tmp_path, base), str(tmp_path / "resumed"), devices=one)
  a = {r["step"]: r for r in metrics.read(straight)}
  b = {r["step"]: r for r in metrics.read(str(tmp_path / "resumed"))}
  assert sorted(a) == sorted(b) == list(range(1, 13))
  assert all(a[s]["loss"] == b[s]["loss"] for s in a), [(a[s]["loss"], b[s]["loss"]) for s in a]
  assert a[12]["val_loss"] == b[12]["val_loss"]
  final = [checkpoint.Reader(w).read_all(12) for w in (straight, str(tmp_path / "resumed"))]
  jax.tree.map(np.testing.assert_array_equal, *final)

  # NaN label weights in the 3rd training batch: the update is skipped and the run goes on.
  real, seen = loop.feed.HostRows.to_global, {"n": 0}

  def to_global(self, batch, leading=0):
    batch = dict(batch)
    if leading == 1:  # a training step's [accum, B, ...] batch
      seen["n"] += 1
      if seen["n"] == 3:
        batch["label_weights"] = np.full_like(batch["label_weights"], np.nan)
    return real(self, batch, leading)

  monkeypatch.setattr(loop.feed.HostRows, "to_global", to_global)
  cfg = _lifecycle_cfg(tmp_path, base, steps=6)
  cfg.train.nonfinite = "skip"
  summary = finetune.run(cfg, str(tmp_path / "skip"), devices=one)
  rows = {r["step"]: r for r in metrics.read(str(tmp_path / "skip"))}
  assert summary["steps"] == 6 and np.isnan(rows[3]["loss"]) and np.isfinite(rows[6]["loss"])
  monkeypatch.setattr(loop.feed.HostRows, "to_global", real)

  # A pre-training run's workdir, and a fine-tune with another task, are refused untouched.
  pre = tmp_path / "pretrain"
  for workdir, edit, message in [
      (str(pre), None, "holds a pre-training run, and this is a fine-tuning run"),
      (straight, lambda c: c.finetune.update(peft="adapters"), r"finetune\.peft 'lora' -> "
       "'adapters'")]:
    if edit is None:
      os.makedirs(pre / "checkpoints" / "3")
      with open(pre / "config.json", "w", encoding="utf-8") as f:
        json.dump(json.loads(configs.load("tiny").to_json_best_effort()), f)
    cfg = _lifecycle_cfg(tmp_path, base)
    if edit:
      edit(cfg)
    before = snapshot(workdir)
    with pytest.raises(ConfigError, match=message):
      finetune.run(cfg, workdir, devices=one)
    assert snapshot(workdir) == before
