"""lm-evaluation-harness with the gptjax model backend: lm-eval's own CLI, `gptjax` registered.

  python scripts/harness.py run --model gptjax --model_args workdir=runs/tiny \\
      --tasks my_task --include_path tasks/            # a local task folder of lm-eval YAML files
  python scripts/harness.py run --model gptjax --model_args workdir=runs/tiny,step=500 --tasks ...
  python scripts/harness.py run --model gptjax --model_args hf_dir=path/to/gpt2 --tasks ...
  python scripts/harness.py ls tasks

`--model_args`: workdir (a run: float, quantized or serving checkpoint) or hf_dir (a Hugging Face
GPT-2 folder), step, max_gen_toks (gptjax/harness.py); the batch size is lm-eval's own
`--batch_size` (default: the run's micro-batch). Needs the eval extra:
pip install 'gptjax[eval]'.
"""

import sys

from lm_eval.__main__ import cli_evaluate

from gptjax import cli, harness  # noqa: F401  (importing harness registers the `gptjax` model)


def main(argv):
  del argv  # lm-eval's CLI reads sys.argv itself
  cli_evaluate()


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] not in ("run", "ls", "validate", "-h", "--help"):
    sys.argv.insert(1, "run")  # `harness.py --model gptjax ...` as lm_eval's old one-command form
  cli.run(main, argv=sys.argv[:1])  # absl parses no flags here; project errors end in one line
