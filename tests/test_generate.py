"""KV-cache generation: exact against full recomputation and Hugging Face, sampling, sharding,
bad inputs, and scripts/sample.py end to end.

Every model here is one small random GPT-2 built in `transformers` (no download) and imported, so
the same weights serve the Hugging Face comparison; decoding compiles once per model variant and
batch shape (the sampling settings are traced values), so the tests share compilations.
"""

import dataclasses
import functools
import json
import os
import random
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import configs
from gptjax import checkpoint, generate, hf, layout, loop, run as run_lib, sharding
from gptjax.data import gpt2_bpe
from gptjax.model import GPT, ModelArgs
from gptjax.train import Trainer

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [42]]  # left-padded to 10
NEW = 64
VOCAB = 257  # 256 bytes + <|endoftext|>: a byte-level GPT-2 vocabulary for the script test


@functools.lru_cache
def hf_model() -> "transformers.GPT2LMHeadModel":
  """A random GPT-2: untied embeddings and std 0.2 weights give greedy paths that do not just
  repeat a token, with top-2 logit gaps (>= 1e-3) far above float error."""
  config = transformers.GPT2Config(
      n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=128, attn_pdrop=0.0,
      resid_pdrop=0.0, embd_pdrop=0.0, initializer_range=0.2, tie_word_embeddings=False,
      bos_token_id=None, eos_token_id=None)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(config).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:  # LayerNorms and biases away from (1, 0)
        p.add_(0.1 * torch.randn_like(p))
  return model


@functools.lru_cache
def imported() -> tuple[ModelArgs, dict]:
  # Vocabulary padded to 320: the 63 padded ids must never come out. Window 6 (for the banded
  # variant) is much shorter than prompt + 64 new tokens.
  args, params = hf.load_hf_model(hf_model(), scan_layers=False, pad_vocab_to=64)
  return dataclasses.replace(args, local_window=6), params


def args_of(attention: str = "dense", scan_layers: bool = False) -> ModelArgs:
  return dataclasses.replace(imported()[0], attention=attention, scan_layers=scan_layers)


def params_of(args: ModelArgs):
  return layout.convert(imported()[1], args.scan_layers, len(args.pattern))


def sample(attention: str = "dense", scan_layers: bool = False, **kwargs) -> list[list[int]]:
  """Two continuations of each prompt, KV-cache path."""
  args = args_of(attention, scan_layers)
  return generate.generate(GPT(args), params_of(args), PROMPTS, NEW, num_return_sequences=2,
                           **kwargs)


@functools.lru_cache
def reference(attention: str) -> list[list[int]]:
  """Greedy by full recomputation (the training forward pass at every step)."""
  args = args_of(attention)
  return generate.generate(GPT(args), params_of(args), PROMPTS, NEW, temperature=0,
                           use_cache=False)


def twice(rows):
  return [r for r in rows for _ in range(2)]


@pytest.mark.parametrize("attention", ["dense", "alternating"])
def test_reference_is_the_argmax_of_one_forward_pass(attention):
  """Teacher forcing on the unpadded sequences: each new token is the argmax after its prefix."""
  args = args_of(attention)
  rows = [p + r for p, r in zip(PROMPTS, reference(attention))]
  tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)  # right-padded: causal, exact
  for row, ids in zip(tokens, rows):
    row[:len(ids)] = ids
  logits = np.asarray(jax.jit(GPT(args).apply)({"params": params_of(args)}, tokens))
  for i, (prompt, new) in enumerate(zip(PROMPTS, reference(attention))):
    assert len(new) == NEW
    np.testing.assert_array_equal(new, logits[i, len(prompt) - 1:len(prompt) + NEW - 1].argmax(-1))
  assert len({t for r in reference(attention) for t in r}) > 25  # not one repeated token


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("attention", ["dense", "alternating"])
def test_greedy_with_cache_equals_full_recomputation(attention, scan_layers):
  got = sample(attention, scan_layers, temperature=0)
  assert got == twice(reference(attention))
  if attention == "alternating":  # the band changes the result, so it was applied
    assert reference("alternating") != reference("dense")


def hf_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
  """`transformers` greedy decoding of left-padded prompts (one thread: tiny ops, no spinning)."""
  p = max(map(len, prompts))
  ids = torch.tensor([[0] * (p - len(x)) + x for x in prompts])
  mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    with torch.no_grad():
      out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                           pad_token_id=0)
  finally:
    torch.set_num_threads(threads)
  return out[:, p:].tolist()


def test_greedy_equals_hugging_face_generate():
  assert sample(temperature=0)[::2] == hf_greedy(hf_model(), PROMPTS, NEW)


def test_top_k_1_is_greedy():
  assert sample(temperature=1.0, top_k=1, seed=7) == twice(reference("dense"))


def test_top_p_keeps_exactly_the_nucleus():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]]))
  kept = lambda **kw: np.isfinite(np.asarray(generate.filter_logits(logits, **kw)))
  np.testing.assert_array_equal(kept(top_p=0.4)[0], [False, True, False, False])
  np.testing.assert_array_equal(kept(top_p=0.75)[0], [False, True, False, True])
  np.testing.assert_array_equal(kept(top_p=0.85)[0], [False, True, True, True])
  np.testing.assert_array_equal(kept(top_p=0.99)[0], [True, True, True, True])
  np.testing.assert_array_equal(kept(top_p=0.3)[1], [True, True, True, True])  # ties stay
  np.testing.assert_array_equal(kept(top_k=2)[0], [False, True, False, True])
  np.testing.assert_array_equal(kept(top_k=2, top_p=0.5)[0], [False, True, False, False])
  kept_logits = np.asarray(generate.filter_logits(logits, top_p=0.75))[0]
  np.testing.assert_allclose(kept_logits[[1, 3]], np.log([0.5, 0.3]), rtol=1e-6)


def test_samples_are_seeded_and_shaped():
  a, again, other = (sample(temperature=1.0, top_p=0.9, seed=s) for s in (1, 1, 2))
  assert a == again and a != other
  assert len(a) == len(PROMPTS) * 2 and all(len(r) == NEW for r in a)
  assert a[0] != a[1]  # two samples of one prompt are drawn independently
  assert all(0 <= t < VOCAB for r in a + other for t in r)  # never a padded vocabulary id
  assert a[::2] != reference("dense")


def test_eos_ends_a_row_and_nothing_follows():
  greedy = reference("dense")
  eos = greedy[0][10]
  got = sample(temperature=0, eos_id=eos)
  for row, full in zip(got, twice(greedy)):
    assert row == (full[:full.index(eos) + 1] if eos in full else full)
  assert len(got[0]) <= 11 and any(len(r) < NEW for r in got)


def test_greedy_under_tensor_parallel_mesh_equals_one_device():
  args = args_of("alternating", scan_layers=True)
  model = GPT(args)
  cfg = configs.load("tiny")
  cfg.mesh.update(data=2, fsdp=1, tensor=2)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
  rules = sharding.rules(cfg.mesh.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  params = jax.device_put(params_of(args), sharding.logical_shardings(boxed["params"], mesh, rules))
  qkv = params["layers"]["block_1"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec[3] == "tensor" and len(qkv.addressable_shards) == 4
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = generate.generate(model, params, PROMPTS, NEW, temperature=0)
  assert got == reference("alternating")


@pytest.mark.parametrize("prompts,kwargs,match", [
    ([], {}, "prompts is empty"),
    ([[1], []], {}, r"prompts\[1\] is empty"),
    ([[1, 500]], {}, r"prompts\[0\] has token ids outside \[0, 257\)"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens must be in"),
    ([[1]], dict(max_new_tokens=128), r"max_new_tokens must be in \[1, ctx - 1\]"),
    ([[1]], dict(temperature=-0.5), "temperature must be >= 0"),
    ([[1]], dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ([[1]], dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ([[1]], dict(top_k=-1), "top_k must be >= 0"),
    ([[1]], dict(num_return_sequences=0), "num_return_sequences must be >= 1"),
    ([[1]], dict(eos_id=VOCAB), "eos_id must be a token id"),
])
def test_bad_inputs_name_the_setting(prompts, kwargs, match):
  with pytest.raises(ValueError, match=match):
    generate.generate(GPT(args_of()), None, prompts, **({"max_new_tokens": 4} | kwargs))


# ---- scripts/sample.py ---------------------------------------------------------------------
def run_sample(*flags: str) -> str:
  out = subprocess.run([sys.executable, "scripts/sample.py", *flags], cwd=ROOT, check=True,
                       capture_output=True, timeout=300,
                       env=os.environ | {"PYTHONIOENCODING": "utf-8"})
  return out.stdout.decode("utf-8")


def test_sample_script_on_a_hugging_face_folder(tmp_path):
  hf_model().save_pretrained(tmp_path)
  vocab = {c: i for i, c in enumerate(gpt2_bpe.bytes_to_unicode().values())}
  tok = gpt2_bpe.GPT2BPETokenizer(vocab | {gpt2_bpe.EOS_TOKEN: 256}, [])
  tok.save(str(tmp_path))
  out = run_sample(f"--hf_dir={tmp_path}", "--prompt=Hi there", "--prompt=x", "--temperature=0",
                   "--max_new_tokens=24", "--nostop_at_eos")
  want = hf_greedy(hf_model(), [tok.encode("Hi there"), tok.encode("x")], 24)
  assert f"--- sample 0 ---\nHi there{tok.decode(want[0])}\n" in out
  assert f"--- sample 1 ---\nx{tok.decode(want[1])}\n" in out
  assert "48 new tokens in" in out and "tokens/s" in out


def test_sample_script_on_a_run_workdir(tmp_path):
  """A workdir as training writes it (tokenizer, config.json, an Orbax checkpoint of the state)."""
  rng = random.Random(0)
  words = "the cat sat on a mat and a dog ran to it def return class import value".split()
  with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
    for _ in range(200):
      f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(10, 60)))}) + "\n")
  cfg = configs.load("tiny")
  cfg.data.update(source="files", paths=str(tmp_path / "docs.jsonl"), val_fraction=0.1,
                  cache_dir=str(tmp_path / "cache"))
  cfg.data.tokenizer.vocab_size = 300
  cfg.model.update(n_layers=2, d_model=32, n_heads=2, ctx=64)
  cfg.mesh.data = 1
  workdir = str(tmp_path / "run")
  tok, mesh = loop.prepare(cfg, workdir, jax.devices()[:1])
  trainer = Trainer.build(cfg, mesh)
  state = trainer.init_state()
  saver = checkpoint.Checkpointer(workdir, cfg.checkpoint)
  saver.save(1, state, {"step": 1})
  saver.close()
  run_lib.write_config(cfg, workdir)

  long = " ".join(["the cat sat on a mat"] * 20)  # longer than ctx: its last 48 tokens are kept
  out = run_sample(f"--workdir={workdir}", "--prompt=the dog", f"--prompt={long}",
                   "--num_samples=2", "--seed=3", "--max_new_tokens=16", "--temperature=1.0",
                   "--top_k=20")
  # The same samples from the library, in the run's scanned layout, the long prompt cut by hand.
  assert len(tok.encode(long)) > 64
  prompts = [tok.encode("the dog"), tok.encode(long)[-(64 - 16):]]
  want = generate.generate(trainer.model, state.params, prompts, 16, temperature=1.0, top_k=20,
                           top_p=0.95, num_return_sequences=2, eos_id=tok.eos_id, seed=3)
  for i, new in enumerate(want):
    new = new[:-1] if new and new[-1] == tok.eos_id else new
    assert f"--- sample {i} ---\n{['the dog', long][i // 2]}{tok.decode(new)}\n" in out
  assert "tokens/s" in out

