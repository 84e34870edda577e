"""Sweeps: a base config plus a list of overrides, expanded into named, checked runs.

A sweep file (`configs/sweeps/*.py`) defines `get_config(arg)`, the base config, and `sweep(arg)`, a
list of override dicts from dotted config keys to values, built with `grid`, `zipped`, `product`,
`random_search` or `isoflop`:

    def sweep(arg=""):
      return sweep_lib.grid({"optim.peak_lr": [1e-3, 2e-3], "train.steps": [100, 200]})

`expand` applies every override to a copy of the locked base config, checks keys and types and
validates each result before anything runs, and names each run after its overrides
(`peak_lr=1e-3,steps=100`). Keys under `meta.` are not settings: they label a run (e.g. its FLOP
budget) and travel with it into `sweep.json` and the results table. This module says what a sweep
is; `gptjax.sweep_run` runs it: each run lives in `<workdir>/<run name>/`, a normal gptjax workdir,
so `sweep_run.run_local` skips finished runs and resumes unfinished ones, and
`sweep_run.commands` and `sweep_run.slurm_script` emit the same runs as `scripts/train.py` launches.
"""

import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import itertools
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from gptjax import accounting, config as config_lib, optim
from gptjax.model import ModelArgs

META = "meta."  # override keys with this prefix label a run and are not applied to the config
SWEEP_JSON = "sweep.json"  # the expanded sweep, written into the sweep's workdir
_NAME_MAX = 200  # characters in a run name (longer names are cut and end in a hash)

Overrides = dict[str, Any]


class SweepError(ValueError):
  """A sweep cannot be expanded; the message names the file, the run and the setting."""


# ---- building override lists --------------------------------------------------------------------


def grid(axes: Mapping[str, Sequence[Any]]) -> list[Overrides]:
  """Every combination of the values of each key (the first key varies slowest)."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def zipped(axes: Mapping[str, Sequence[Any]]) -> list[Overrides]:
  """The i-th run takes the i-th value of every key; all value lists must be equally long."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise SweepError(f"zipped: value lists differ in length ({lengths}); give every key as many "
                     "values as there are runs, or use grid() for all combinations.")
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def product(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """Every combination of one override dict from each list, merged (keys must not repeat)."""
  out = []
  for parts in itertools.product(*sweeps):
    merged: Overrides = {}
    for part in parts:
      clash = sorted(set(merged) & set(part))
      if clash:
        raise SweepError(f"product: the key(s) {clash} are set by more than one of the sweeps "
                         "combined; each key may come from one of them only.")
      merged.update(part)
    out.append(merged)
  return out


@dataclasses.dataclass(frozen=True)
class LogUniform:
  """A value drawn log-uniformly from [low, high] (learning rates, weight decay)."""
  low: float
  high: float


@dataclasses.dataclass(frozen=True)
class Uniform:
  """A value drawn uniformly from [low, high]."""
  low: float
  high: float


def random_search(space: Mapping[str, Any], n: int, seed: int) -> list[Overrides]:
  """`n` runs drawn from `space` with a fixed seed (the same list every time).

  Args:
    space: key -> a list (one element drawn uniformly), `LogUniform` or `Uniform`.
    n: how many runs.
    seed: the seed of the draw.

  Returns:
    The override dicts; floats are rounded to 3 significant digits so run names stay short.
  """
  rng = random.Random(seed)

  def draw(dist):
    if isinstance(dist, LogUniform):
      return float(f"{math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))):.3g}")
    if isinstance(dist, Uniform):
      return float(f"{rng.uniform(dist.low, dist.high):.3g}")
    if isinstance(dist, (list, tuple)) and dist:
      return dist[rng.randrange(len(dist))]
    raise SweepError(f"random_search: {dist!r} is not a distribution; use a non-empty list, "
                     "LogUniform(low, high) or Uniform(low, high).")

  return [{k: draw(v) for k, v in space.items()} for _ in range(n)]


def sizes_by_aspect_ratio(layers: Sequence[int], aspect_ratio: int = 64,
                          d_head: int = 64) -> list[Overrides]:
  """A model family at a fixed shape: d_model = aspect_ratio x n_layers, heads of width d_head.

  Kaplan et al. (2020) found the loss nearly flat over aspect ratios d_model / n_layers from about
  20 to 200, so one ratio and one head width leave model size as the only variable.
  """
  out = []
  for n in layers:
    d_model = aspect_ratio * n
    if d_model % d_head:
      raise SweepError(f"sizes_by_aspect_ratio: d_model = {aspect_ratio} x {n} = {d_model} is not a"
                       f" multiple of d_head={d_head}; choose layers or ratios that make it one.")
    out.append({"model.n_layers": n, "model.d_model": d_model, "model.n_heads": d_model // d_head})
  return out


def param_count(cfg: ml_collections.ConfigDict, key: str = "total") -> int:
  """Parameters of the config's model ('total', 'non_embedding' or 'matmul'), nothing allocated."""
  return int(getattr(model_counts(ModelArgs.from_config(cfg.model)), key))


@functools.lru_cache(maxsize=None)
def model_counts(args: ModelArgs) -> accounting.ParamCounts:
  """`accounting.param_counts` of a model, kept: a sweep sizes the same models again and again."""
  return accounting.param_counts(args)


def isoflop(base: ml_collections.ConfigDict, budgets: Sequence[float], sizes: Sequence[Overrides],
            min_steps: int = 20) -> list[Overrides]:
  """IsoFLOP profiles (Chinchilla, approach 2): for each budget C, each size trained on C/6N tokens.

  N is the total parameter count; the run length is set in steps of the base config's batch
  (train.global_batch x seq_len tokens), rounded to the nearest step. A size whose run would be
  shorter than `min_steps` is left out of that budget (each budget's sizes should span its optimum,
  the big ones belong to bigger budgets); a budget too small for even the smallest size is an error.

  Returns:
    Override dicts: `meta.budget` = C, the size's keys and `train.steps`.
  """
  if base.train.tokens:
    raise SweepError(f"isoflop: the base config sets train.tokens={base.train.tokens}, which would "
                     "override the steps each budget needs; set train.tokens = 0 in get_config().")
  seq_len = optim.seq_len(base)
  step_tokens = base.train.global_batch * seq_len
  counts = [param_count(apply(base, size, f"isoflop size {size}")) for size in sizes]
  out = []
  for budget in budgets:
    rows = [{META + "budget": float(budget), **size,
             "train.steps": round(budget / (6 * n) / step_tokens)}
            for size, n in zip(sizes, counts)]
    rows = [r for r in rows if r["train.steps"] >= min_steps]
    if not rows:
      n = min(counts)
      raise SweepError(
          f"isoflop: a budget of {budget:.3g} FLOPs is too small for the smallest model ({n:,} "
          f"params): it would train for {budget / (6 * n) / step_tokens:.1f} steps of "
          f"{step_tokens:,} tokens, fewer than min_steps={min_steps}. Raise the budget to at least "
          f"{6 * n * min_steps * step_tokens:.3g} FLOPs, add a smaller size, or lower min_steps or "
          "train.global_batch.")
    out.extend(rows)
  return out


# ---- loading, applying, naming ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its name (also its folder), overrides, meta labels and resolved config."""
  name: str
  overrides: Overrides  # config keys only
  meta: dict[str, Any]  # the `meta.` keys, prefix removed
  config: ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Sweep:
  """An expanded sweep file: its name (the file's stem), the file, its argument and its runs."""
  name: str
  path: str
  arg: str
  runs: list[Run]

  @property
  def spec(self) -> str:
    """The file as `--config=` takes it, e.g. 'configs/sweeps/model_size.py:cpu'."""
    return self.path + (f":{self.arg}" if self.arg else "")


def load(spec: str):
  """Imports a sweep file, 'configs/sweeps/lr_tiny.py' or the short 'lr_tiny' (':arg' optional).

  Returns:
    (module, path, arg); the path is relative to the current directory when it lies below it.
  """
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "sweeps", path + ".py")
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {spec!r} not found; give a path such as "
                     "configs/sweeps/lr_tiny.py, or the short name of a file in configs/sweeps/.")
  path = os.path.abspath(path)
  if path.startswith(os.getcwd() + os.sep):
    path = os.path.relpath(path)
  module_spec = importlib.util.spec_from_file_location(
      "gptjax_sweep_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  for fn in ("get_config", "sweep"):
    if not callable(getattr(module, fn, None)):
      raise SweepError(f"{path} defines no {fn}(): a sweep file needs get_config(arg) returning "
                       "the base config and sweep(arg) returning a list of override dicts.")
  return module, path, arg


def _plain(value: Any) -> Any:
  return value.item() if isinstance(value, np.generic) else value


def apply(base: ml_collections.ConfigDict, overrides: Mapping[str, Any],
          where: str) -> ml_collections.ConfigDict:
  """A locked copy of `base` with `overrides` set; unknown keys and wrong types raise SweepError."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.lock()
  for key, value in overrides.items():
    if key.startswith(META):
      continue
    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):
      here = ".".join(parts[:depth]) or "the config"
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, options, n=1)
        hint = f" Did you mean {'.'.join(parts[:depth] + close)!r}?" if close else ""
        raise SweepError(f"{where}: unknown key {key!r} ({here} has no {part!r}).{hint} Every "
                         "setting is declared in configs/base.py; meta labels start with 'meta.'.")
      if depth < len(parts) - 1:
        node = node[part]
    leaf, old, value = parts[-1], node[parts[-1]], _plain(value)
    if isinstance(old, ml_collections.ConfigDict):
      raise SweepError(f"{where}: {key!r} is a section, not a setting; override its keys, "
                       f"e.g. {key}.{next(iter(old.keys()))}.")
    if not (type(value) is type(old) or (type(old) is float and type(value) is int)):
      raise SweepError(f"{where}: {key} = {value!r} is a {type(value).__name__}, but the setting is"
                       f" a {type(old).__name__} (default {old!r}); give a {type(old).__name__}.")
    node[leaf] = float(value) if type(old) is float else value
  return cfg


def format_value(value: Any) -> str:
  """The shortest text that reads back as `value`: 0.0003 -> '3e-4', 2e7 (an int) -> '2e7'."""
  value = _plain(value)
  if isinstance(value, float) and math.isfinite(value):
    p = next(p for p in range(1, 18) if float(f"{value:.{p}g}") == value)
    fixed, sci = f"{value:.{p}g}", f"{value:.{p - 1}e}"
    mantissa, exp = sci.split("e")
    sci = (mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa) + "e" + exp
    text = sci if len(_short_exponent(sci)) < len(_short_exponent(fixed)) else fixed
  elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 100_000:
    digits = str(abs(value))
    mantissa = digits.rstrip("0")
    short = mantissa[0] + ("." + mantissa[1:] if mantissa[1:] else "") + f"e{len(digits) - 1}"
    text = ("-" if value < 0 else "") + (short if len(short) < len(digits) else digits)
  else:
    text = str(value)
  return _short_exponent(text)


def _short_exponent(text: str) -> str:
  return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m[1] == "-" else "") + m[2], text)


def run_name(overrides: Mapping[str, Any]) -> str:
  """A readable, filesystem-safe name from the overrides: 'peak_lr=3e-4,d_model=256'.

  Keys are shortened to their last part unless two keys of the run share it. The name depends on
  this run's overrides only, so adding runs to a sweep never renames the others.
  """
  if not overrides:
    return "base"
  leaves = [k.rsplit(".", 1)[-1] for k in overrides]
  labels = [leaf if leaves.count(leaf) == 1 else k.removeprefix(META)
            for k, leaf in zip(overrides, leaves)]
  name = ",".join(f"{label}={format_value(v)}" for label, v in zip(labels, overrides.values()))
  name = re.sub(r"[^A-Za-z0-9._,=+-]", "_", name)
  if len(name) > _NAME_MAX:
    name = name[:_NAME_MAX - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


def expand(spec: str, n_devices: int | None = None, backend: str | None = None) -> Sweep:
  """Loads a sweep file and turns it into runs, every one checked before any of them starts.

  Args:
    spec: the sweep file, 'configs/sweeps/x.py[:arg]' or 'x[:arg]'.
    n_devices: devices to validate the mesh against (default: this machine's).
    backend: the backend the attention kernels are checked for ('cpu', 'gpu', 'tpu'; default:
      this process's, which starts JAX's backend: `sweep_parallel` passes it instead).

  Returns:
    The sweep, its runs in order.

  Raises:
    SweepError: no sweep(), not a list of dicts, an unknown key, a wrong type, duplicate names.
    ConfigError: a run's config fails `gptjax.config.validate` or its schedule does not fit.
  """
  module, path, arg = load(spec)
  base = module.get_config(arg) if arg else module.get_config()
  overrides_list = module.sweep(arg) if arg else module.sweep()
  if not isinstance(overrides_list, (list, tuple)) or not overrides_list or not all(
      isinstance(o, Mapping) for o in overrides_list):
    raise SweepError(f"{path}: sweep() must return a non-empty list of override dicts "
                     f"(dotted key -> value), got {type(overrides_list).__name__}.")
  n_devices = jax.device_count() if n_devices is None else n_devices
  runs, seen = [], {}
  sweep_name = os.path.splitext(os.path.basename(path))[0]
  for i, overrides in enumerate(overrides_list):
    name = run_name(overrides)
    where = f"{path}, run {i} ({name})"
    cfg = apply(base, overrides, where)
    # trackers: the sweep's runs in one group named after it, each named after its overrides
    cfg.train.run_name, cfg.train.run_group = (cfg.train.run_name or name,
                                               cfg.train.run_group or sweep_name)
    try:
      config_lib.validate(cfg, n_devices=n_devices, backend=backend)
      optim.schedule(cfg, optim.plan(cfg))
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"{where}: {e}") from e
    if name in seen:
      raise SweepError(f"{path}: runs {seen[name]} and {i} have the same overrides ({name}); "
                       "every run of a sweep must differ.")
    seen[name] = i
    meta = {k.removeprefix(META): _plain(v) for k, v in overrides.items() if k.startswith(META)}
    config_keys = {k: _plain(v) for k, v in overrides.items() if not k.startswith(META)}
    runs.append(Run(name, config_keys, meta, cfg))
  return Sweep(sweep_name, path, arg, runs)
