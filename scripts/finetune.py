"""Fine-tunes a pre-trained GPT as the config's `finetune` section says.

  python scripts/finetune.py --config=configs/finetune_gpt1.py:multiple_choice --workdir=runs/mc \
      --config.finetune.base=runs/tiny --config.finetune.train_path=train.jsonl
  python scripts/finetune.py --config=configs/finetune_sft.py:lora --workdir=runs/sft \
      --config.finetune.base=path/to/hf-gpt2 --config.finetune.train_path=pairs.jsonl

Running the same command again resumes from the workdir's latest checkpoint.
"""

from absl import flags, logging
import jax
from ml_collections import config_flags

from gptjax import cli, distributed, finetune, storage

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Preset file, e.g. configs/finetune_sft.py:lora.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory: config, checkpoints, metrics, logs.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # keep the terminal for the progress bar and results
    logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  if storage.is_url(_WORKDIR.value):
    storage.check_single_process(_WORKDIR.value, jax.process_count())
  with storage.mirrored(_WORKDIR.value, background=True) as workdir:  # a URL: its local copy
    finetune.run(_CONFIG.value, workdir)


if __name__ == "__main__":
  cli.run(main)
