"""Several runs of a sweep at once on one host, each on its own devices (`scripts/sweep.py
--parallel=N`): 8 GPUs as 8 one-GPU runs, or as 4 two-GPU runs.

Each run is `scripts/train.py` in a subprocess that sees only its devices: `CUDA_VISIBLE_DEVICES`
on NVIDIA GPUs, `--xla_force_host_platform_device_count` on CPU (a test of the scheduling: CPU
runs share the host's cores). This process never starts JAX's GPU backend, so the runs get all
of their devices' memory. A slot takes the next unfinished run when its run ends; finished runs
are skipped and unfinished ones resumed, as `sweep_run.run_local` does. When a run fails, no new
run starts; the runs still going finish. Each run's output goes to `<workdir>/logs/<run>.log`.

TPU hosts are refused: their chips are shared by one process per host unless the TPU runtime's
per-process chip bounds are set, which gptjax does not do yet; sweep TPU runs one after another or
on separate hosts (`--emit=slurm`, `--emit=shell`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from typing import Callable

from gptjax import sweep_run
from gptjax.errors import ConfigError
from gptjax.sweep import Sweep


@dataclasses.dataclass(frozen=True)
class Slot:
  """The devices one concurrent run sees: its environment additions, and how many they are."""
  name: str
  env: dict[str, str]
  n_devices: int


def host_platform() -> str:
  """'gpu', 'tpu' or 'cpu', from the environment and the host, without starting JAX."""
  wanted = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
  if wanted in ("cpu", "tpu"):
    return wanted
  if wanted in ("cuda", "gpu") or _gpu_ids():
    return "gpu"
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return "tpu"
  return "cpu"


def _gpu_ids() -> list[str]:
  """The NVIDIA GPUs this process may use: `CUDA_VISIBLE_DEVICES`, else `nvidia-smi -L`."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [d.strip() for d in visible.split(",") if d.strip()]
  if not shutil.which("nvidia-smi"):
    return []
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def _cpu_devices() -> int:
  flags = os.environ.get("XLA_FLAGS", "")
  found = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
  return int(found.group(1)) if found else 1


def slots(parallel: int, platform: str | None = None) -> list[Slot]:
  """The host's devices split into `parallel` equal groups."""
  platform = platform or host_platform()
  if parallel < 1:
    raise ConfigError(f"--parallel={parallel}: give the number of runs at once (>= 1).")
  if platform == "tpu":
    raise ConfigError("--parallel: this host has TPU chips, which one process holds unless the "
                      "TPU runtime's per-process chip bounds are set (not done here). Run the "
                      "sweep one run at a time, or on separate hosts (--emit=slurm or "
                      "--emit=shell).")
  if platform == "gpu":
    ids = _gpu_ids()
    if len(ids) % parallel:
      raise ConfigError(f"--parallel={parallel}: the {len(ids)} GPUs ({', '.join(ids)}) do not "
                        f"split into {parallel} equal groups. Use a divisor of {len(ids)}.")
    k = len(ids) // parallel
    return [Slot(f"GPU {','.join(ids[i * k:(i + 1) * k])}",
                 {"CUDA_VISIBLE_DEVICES": ",".join(ids[i * k:(i + 1) * k])}, k)
            for i in range(parallel)]
  total = _cpu_devices()
  if total % parallel:
    raise ConfigError(f"--parallel={parallel}: the {total} CPU devices (XLA_FLAGS' "
                      "--xla_force_host_platform_device_count) do not split into "
                      f"{parallel} equal groups.")
  k = total // parallel
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", "")).strip()
  env = {"JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={k}".strip()}
  return [Slot(f"CPU slot {i}", dict(env), k) for i in range(parallel)]


def run_parallel(sweep: Sweep, workdir: str, run_slots: list[Slot],
                 log: Callable[[str], None] = print) -> dict[str, str]:
  """Runs the sweep's runs on `run_slots`, one run per slot at a time.

  Returns:
    run name -> 'skipped' (finished before), 'trained', 'stopped' (failed or interrupted; see its
    log) or 'not started' (a run failed first).
  """
  sweep_run.check_resumable(sweep, workdir)
  sweep_run.write_manifest(sweep, workdir)
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  absolute = dataclasses.replace(sweep, path=os.path.abspath(sweep.path))
  todo: queue.Queue = queue.Queue()
  outcome: dict[str, str] = {}
  for i, run in enumerate(sweep.runs):
    state, _ = sweep_run.status(run, workdir)
    if state == "done":
      log(f"sweep {sweep.name}: [{i + 1}/{len(sweep.runs)}] {run.name}: finished already, skipped")
      outcome[run.name] = "skipped"
    else:
      todo.put((i, run, state))
  failed = threading.Event()
  lock = threading.Lock()

  def work(slot: Slot) -> None:
    while not failed.is_set():
      try:
        i, run, state = todo.get_nowait()
      except queue.Empty:
        return
      where = f"sweep {sweep.name}: [{i + 1}/{len(sweep.runs)}] {run.name}"
      path = os.path.join(workdir, "logs", f"{run.name}.log")
      log(f"{where}: {'starting' if state == 'new' else 'resuming'} on {slot.name} (log: {path})")
      argv = sweep_run.command(absolute, run, os.path.abspath(workdir), sys.executable,
                               os.path.join(repo, "scripts", "train.py"))
      with open(path, "a", encoding="utf-8") as out:
        code = subprocess.run(argv, env={**os.environ, **slot.env}, stdout=out,
                              stderr=subprocess.STDOUT, check=False).returncode
      with lock:
        outcome[run.name] = "trained" if code == 0 else "stopped"
      if code:
        failed.set()
        log(f"{where}: stopped with status {code} (see {path}); no further run starts")
      else:
        log(f"{where}: finished on {slot.name}")

  threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in run_slots]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for run in sweep.runs:
    outcome.setdefault(run.name, "not started")
  return {run.name: outcome[run.name] for run in sweep.runs}
