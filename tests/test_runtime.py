"""The run's runtime aids: JAX's persistent compilation cache (on by default; a second run of the
same program loads its executables), the profiler window, and their settings' errors."""

import contextlib
import gzip
import glob
import json
import os

import jax
import pytest

from gptjax import compile_cache, config as config_lib, loop
from gptjax.errors import ConfigError
from test_loop import corpus_cfg


@contextlib.contextmanager
def jax_events():
  """The names of the events JAX's compiler reports (cache hits and misses among them)."""
  seen = []

  def listen(name, **kwargs):
    del kwargs
    seen.append(name)

  jax.monitoring.register_event_listener(listen)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_listener(listen)


@pytest.fixture
def restore_jax_cache():
  keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
          "jax_persistent_cache_min_compile_time_secs")
  old = {k: jax.config.values[k] for k in keys}
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  jax.experimental.compilation_cache.compilation_cache.reset_cache()


def small_run(tmp_path, **train):
  c = corpus_cfg(tmp_path, steps=4)
  c.train.update(sample_tokens=0, eval_every=0, log_every=2, compile_cache_min_s=0.0, **train)
  return c


def test_a_second_run_of_the_same_program_loads_its_executables(tmp_path, restore_jax_cache):
  cache = str(tmp_path / "jax_compile")
  with jax_events() as first:
    loop.run(small_run(tmp_path, compile_cache=cache), str(tmp_path / "a"),
             devices=jax.devices()[:1])
  assert "/jax/compilation_cache/cache_misses" in first and os.listdir(cache)
  with jax_events() as second:
    loop.run(small_run(tmp_path, compile_cache=cache), str(tmp_path / "b"),
             devices=jax.devices()[:1])
  assert "/jax/compilation_cache/cache_hits" in second
  assert "/jax/compilation_cache/cache_misses" not in second  # the train step among the hits


def test_the_compile_cache_defaults_under_the_cache_root_and_can_be_turned_off(tmp_path,
                                                                            monkeypatch,
                                                                            restore_jax_cache):
  c = small_run(tmp_path)
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  assert compile_cache.directory(c) == os.path.join(str(tmp_path / "cache"), "jax_compile")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert compile_cache.directory(c) == str(tmp_path / "env")
  c.train.compile_cache = "off"
  assert compile_cache.setup(c) == "" and not jax.config.values["jax_enable_compilation_cache"]
  with jax_events() as seen:
    loop.run(c, str(tmp_path / "off"), devices=jax.devices()[:1])
  assert not [e for e in seen if e.startswith("/jax/compilation_cache/cache_")]
  assert not os.path.exists(tmp_path / "env")


@pytest.mark.slow
def test_profile_steps_writes_a_trace_of_those_steps(tmp_path, restore_jax_cache, capsys):
  loop.run(small_run(tmp_path, profile_steps=(1, 2)), str(tmp_path / "run"),
           devices=jax.devices()[:1])
  traces = glob.glob(str(tmp_path / "run" / "profile" / "plugins" / "profile" / "*" /
                         "*.trace.json.gz"))
  assert len(traces) == 1 and glob.glob(os.path.dirname(traces[0]) + "/*.xplane.pb")
  with gzip.open(traces[0], "rt", encoding="utf-8") as f:
    events = json.load(f)["traceEvents"]
  assert any("train_step" in str(e.get("name", "")) or "jit" in str(e.get("name", ""))
             for e in events)
  assert "profiled steps 1-2 into" in capsys.readouterr().out


@pytest.mark.parametrize("window, message", [
    ((3, 2), r"steps 3 to 4 lie beyond the run's 4 steps"),
    ((1, -1), r"must be \(start, length\) with integers >= 0"),
    ((1,), r"must be \(start, length\)"),
])
def test_a_bad_profile_window_is_refused_before_compiling(tmp_path, window, message):
  c = small_run(tmp_path, profile_steps=window)
  with pytest.raises(ConfigError, match=r"config.train.profile_steps: " + message):
    config_lib.validate(c, n_devices=1)
