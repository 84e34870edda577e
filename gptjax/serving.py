"""A trained model opened for scoring and sampling: a run's checkpoint (float, or a quantized
serving checkpoint from scripts/compress.py) or a Hugging Face GPT-2 folder.

    served = serving.open_run("runs/tiny")             # or serving.open_hf("path/to/gpt2")
    out = serving.sample(serving.unrolled(served), ["The "], max_new_tokens=50)
    print(out.texts[0], out.tokens_per_s)

`scripts/sample.py` and `scripts/evaluate.py` are thin over this module. Quantized checkpoints
need the `compress` extra (Qwix); float runs and HF folders do not.
"""

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from gptjax import checkpoint, generate, hf, layout, run as run_lib
from gptjax.data import gpt2_bpe
from gptjax.errors import ConfigError
from gptjax.model import GPT


@dataclasses.dataclass
class Served:
  """A model ready for `gptjax.evaluate.Scorer` or `gptjax.generate`.

  `mesh` is None for an HF folder (single device). `routing()` is the context scoring a quantized
  model needs (`gptjax.quantize.routing`); a no-op otherwise.
  """

  model: GPT
  params: Any
  tokenizer: Any
  cfg: ml_collections.ConfigDict | None = None
  step: int = 0
  mesh: Any = None
  rules: tuple = ()
  quantized: bool = False
  batch_size: int = 8  # the run's micro-batch: what fits its devices when scoring

  def routing(self):
    if not self.quantized:
      return contextlib.nullcontext()
    from gptjax import quantize  # the compress extra, only for quantized checkpoints
    return quantize.routing()


def open_run(workdir: str, step: int | None = None, devices=None,
             setting: str = "--workdir") -> Served:
  """A run's checkpoint (the latest, or `step`), float or quantized, on `devices` (default all)
  over `run.inference_mesh`."""
  if checkpoint.is_quantized(workdir, step):
    from gptjax import quantize  # the compress extra, only for quantized checkpoints
    q = quantize.load(workdir, step, devices)
    if q.tokenizer is None:
      raise ConfigError(f"{setting}: {workdir!r} has no saved tokenizer, so text cannot be encoded "
                        "as in training. Write it with gptjax.quantize.save(..., source=<run>).")
    return Served(q.model, q.params, q.tokenizer, q.cfg, q.step, q.mesh, q.rules, quantized=True)
  r = run_lib.restore(workdir, step, devices, setting)
  return Served(r.trainer.model, r.params, r.tokenizer, r.cfg, r.step, r.trainer.mesh,
                r.trainer.rules, batch_size=r.trainer.run.micro_batch)


class _Ids:
  """Token ids as text, for an HF folder without vocab.json / merges.txt."""

  eos_id = None

  def encode(self, text: str) -> list[int]:
    try:
      return [int(t) for t in text.split()]
    except ValueError as e:
      raise ConfigError(f"prompt {text!r}: the HF folder has no vocab.json + merges.txt, so "
                        "prompts must be space-separated token ids") from e

  def decode(self, ids) -> str:
    return "".join(f" {i}" for i in ids)


def open_hf(hf_dir: str) -> Served:
  """A local Hugging Face GPT-2 folder (`save_pretrained`), layers unrolled, on one device. Its
  vocab.json + merges.txt, when present, are the tokenizer; otherwise text is token ids."""
  args, params = hf.load_hf_model(hf_dir, scan_layers=False)
  tokenizer = (gpt2_bpe.GPT2BPETokenizer.from_dir(hf_dir, "--hf_dir")
               if all(os.path.isfile(os.path.join(hf_dir, f))
                      for f in (gpt2_bpe.VOCAB_FILE, gpt2_bpe.MERGES_FILE)) else _Ids())
  return Served(GPT(args), params, tokenizer)


def unrolled(served: Served) -> Served:
  """The same model with its layers unrolled (`scan_layers=False`): faster KV-cache decoding, since
  a scanned decode copies every layer's cache slice in and out at each step."""
  args = served.model.args
  if served.quantized or not args.scan_layers:
    return served
  params = layout.unstack(served.params, len(args.pattern))
  return dataclasses.replace(served, model=GPT(dataclasses.replace(args, scan_layers=False)),
                             params=params)


@dataclasses.dataclass
class Samples:
  texts: list[str]  # prompt + continuation, one per sample (prompt by prompt)
  new_tokens: int
  seconds: float  # decoding time; compilation included when `compile_s` is None
  compile_s: float | None

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / self.seconds


def _prepare(served: Served, prompts: list[str], max_new_tokens: int, temperature: float,
             top_k: int, top_p: float, num_samples: int, seed: int, stop_at_eos: bool):
  model, tokenizer = served.model, served.tokenizer
  ids = [tokenizer.encode(t) if t else [tokenizer.eos_id] for t in prompts]
  if any(not p or p == [None] for p in ids):
    raise ValueError("prompt: an empty one needs a tokenizer with an end-of-text token")
  eos_id = tokenizer.eos_id if stop_at_eos else None
  try:
    generate.check_settings(model, max_new_tokens, temperature, top_k, top_p, num_samples, eos_id)
    packed = generate.pack_prompts(ids, num_samples, model.args.vocab_size,
                                   model.args.ctx - max_new_tokens)
  except ValueError as e:  # named as this module's arguments
    raise ValueError(str(e).replace("num_return_sequences", "num_samples")) from e
  return eos_id, (*packed, jax.random.key(seed),
                  generate.Sampling(temperature, top_k, top_p, -1 if eos_id is None else eos_id))


def check_sampling(served: Served, prompts: list[str], max_new_tokens: int, *,
                   temperature: float = 0.8, top_k: int = 0, top_p: float = 0.95,
                   num_samples: int = 1, seed: int = 0, stop_at_eos: bool = True) -> None:
  """Raises ValueError, naming the argument (e.g. 'top_p: ...'), for settings `sample` refuses."""
  _prepare(served, prompts, max_new_tokens, temperature, top_k, top_p, num_samples, seed,
           stop_at_eos)


def sample(served: Served, prompts: list[str], max_new_tokens: int, *, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 0.95, num_samples: int = 1, seed: int = 0,
           stop_at_eos: bool = True) -> Samples:
  """Samples `num_samples` continuations of each prompt ('' = unconditional, after EOS), timing the
  compilation apart from the decoding. A sample stops at end-of-text (dropped from its text)
  unless `stop_at_eos` is False. Bad settings raise as `check_sampling` says."""
  model, tokenizer = served.model, served.tokenizer
  eos_id, inputs = _prepare(served, prompts, max_new_tokens, temperature, top_k, top_p,
                            num_samples, seed, stop_at_eos)
  start = time.perf_counter()
  if served.quantized:  # an AOT-compiled executable rejects restored int4 arrays (it wants them
    # packed two to a byte); jit dispatch accepts them, so this timing includes the compilation.
    out = generate.decode(served.model, served.params, *inputs, max_new_tokens=max_new_tokens)
    new = generate.unpack(np.asarray(out))
    compile_s, seconds = None, time.perf_counter() - start
  else:
    decode = generate.decode.lower(model, served.params, *inputs,
                                   max_new_tokens=max_new_tokens).compile()
    compile_s, start = time.perf_counter() - start, time.perf_counter()
    new = generate.unpack(np.asarray(decode(served.params, *inputs)))
    seconds = time.perf_counter() - start
  texts = []
  for i, tokens in enumerate(new):
    if tokens and tokens[-1] == eos_id:
      tokens = tokens[:-1]
    texts.append(prompts[i // num_samples] + tokenizer.decode(tokens))
  return Samples(texts, sum(len(s) for s in new), seconds, compile_s)
