"""Expands a sweep file into named runs, then prints, emits or runs them.

  python scripts/sweep.py --config=configs/sweeps/lr_tiny.py --dry_run     # the table of runs
  python scripts/sweep.py --config=configs/sweeps/model_size.py:cpu        # run here, one by one
  python scripts/sweep.py --config=configs/sweeps/isoflop.py --emit=slurm --out=isoflop.sbatch \
      --workdir=/scratch/isoflop --n_devices=8 --sbatch=--gres=gpu:8 --sbatch=--time=04:00:00
  python scripts/sweep.py --config=configs/sweeps/isoflop.py --emit=shell  # one command per line

Every run is checked (keys, types, `gptjax.config.validate`) before the first one starts. Run `r`
trains in `<workdir>/<r.name>`; running the same command again skips finished runs and resumes
unfinished ones from their checkpoints.
"""

import os

from absl import flags, logging

from gptjax import cli, sweep as sweep_lib, sweep_parallel, sweep_run

_CONFIG = flags.DEFINE_string("config", None, "Sweep file, e.g. configs/sweeps/model_size.py:cpu.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's folder (one run folder inside per "
                               "run); default runs/sweeps/<file>[-<arg>].")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the table of runs and exit.")
_EMIT = flags.DEFINE_enum("emit", None, ["shell", "slurm"], "Write launch commands instead of "
                          "running: one scripts/train.py line per run, or a SLURM array script.")
_OUT = flags.DEFINE_string("out", None, "File for --emit (default: standard output).")
_SUBPROCESS = flags.DEFINE_bool("subprocess", False, "Run each run as scripts/train.py in a "
                                "subprocess instead of in this process.")
_FLOPS = flags.DEFINE_float("flops_per_s", 5e10, "Assumed model FLOP/s for the time estimates "
                            "(5e10 suits a 2-core CPU; an H100 at 40% MFU gives about 4e14).")
_N_DEVICES = flags.DEFINE_integer("n_devices", None, "Devices to validate the mesh against "
                                  "(default: this machine's); set it when emitting for a cluster.")
_PYTHON = flags.DEFINE_string("python", "python", "Interpreter in emitted commands.")
_SBATCH = flags.DEFINE_multi_string("sbatch", [], "Extra #SBATCH option, e.g. "
                                    "--sbatch=--time=4:00:00 (repeat the flag for more).")
_MAX_PARALLEL = flags.DEFINE_integer("max_parallel", 0, "SLURM: at most this many tasks at once.")
_PARALLEL = flags.DEFINE_integer("parallel", 0, "Run this many runs at once here, each on its "
                                 "own equal share of the devices (e.g. 8 GPUs, --parallel=8: one "
                                 "GPU each); each as scripts/train.py, its log in <workdir>/logs/.")
flags.mark_flag_as_required("config")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  run_slots = sweep_parallel.slots(_PARALLEL.value) if _PARALLEL.value else None
  if run_slots:  # this process must not start the GPU backend: the runs need the memory
    sweep = sweep_lib.expand(_CONFIG.value, n_devices=run_slots[0].n_devices,
                             backend=sweep_parallel.host_platform())
  else:
    sweep = sweep_lib.expand(_CONFIG.value, n_devices=_N_DEVICES.value)
  workdir = _WORKDIR.value or os.path.join(
      "runs", "sweeps", sweep.name + (f"-{sweep.arg}" if sweep.arg else ""))
  if _EMIT.value:
    if _EMIT.value == "slurm":
      text = sweep_run.slurm_script(sweep, workdir, _PYTHON.value, _SBATCH.value,
                                    _MAX_PARALLEL.value)
    else:
      text = "\n".join(sweep_run.commands(sweep, workdir, _PYTHON.value)) + "\n"
    try:  # sweep.json tells scripts/fit_scaling.py each run's labels; Slurm needs the log folder
      sweep_run.write_manifest(sweep, workdir)
      os.makedirs(os.path.join(workdir, "slurm"), exist_ok=True)
    except OSError as e:
      print(f"note: could not prepare {workdir} here ({e.strerror}); on the cluster run "
            f"mkdir -p {os.path.join(workdir, 'slurm')} before submitting.")
    if _OUT.value:
      with open(_OUT.value, "w", encoding="utf-8") as f:
        f.write(text)
      print(f"wrote {len(sweep.runs)} runs of {sweep.spec} to {_OUT.value}")
    else:
      print(text, end="")
    return
  print(sweep_run.table(sweep.runs, workdir, _FLOPS.value))
  if _DRY_RUN.value:
    return
  if run_slots:
    outcome = sweep_parallel.run_parallel(sweep, workdir, run_slots)
  else:
    outcome = sweep_run.run_local(sweep, workdir, in_process=not _SUBPROCESS.value)
  done = sum(v in ("trained", "skipped") for v in outcome.values())
  print(f"{done} of {len(sweep.runs)} runs finished in {workdir}; fit them with "
        f"python scripts/fit_scaling.py --sweep_dir={workdir}")


if __name__ == "__main__":
  cli.run(main)
