"""Samples text from a trained run or a Hugging Face GPT-2 folder, and reports tokens/s.

  python scripts/sample.py --workdir=runs/tiny --prompt="def " --max_new_tokens=100
  python scripts/sample.py --hf_dir=path/to/gpt2 --prompt="Hello, my name is" --prompt="The" \\
      --temperature=0.8 --top_p=0.95 --num_samples=2 --seed=1

--workdir loads the latest checkpoint of a run with its config.json and tokenizer (a quantized
serving checkpoint from scripts/compress.py too: <out>/serve/int8). --hf_dir loads
a local `save_pretrained` folder; its vocab.json + merges.txt, if present, are the tokenizer,
otherwise prompts are space-separated token ids and samples are printed as ids. No --prompt (or an
empty one) samples unconditionally, after the end-of-text token. A sample stops at end-of-text
(printed without it) unless --nostop_at_eos. Prompts longer than ctx - max_new_tokens keep their
last tokens. Layers are unrolled for decoding (faster than scanned; the weights are sliced per
layer on load).
"""

import dataclasses
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from gptjax import checkpoint, cli, generate, hf, layout
from gptjax.config import ConfigError
from gptjax.data import gpt2_bpe, tokenizer as tokenizer_lib
from gptjax.model import GPT, ModelArgs

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory written by scripts/train.py.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A local Hugging Face GPT-2 save_pretrained folder.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for several prompts).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass, in (0, 1] (1 = all).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "End a sample at the end-of-text token.")


class _Ids:
  """Token ids as text, for an HF folder without vocab.json / merges.txt."""

  eos_id = None

  def encode(self, text: str) -> list[int]:
    try:
      return [int(t) for t in text.split()]
    except ValueError as e:
      raise app.UsageError(f"--prompt={text!r}: the HF folder has no vocab.json + merges.txt, so "
                           "prompts must be space-separated token ids") from e

  def decode(self, ids) -> str:
    return "".join(f" {i}" for i in ids)


def load_workdir(workdir: str):
  """(args, params, tokenizer) of a run's latest checkpoint, params in the run's layout."""
  cfg = checkpoint.read_config(workdir, "--workdir")
  saved = os.path.join(workdir, tokenizer_lib.WORKDIR_SPM if cfg.data.tokenizer.kind ==
                       "sentencepiece" else tokenizer_lib.WORKDIR_GPT2)
  if not os.path.exists(saved):
    raise ConfigError(f"--workdir={workdir!r} has no saved tokenizer ({saved}). Point it at a run "
                      "scripts/train.py wrote, which saves its tokenizer first.")
  steps = os.path.join(workdir, "checkpoints")
  if not (os.path.isdir(steps) and any(s.isdigit() for s in os.listdir(steps))):
    raise ConfigError(f"--workdir={workdir!r} holds no checkpoint yet (nothing in {steps}). Train "
                      "until it saves one, or point --workdir at a run that did.")
  tokenizer = tokenizer_lib.load_or_train(cfg.data, workdir)
  args = ModelArgs.from_config(cfg.model)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(
      GPT(args).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  return args, checkpoint.restore_params(workdir, abstract), tokenizer


def load_hf_dir(hf_dir: str):
  """(args, params, tokenizer) of a local Hugging Face GPT-2 folder."""
  args, params = hf.load_hf_model(hf_dir, scan_layers=False)
  if all(os.path.isfile(os.path.join(hf_dir, f))
         for f in (gpt2_bpe.VOCAB_FILE, gpt2_bpe.MERGES_FILE)):
    return args, params, gpt2_bpe.GPT2BPETokenizer.from_dir(hf_dir, "--hf_dir")
  return args, params, _Ids()


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if (_WORKDIR.value is None) == (_HF_DIR.value is None):
    raise app.UsageError("give exactly one of --workdir and --hf_dir")
  quantized = bool(_WORKDIR.value) and checkpoint.is_quantized(_WORKDIR.value)
  if quantized:
    from gptjax import quantize  # pylint: disable=import-outside-toplevel
    q = quantize.load(_WORKDIR.value, devices=jax.devices()[:1])
    model, params, tokenizer = q.model, q.params, q.tokenizer
  else:
    args, params, tokenizer = (load_workdir(_WORKDIR.value) if _WORKDIR.value
                               else load_hf_dir(_HF_DIR.value))
    if args.scan_layers:
      params = layout.unstack(params, len(args.pattern))
      args = dataclasses.replace(args, scan_layers=False)
    model = GPT(args)
  args = model.args
  texts = _PROMPT.value or [""]
  prompts = [tokenizer.encode(t) if t else [tokenizer.eos_id] for t in texts]
  if any(not p or p == [None] for p in prompts):
    raise app.UsageError("an empty --prompt needs a tokenizer with an end-of-text token")
  eos_id = tokenizer.eos_id if _STOP_AT_EOS.value else None
  # generate.generate() step by step, to time the compilation apart from the sampling.
  try:
    generate.check_settings(model, _MAX_NEW.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
                            _NUM_SAMPLES.value, eos_id)
    packed = generate.pack_prompts(prompts, _NUM_SAMPLES.value, args.vocab_size,
                                   args.ctx - _MAX_NEW.value)
  except ValueError as e:  # a bad flag: name it without a traceback
    raise app.UsageError(f"--{str(e).replace('num_return_sequences', 'num_samples')}") from e
  inputs = (*packed, jax.random.key(_SEED.value),
            generate.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
                              -1 if eos_id is None else eos_id))
  start = time.perf_counter()
  if quantized:  # an AOT-compiled executable rejects restored int4 arrays (it wants them packed
    # two to a byte); jit dispatch accepts them, so this timing includes the compilation.
    samples = generate.unpack(np.asarray(generate.decode(model, params, *inputs,
                                                         max_new_tokens=_MAX_NEW.value)))
    compile_s, seconds = None, time.perf_counter() - start
  else:
    decode = generate.decode.lower(model, params, *inputs,
                                   max_new_tokens=_MAX_NEW.value).compile()
    compile_s, start = time.perf_counter() - start, time.perf_counter()
    samples = generate.unpack(np.asarray(decode(params, *inputs)))
    seconds = time.perf_counter() - start
  for i, new in enumerate(samples):
    text = texts[i // _NUM_SAMPLES.value]
    if new and new[-1] == eos_id:
      new = new[:-1]
    print(f"--- sample {i} ---\n{text}{tokenizer.decode(new)}\n", flush=True)
  n = sum(len(s) for s in samples)
  if compile_s is None:
    print(f"{n} new tokens in {seconds:.2f} s, compilation included")
  else:
    print(f"{n} new tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s "
          f"(after {compile_s:.1f} s of compilation)")


if __name__ == "__main__":
  cli.run(main)
