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
last tokens. Layers are unrolled for decoding (faster than scanned). The work is done by
gptjax.serving.
"""

import jax
from absl import app, flags, logging

from gptjax import cli, serving, storage

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


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if (_WORKDIR.value is None) == (_HF_DIR.value is None):
    raise app.UsageError("give exactly one of --workdir and --hf_dir")
  served = (serving.open_run(storage.readable(_WORKDIR.value), devices=jax.devices()[:1])
            if _WORKDIR.value
            else serving.open_hf(_HF_DIR.value))
  served = serving.unrolled(served)
  prompts = _PROMPT.value or [""]
  settings = dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                  num_samples=_NUM_SAMPLES.value, seed=_SEED.value, stop_at_eos=_STOP_AT_EOS.value)
  try:
    serving.check_sampling(served, prompts, _MAX_NEW.value, **settings)
  except ValueError as e:  # a bad flag: name it without a traceback
    raise app.UsageError(f"--{e}") from e
  out = serving.sample(served, prompts, _MAX_NEW.value, **settings)
  for i, text in enumerate(out.texts):
    print(f"--- sample {i} ---\n{text}\n", flush=True)
  if out.compile_s is None:
    print(f"{out.new_tokens} new tokens in {out.seconds:.2f} s, compilation included")
  else:
    print(f"{out.new_tokens} new tokens in {out.seconds:.2f} s: {out.tokens_per_s:.1f} tokens/s "
          f"(after {out.compile_s:.1f} s of compilation)")


if __name__ == "__main__":
  cli.run(main)
