"""JAX's persistent compilation cache, on by default: a second run of the same program (a resumed
run, the next run of a sweep, the quickstart run again) loads its executables from disk instead of
compiling them again.

`train.compile_cache`: 'auto' (the default) uses `$JAX_COMPILATION_CACHE_DIR` when it is set, else
`<cache root>/jax_compile` (the cache root of the token cache: `data.cache_dir`, `$GPTJAX_CACHE` or
`~/.cache/gptjax`); a folder uses that folder; 'off' turns the cache off. Only compilations that
took at least `train.compile_cache_min_s` seconds are stored.
"""

import os

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache
import ml_collections

from gptjax.data import files

OFF = ("off", "none", "")


def directory(cfg: ml_collections.ConfigDict) -> str:
  """The folder `train.compile_cache` names ('' = off)."""
  setting = str(cfg.train.compile_cache).strip()
  if setting.lower() in OFF:
    return ""
  if setting == "auto":
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(files.root(cfg.data),
                                                                       "jax_compile")
  return os.path.abspath(os.path.expanduser(setting))


def setup(cfg: ml_collections.ConfigDict) -> str:
  """Points JAX's persistent cache at `directory(cfg)` before anything compiles; returns it."""
  path = directory(cfg)
  wanted = {"jax_enable_compilation_cache": bool(path),
            "jax_compilation_cache_dir": path or None,
            "jax_persistent_cache_min_compile_time_secs": float(cfg.train.compile_cache_min_s)}
  if all(jax.config.values.get(k) == v for k, v in wanted.items()):
    return path
  for k, v in wanted.items():
    jax.config.update(k, v)
  # The cache is opened once per process at the first compilation: open it again at the new place.
  compilation_cache.reset_cache()
  logging.info("persistent compilation cache: %s", path or "off")
  return path
