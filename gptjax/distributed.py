"""Multi-host runs on JAX's own distributed runtime (`jax.distributed`).

    distributed.initialize()                                   # every process, before any JAX work
    distributed.initialize("10.0.0.1:1234", num_processes=4, process_id=rank)

With one process this does nothing. On the clusters JAX knows (Cloud TPU VMs, SLURM inside `srun`,
Open MPI's `mpirun`) `jax.distributed.initialize()` finds the coordinator, the process count and
this process' id by itself; on anything else (Kubernetes Indexed Jobs, hand-started processes) give
them as arguments or as the environment variables JAX reads (`JAX_COORDINATOR_ADDRESS`) plus
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, which this module reads.

A process that is not the coordinator first waits for the coordinator's port to accept connections,
for at most `timeout_s`, and raises `DistributedError` naming the address if it never does (JAX
itself aborts the process with a C++ fatal error in that case, or waits five minutes first).

After `initialize`, everything else in gptjax is multi-host already: each process feeds only its
slice of every global batch (`data.pipeline`), Orbax writes each process' shards of a checkpoint,
and only process 0 prints, logs metrics and shows the progress bar.
"""

import os
import socket
import time

import jax
from absl import flags

DEFAULT_TIMEOUT_S = 300


class DistributedError(RuntimeError):
  """The processes of a run could not find each other."""


def detected_cluster() -> str | None:
  """The multi-process cluster JAX will detect by itself, if any: 'tpu', 'slurm' or 'ompi'."""
  env = os.environ
  tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len(tpu_hosts.split(",")) > 1:
    return "tpu"
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(v in env for v in slurm) and int(env["SLURM_NTASKS"]) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  return None


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError as e:
    raise DistributedError(f"environment variable {name}={value!r} is not an integer") from e


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
  """Joins this process to the run's other processes; returns whether the run is multi-process.

  Args:
    coordinator_address: 'host:port' of process 0 (default: `JAX_COORDINATOR_ADDRESS`).
    num_processes: processes in the run (default: `JAX_NUM_PROCESSES`).
    process_id: this process' index, 0 <= process_id < num_processes (default: `JAX_PROCESS_ID`).
    timeout_s: how long to wait for the coordinator before giving up.

  Raises:
    DistributedError: incomplete or inconsistent settings, or a coordinator that cannot be reached.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  given = {k: v for k, v in explicit.items() if v is not None}

  if not given:
    cluster = detected_cluster()
    if cluster is None:
      return False  # one process: nothing to join
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return True

  if num_processes == 1 and not process_id:
    return False
  missing = sorted(k for k in explicit if k not in given)
  if missing:
    raise DistributedError(
        f"multi-process settings are incomplete: {', '.join(missing)} not given (have "
        f"{given}). Pass all three (--coordinator_address, --num_processes, --process_id) or none "
        "on a cluster JAX detects (TPU VM, SLURM srun, Open MPI).")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise DistributedError(f"process_id={process_id} is not in [0, num_processes={num_processes}).")
  host, sep, port = coordinator_address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise DistributedError(f"coordinator_address={coordinator_address!r} is not 'host:port'.")
  if process_id != 0:
    wait_for_coordinator(host, int(port), timeout_s)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s)
  return True


def wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
  """Returns once host:port accepts a TCP connection; raises DistributedError after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  delay, last_error = 0.05, None
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(5.0, max(timeout_s, 0.1))):
        return
    except OSError as e:
      last_error = e
    if time.monotonic() >= deadline:
      raise DistributedError(
          f"could not reach the coordinator at {host}:{port} within {timeout_s:g} s "
          f"({last_error}). Check that process 0 is running with the same --coordinator_address, "
          "that the address is process 0's host and the port is open between the hosts.")
    time.sleep(delay)
    delay = min(delay * 2, 1.0)


def shutdown() -> None:
  """Leaves the run cleanly (a no-op for one process)."""
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def define_flags() -> None:
  """Defines a script's --coordinator_address/--num_processes/--process_id/--distributed_timeout_s
  (absl flags) for `initialize_from_flags`."""
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for a multi-process run.")
  flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process' index in a multi-process run.")
  flags.DEFINE_integer("distributed_timeout_s", DEFAULT_TIMEOUT_S,
                       "How long to wait for the other processes to join.")


def initialize_from_flags() -> None:
  """`initialize` with the flags `define_flags` made (after absl parsed them)."""
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id,
             timeout_s=f.distributed_timeout_s)
