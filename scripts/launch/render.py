"""Renders a launch recipe for a preset and mesh: a SLURM batch file, a TPU VM command or a
Kubernetes Indexed Job. Prints it; redirect it to a file.

  python scripts/launch/render.py --target=slurm --config=configs/gpt3.py:xl --nodes=1 \\
      --gpus_per_node=8 --workdir=/shared/runs/xl --override=mesh.fsdp=8 --override=mesh.data=1
  python scripts/launch/render.py --target=tpu --config=configs/gpt3.py:6.7b --tpu_name=v5p-128 \\
      --zone=us-east5-a --workdir=/mnt/runs/6.7b --override=mesh.fsdp=-1
  python scripts/launch/render.py --target=k8s --config=configs/gpt3.py:13b --nodes=4 \\
      --image=registry.example/gptjax:latest --workdir=/runs/13b

The mesh must multiply to the run's device count (nodes x GPUs, or the slice's chips); gptjax
checks that before compiling, with the fix in the message. Each recipe exports the recommended XLA /
runtime settings of its backend (gptjax/xla_flags.py: GPU for slurm and k8s, TPU for tpu); an
accelerator preset (`--config=configs/gpt3.py:xl,gpu`, configs/accelerators.py) tunes the rest.
"""

import os
import shlex
import string
import sys

from absl import flags

from gptjax import cli, xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = {"slurm": "slurm.sbatch", "tpu": "tpu_vm.sh", "k8s": "k8s_indexed_job.yaml"}

_TARGET = flags.DEFINE_enum("target", None, sorted(TEMPLATES), "Where the run goes.")
_CONFIG = flags.DEFINE_string("config", None, "Preset, e.g. configs/gpt3.py:xl.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory on storage every process sees.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Config overrides, key=value "
                                       "(becomes --config.key=value), e.g. mesh.fsdp=8.")
_NAME = flags.DEFINE_string("name", "", "Job name (default: from the preset).")
_NODES = flags.DEFINE_integer("nodes", 1, "Nodes (one process each).")
_GPUS = flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node.")
_CPUS = flags.DEFINE_integer("cpus_per_task", 32, "SLURM: CPU cores per process (data workers).")
_TIME = flags.DEFINE_string("time", "48:00:00", "SLURM: time limit.")
_TPU = flags.DEFINE_string("tpu_name", "", "TPU: the TPU VM's name.")
_ZONE = flags.DEFINE_string("zone", "", "TPU: its zone.")
_REPO = flags.DEFINE_string("repo_dir", "~/gptjax", "TPU / k8s: where gptjax is on the workers.")
_IMAGE = flags.DEFINE_string("image", "", "k8s: container image with gptjax installed.")
_PVC = flags.DEFINE_string("pvc", "runs", "k8s: PersistentVolumeClaim holding the workdir.")
_PORT = flags.DEFINE_integer("port", 1234, "k8s: coordinator port.")
flags.mark_flags_as_required(["target", "config", "workdir"])


def render(target: str, params: dict[str, object]) -> str:
  """Fills the target's template; every ${name} in it must be in `params`."""
  with open(os.path.join(HERE, TEMPLATES[target]), encoding="utf-8") as f:
    template = string.Template(f.read())
  missing = [n for n in template.get_identifiers() if n not in params]
  if missing:
    raise ValueError(f"template {TEMPLATES[target]} needs {missing}")
  return template.substitute(params)


def xla_settings(target: str) -> dict[str, str]:
  """The template parameters exporting `gptjax.xla_flags.RECOMMENDED` for `target`'s backend.

  A variable the job's environment already sets is kept whole (the user's choice; scripts/train.py
  with --xla_flags=auto then adds the flags missing from it, never changing one that is set).
  """
  backend = "tpu" if target == "tpu" else "gpu"
  values = dict(xla_flags.shell_defaults(backend))
  aliases = xla_flags.ALIASES
  exports = []
  for var, value in values.items():
    line = f'export {var}="${{{var}:-{value}}}"'
    for alias in aliases.get(var, ()):  # both set is an error in jaxlib: a user's alias wins
      line = f'[ -n "${{{alias}:-}}" ] || {line}'
    exports.append(line)
  return {
      "xla_exports": "\n".join(exports),
      "xla_env_yaml": "".join(f'\n        - name: {var}\n          value: "{value}"'
                              for var, value in values.items()),
      "libtpu_prefix": "".join(f'{var}=\\"\\${{{var}:-{value}}}\\" '
                               for var, value in values.items() if backend == "tpu"),
  }


def main(argv):
  del argv
  overrides = []
  for o in _OVERRIDES.value:
    key, sep, value = o.partition("=")
    if not sep or not key:
      sys.exit(f"--override={o!r} is not key=value (e.g. mesh.fsdp=8)")
    overrides.append(f"--config.{key}={value}")
  required = {"tpu": ["tpu_name", "zone"], "k8s": ["image"]}.get(_TARGET.value, [])
  for name in required:
    if not flags.FLAGS[name].value:
      sys.exit(f"--target={_TARGET.value} needs --{name}")
  preset = (_CONFIG.value.rsplit("/", 1)[-1].replace(".py", "").replace(":", "-")
            .replace(",", "-").replace(".", ""))
  name = (_NAME.value or f"gptjax-{preset}").lower()
  params = {
      "name": name, "config": shlex.quote(_CONFIG.value), "workdir": _WORKDIR.value,
      "overrides": " ".join(shlex.quote(o) for o in overrides),
      "overrides_yaml": "".join(f', "{o}"' for o in overrides),
      "nodes": _NODES.value, "gpus_per_node": _GPUS.value, "cpus_per_task": _CPUS.value,
      "time": _TIME.value, "tpu_name": _TPU.value, "zone": _ZONE.value, "repo_dir": _REPO.value,
      "image": _IMAGE.value, "pvc": _PVC.value, "port": _PORT.value,
      "workdir_mount": os.path.dirname(_WORKDIR.value.rstrip("/")) or "/",
      **xla_settings(_TARGET.value),
  }
  print(render(_TARGET.value, params), end="")


if __name__ == "__main__":
  cli.run(main)
