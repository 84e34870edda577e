"""Launch recipes (scripts/launch/): each renders, parses (bash -n, YAML), and runs the command the
README documents, with a config that validates for the job's device count."""

import os
import shlex
import subprocess
import sys

import pytest
import yaml

import configs
from gptjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RENDER = os.path.join(ROOT, "scripts", "launch", "render.py")


def render(*flags: str) -> str:
  out = subprocess.run([sys.executable, RENDER, *flags], capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stderr
  return out.stdout


def train_flags(command: list[str]) -> dict[str, str]:
  """{flag: value} of the `python scripts/train.py ...` inside a rendered recipe."""
  i = next(i for i, a in enumerate(command) if a.endswith("scripts/train.py"))
  return dict(a[2:].split("=", 1) for a in command[i + 1:])


def check_config(flags: dict[str, str], n_devices: int) -> None:
  """The rendered preset + overrides is a config gptjax accepts on `n_devices` devices."""
  cfg = configs.load(flags["config"])
  with cfg.unlocked():
    for key, value in flags.items():
      if key.startswith("config."):
        section, name = key.removeprefix("config.").split(".")
        cfg[section][name] = type(cfg[section][name])(value)
  config_lib.validate(cfg, n_devices=n_devices)


def test_slurm(tmp_path):
  text = render("--target=slurm", "--config=configs/gpt3.py:xl", "--nodes=2", "--gpus_per_node=8",
                "--workdir=/shared/runs/xl", "--override=mesh.data=1", "--override=mesh.fsdp=16")
  path = tmp_path / "job.sbatch"
  path.write_text(text)
  subprocess.run(["bash", "-n", str(path)], check=True)
  assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
  assert "#SBATCH --signal=TERM@" in text  # the checkpoint-and-exit-0 path before the time limit
  srun = shlex.split(text[text.index("srun "):].replace("\\\n", " "))
  flags = train_flags(srun)
  assert flags["workdir"] == "/shared/runs/xl"
  check_config(flags, n_devices=16)


def test_tpu_vm(tmp_path):
  text = render("--target=tpu", "--config=configs/gpt3.py:6.7b", "--tpu_name=pod", "--zone=z1",
                "--workdir=/mnt/runs/x", "--override=mesh.data=1", "--override=mesh.fsdp=-1",
                # 64 devices: the batch ramp starts at 64 sequences (128k tokens), not 16
                "--override=train.micro_batch=64")
  path = tmp_path / "launch.sh"
  path.write_text(text)
  subprocess.run(["bash", "-n", str(path)], check=True)
  gcloud = shlex.split(text[text.index("gcloud compute"):].replace("\\\n", " "))
  assert gcloud[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in gcloud
  remote = next(a for a in gcloud if a.startswith("--command=")).removeprefix("--command=")
  flags = train_flags(shlex.split(remote.split("&&")[1]))
  check_config(flags, n_devices=64)


def test_k8s_indexed_job():
  text = render("--target=k8s", "--config=configs/gpt3.py:13b", "--nodes=4", "--gpus_per_node=8",
                "--image=registry.example/gptjax:1", "--workdir=/runs/13b",
                "--override=mesh.data=1", "--override=mesh.fsdp=8", "--override=mesh.tensor=4")
  service, job = yaml.safe_load_all(text)
  assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
  spec = job["spec"]
  assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
  pod = spec["template"]["spec"]
  assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
  container = pod["containers"][0]
  env = {e["name"]: e for e in container["env"]}
  assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "gptjax-gpt3-13b-0.gptjax-gpt3-13b:1234"
  assert env["JAX_NUM_PROCESSES"]["value"] == "4"
  assert "job-completion-index" in env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
  assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
  check_config(train_flags(container["command"]), n_devices=32)


@pytest.mark.parametrize("flags, message", [
    (["--target=tpu", "--config=configs/tiny.py", "--workdir=/r"], "needs --tpu_name"),
    (["--target=k8s", "--config=configs/tiny.py", "--workdir=/r"], "needs --image"),
    (["--target=slurm", "--config=configs/tiny.py", "--workdir=/r", "--override=mesh.fsdp"],
     "is not key=value"),
])
def test_bad_flags(flags, message):
  out = subprocess.run([sys.executable, RENDER, *flags], capture_output=True, text=True,
                       check=False)
  assert out.returncode != 0 and message in out.stderr
