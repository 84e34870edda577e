"""Trains a GPT as the config says.

  python scripts/train.py --config=configs/tiny.py --workdir=runs/tiny
  python scripts/train.py --config=configs/gpt3.py:small --workdir=runs/x \\
      --config.optim.peak_lr=3e-4

The recommended XLA / runtime flags of the GPU or TPU present are added to the environment first
(never one already set; `--xla_flags=none` adds nothing; gptjax/xla_flags.py).

Multi-process (one command per process; on TPU VMs, SLURM `srun` and `mpirun` the three flags can be
left out, and scripts/launch/ has templates):
  python scripts/train.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0
"""

from absl import flags, logging
from ml_collections import config_flags

from gptjax import cli, distributed, loop, xla_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Preset file, e.g. configs/gpt3.py:small.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory: config, checkpoints, metrics, logs.")
distributed.define_flags()
xla_flags.define_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # keep the terminal for the progress bar and results
    logging.set_verbosity(logging.WARNING)
  xla_flags.apply_from_flag()  # before JAX starts its backends (distributed.initialize does)
  distributed.initialize_from_flags()
  loop.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
