"""Configs are Python: `get_config(arg)` returns a locked `ml_collections.ConfigDict` (see base.py).

Scripts take `--config=configs/gpt3.py:xl`; notebooks and tests call `configs.load("gpt3:xl")`.
A backend suffix tunes a sized preset for accelerators: `gpt3:xl,gpu`, `gpt2:small,tpu`, `gpt1:gpu`
(configs/accelerators.py).
"""

import importlib
import os

import ml_collections


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads a preset from 'gpt3:xl', 'gpt3.py:xl' or 'configs/gpt3.py:xl'."""
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  try:
    module = importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError as e:
    raise ValueError(f"Unknown config file {path!r}: expected one of configs/*.py, e.g. "
                     "configs/gpt3.py:small.") from e
  return module.get_config(arg) if arg else module.get_config()


def all_presets() -> list[str]:
  """Every preset spec, in the order of the size table, then the tiny one."""
  from configs import sizes  # pylint: disable=import-outside-toplevel

  specs = [k.replace("-", ":", 1) if "-" in k else k for k in sizes.SIZES]
  return specs + ["tiny"]


def accelerator_presets() -> list[str]:
  """Every sized preset with every backend suffix: 'gpt1:gpu', 'gpt2:small,gpu', ..."""
  from configs import accelerators  # pylint: disable=import-outside-toplevel

  return [f"{spec}{',' if ':' in spec else ':'}{backend}" for spec in all_presets()[:-1]
          for backend in accelerators.BACKENDS]
