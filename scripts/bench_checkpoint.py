"""Checkpoint save cost for a preset: time the step loop is blocked, total write time, size on disk.

  python scripts/bench_checkpoint.py --config=configs/gpt2.py:small --workdir=/tmp/ckbench
Prints one JSON line. The state is real (initialised params, AdamW moments) on this host's devices.
"""

import json
import os
import shutil
import time

import jax
from absl import flags
from ml_collections import config_flags

from gptjax import checkpoint, cli, sharding
from gptjax.train import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Preset to checkpoint.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/gptjax_ckbench", "Scratch directory (emptied).")


def main(argv):
  del argv
  cfg = _CONFIG.value
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  trainer = Trainer.build(cfg, sharding.make_mesh(cfg.mesh))
  state = jax.block_until_ready(trainer.init_state())
  ckpt = checkpoint.Checkpointer(_WORKDIR.value, cfg.checkpoint)
  t0 = time.perf_counter()
  ckpt.save(1, state, {"step": 1, "tokens": 0, "data": {}})
  blocked = time.perf_counter() - t0
  ckpt.wait()
  total = time.perf_counter() - t0
  ckpt.close()
  size = sum(os.path.getsize(os.path.join(r, f))
             for r, _, fs in os.walk(ckpt.directory) for f in fs)
  t0 = time.perf_counter()
  jax.block_until_ready(checkpoint.Checkpointer(_WORKDIR.value, cfg.checkpoint)
                        .restore_latest(trainer.abstract_state)[0])
  print(json.dumps({"preset": cfg.name,
                    "params": sum(x.size for x in jax.tree.leaves(state.params)),
                    "async": cfg.checkpoint.async_save, "blocked_s": round(blocked, 3),
                    "save_s": round(total, 3), "restore_s": round(time.perf_counter() - t0, 3),
                    "size_mb": round(size / 2**20, 1)}))
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)


if __name__ == "__main__":
  cli.run(main)
