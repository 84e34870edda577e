"""Plans a run on a target mesh from a laptop: sizes, FLOPs, memory per device, time to train.

  python scripts/plan.py --config=configs/gpt3.py:175b --devices=256 --device_kind=h100 \\
      --mesh=fsdp:32,tensor:8 --config.model.dtype=bfloat16 --config.model.remat=full \\
      --config.train.micro_batch=256
  python scripts/plan.py --config=configs/gpt3.py:xl --devices=8 --mesh=fsdp:8 --json

The real sharded train step is compiled for abstract arrays on `--devices` fake CPU devices (no
parameter is allocated) and the compiler's memory per device is printed beside the estimate.
`--nocompile` prints the estimate alone, in seconds.
"""

import json
import os
import sys


def _early_devices(argv: list[str]) -> int:
  """--devices, read before JAX starts: the fake CPU device count must be set before import."""
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_early_devices(sys.argv)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

# After the environment above: JAX reads XLA_FLAGS and JAX_PLATFORMS when it is first imported.
# pylint: disable=wrong-import-position
from absl import flags, logging  # noqa: E402 (after the XLA_FLAGS setup)
from ml_collections import config_flags  # noqa: E402 (after the XLA_FLAGS setup)

from gptjax import cli, plan  # noqa: E402 (after the XLA_FLAGS setup)
from gptjax.config import ConfigError  # noqa: E402 (after the XLA_FLAGS setup)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Preset, e.g. configs/gpt3.py:175b.",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 8, "Devices in the target mesh.")
_KIND = flags.DEFINE_string("device_kind", "h100", f"One of {sorted(plan.DEVICE_MEMORY)}.")
_MESH = flags.DEFINE_string("mesh", "", "Axis sizes, e.g. 'fsdp:32,tensor:8' (others become 1; "
                            "the config's mesh if empty).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model-FLOPs utilisation for the time estimate.")
_TOKENS = flags.DEFINE_float("tokens", 0, "Tokens to train on (0 = the config's run length).")
_COMPILE = flags.DEFINE_bool("compile", True, "Compile the real step for the compiler's figures.")
_JSON = flags.DEFINE_bool("json", False, "Print the report as one JSON line instead.")
flags.mark_flag_as_required("config")


def _apply_mesh(cfg, spec: str) -> None:
  if not spec:
    return
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in spec.split(","):
    axis, sep, size = part.partition(":")
    if not sep or axis not in sizes or not size.lstrip("-").isdigit():
      raise ConfigError(f"--mesh: {part!r} is not 'axis:size' with axis in {sorted(sizes)}. "
                        "Example: --mesh=fsdp:32,tensor:8")
    sizes[axis] = int(size)
  with cfg.unlocked():
    cfg.mesh.update(sizes)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cfg = _CONFIG.value
  _apply_mesh(cfg, _MESH.value)
  report = plan.make(cfg, _DEVICES.value, _KIND.value, mfu=_MFU.value,
                     train_tokens=int(_TOKENS.value) or None, compile_step=_COMPILE.value)
  print(json.dumps(plan.to_json(report)) if _JSON.value else plan.format_report(report))


if __name__ == "__main__":
  cli.run(main)
