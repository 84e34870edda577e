"""gptjax.distributed: cluster detection and the errors that stop a multi-process run early.

(The real multi-process training runs are in test_multihost.py.)
"""

import socket
import time

import pytest

from gptjax import distributed

CLUSTER_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID",
                "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_MCA_orte_hnp_uri",
                "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID")


@pytest.fixture(name="env")
def fixture_env(monkeypatch):
  for v in CLUSTER_VARS:
    monkeypatch.delenv(v, raising=False)
  return monkeypatch


def closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]  # nothing listens once the socket is closed


def test_no_cluster_is_one_process(env):
  assert distributed.detected_cluster() is None
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1, process_id=0) is False


@pytest.mark.parametrize("variables, expected", [
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
      "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, None),  # one task: nothing to join
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, None),  # sbatch shell, outside srun
    ({"OMPI_MCA_orte_hnp_uri": "1;tcp://10.0.0.1:1234", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
])
def test_cluster_detection(env, variables, expected):
  for k, v in variables.items():
    env.setenv(k, v)
  assert distributed.detected_cluster() == expected


def test_unreachable_coordinator_times_out_with_the_address(env):
  port = closed_port()
  start = time.monotonic()
  with pytest.raises(distributed.DistributedError, match=f"127.0.0.1:{port} within 1.5 s"):
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=1, timeout_s=1.5)
  assert 1.5 <= time.monotonic() - start < 10  # waited for the timeout, then stopped: no hang


def test_wait_for_coordinator_returns_once_the_port_listens():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    distributed.wait_for_coordinator("127.0.0.1", server.getsockname()[1], timeout_s=5)


@pytest.mark.parametrize("kwargs, match", [
    ({"coordinator_address": "127.0.0.1:1234"}, "num_processes, process_id not given"),
    ({"num_processes": 2, "process_id": 0}, "coordinator_address not given"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2},
     r"process_id=2 is not in \[0, num_processes=2\)"),
    ({"coordinator_address": "no-port", "num_processes": 2, "process_id": 1}, "not 'host:port'"),
])
def test_incomplete_or_bad_settings(env, kwargs, match):
  with pytest.raises(distributed.DistributedError, match=match):
    distributed.initialize(**kwargs)


def test_settings_from_the_environment(env):
  env.setenv("JAX_COORDINATOR_ADDRESS", f"127.0.0.1:{closed_port()}")
  env.setenv("JAX_NUM_PROCESSES", "2")
  env.setenv("JAX_PROCESS_ID", "1")
  with pytest.raises(distributed.DistributedError, match="could not reach the coordinator"):
    distributed.initialize(timeout_s=0.2)
  env.setenv("JAX_PROCESS_ID", "one")
  with pytest.raises(distributed.DistributedError, match="JAX_PROCESS_ID='one'"):
    distributed.initialize(timeout_s=0.2)
