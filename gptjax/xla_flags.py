"""Recommended XLA and runtime settings per backend, in one place, applied before JAX starts.

    xla_flags.apply("auto")  # first thing in a script's main(): what the present backend lacks

`RECOMMENDED[backend]` lists each setting with a one-line reason, its source and how its name was
confirmed for the versions this project pins (jax/jaxlib 0.10.2, libtpu 0.0.42 for jax[tpu]):

* XLA_FLAGS (GPU): XLA aborts a process whose XLA_FLAGS name a flag it does not know, so every
  GPU flag below was started on this jaxlib (tests/test_bench_accelerator.py starts JAX on CPU
  with all of them; the GPU flags live in the same parser).
* LIBTPU_INIT_ARGS (TPU): parsed by libtpu, not jaxlib; each name is a string of
  libtpu 0.0.42.1's libtpu.so (`strings`); not started here (that needs a TPU).
* Environment variables: read where noted.

`LEFT_OUT` lists what the sources recommend and we do not set, with the reason (unknown to this
jaxlib, a no-op, or a risk). Nothing here is measured on a GPU or TPU yet: the settings follow
their sources, and `python scripts/bench.py --suite=accelerator --xla_flags=none` against the
default measures what they bring.

`apply` never overrides what the user set: a flag already in XLA_FLAGS / LIBTPU_INIT_ARGS (any
value) or a variable already in the environment is kept, and the rest is appended. It acts only
for the backend present (JAX_PLATFORMS if set, else a TPU or NVIDIA GPU with its JAX plugin), so
on CPU it adds nothing, and it prints one line (stderr) naming what it added.
"""

import dataclasses
import glob
import importlib.util
import os
import sys
from collections.abc import Callable, MutableMapping

from absl import flags

MODES = ("auto", "none")
LISTS = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")  # space-separated flag lists; other names are variables

_JAX_TIPS = "JAX GPU performance tips (docs.jax.dev gpu_performance_tips)"
_TOOLBOX = "JAX-Toolbox GPU_performance.md (NVIDIA)"
_MAXTEXT_A3 = "MaxText GPU recipes (MaxText/configs/a3/llama_2_7b/*.sh)"
_MAXTEXT_TPU = "MaxText benchmarks/xla_flags_library.py"
_IN_JAXLIB = "yes: jaxlib 0.10.2 starts with it"
_IN_LIBTPU = "yes: string in libtpu 0.0.42.1 (not started: needs a TPU)"


@dataclasses.dataclass(frozen=True)
class Setting:
  """One recommended flag or environment variable."""

  name: str  # '--xla_...' (an entry of `var`) or the environment variable itself
  value: str
  var: str  # 'XLA_FLAGS', 'LIBTPU_INIT_ARGS', or the variable's own name
  reason: str
  source: str
  confirmed: str

  @property
  def text(self) -> str:
    return f"{self.name}={self.value}"


def _xla(name: str, value: str, reason: str, source: str) -> Setting:
  return Setting(f"--{name}", value, "XLA_FLAGS", reason, source, _IN_JAXLIB)


def _tpu(name: str, reason: str, source: str = _MAXTEXT_TPU) -> Setting:
  return Setting(f"--{name}", "true", "LIBTPU_INIT_ARGS", reason, source, _IN_LIBTPU)


_BOTH = f"{_TOOLBOX}; {_MAXTEXT_A3}"
_PIPELINED = ("moves a loop's collectives into the neighbouring iteration so they overlap its "
              "compute (the accumulation scan, scanned layers)")
GPU: tuple[Setting, ...] = (
    _xla("xla_gpu_enable_latency_hiding_scheduler", "true",
         "schedules collectives asynchronously to overlap them with compute",
         f"{_JAX_TIPS}; JAX-Toolbox image default; {_MAXTEXT_A3}"),
    _xla("xla_gpu_enable_triton_gemm", "false",
         "cuBLAS instead of Triton-generated kernels for matmuls",
         f"{_BOTH} (JAX's tips page lists only the opposite xla_gpu_triton_gemm_any)"),
    _xla("xla_gpu_enable_highest_priority_async_stream", "true",
         "runs the collectives' stream at the highest priority so compute does not delay them",
         _BOTH),
    _xla("xla_gpu_all_reduce_combine_threshold_bytes", "134217728",
         "combines small all-reduces up to 128 MiB into one",
         f"{_JAX_TIPS}; values: {_MAXTEXT_A3}"),
    _xla("xla_gpu_all_gather_combine_threshold_bytes", "134217728",
         "combines FSDP's weight all-gathers up to 128 MiB (about a layer's weights)",
         f"{_JAX_TIPS}; values: {_MAXTEXT_A3}"),
    _xla("xla_gpu_reduce_scatter_combine_threshold_bytes", "67108864",
         "combines FSDP's gradient reduce-scatters up to 64 MiB",
         f"{_JAX_TIPS}; values: {_MAXTEXT_A3}"),
    _xla("xla_gpu_enable_all_gather_combine_by_dim", "false",
         "combines all-gathers even when they gather along different dimensions", _BOTH),
    _xla("xla_gpu_enable_reduce_scatter_combine_by_dim", "false",
         "combines reduce-scatters even when they scatter along different dimensions", _BOTH),
    _xla("xla_gpu_enable_pipelined_all_gather", "true", _PIPELINED, _BOTH),
    _xla("xla_gpu_enable_pipelined_reduce_scatter", "true", _PIPELINED, _BOTH),
    _xla("xla_gpu_enable_pipelined_all_reduce", "true", _PIPELINED, _BOTH),
    _xla("xla_gpu_enable_while_loop_double_buffering", "true",
         "double-buffers loop-carried values so the pipelined collectives need no copies", _BOTH),
    Setting("XLA_CLIENT_MEM_FRACTION", "0.9", "XLA_CLIENT_MEM_FRACTION",
            "JAX preallocates 90% of GPU memory instead of 75% (the rest for cuDNN and NCCL "
            "workspaces); gptjax.plan sizes runs for 90% usable",
            f"{_TOOLBOX} ('we typically set it to 0.9'); MaxText a3 uses 0.85",
            "yes: read by jaxlib 0.10.2 xla_client.py (XLA_PYTHON_CLIENT_MEM_FRACTION is its "
            "deprecated name; setting both is an error there, so a user's either one is kept)"),
)

TPU: tuple[Setting, ...] = (
    _tpu("xla_tpu_enable_async_collective_fusion",
         "runs collectives asynchronously, fused with the compute around them"),
    _tpu("xla_tpu_enable_async_collective_fusion_fuse_all_gather",
         "includes FSDP's weight all-gathers in that fusion"),
    _tpu("xla_tpu_enable_async_collective_fusion_multiple_steps",
         "lets one asynchronous collective overlap several compute steps"),
    _tpu("xla_tpu_overlap_compute_collective_tc", "overlaps collectives with TensorCore compute"),
    _tpu("xla_enable_async_all_gather", "makes all-gathers asynchronous"),
    _tpu("xla_tpu_enable_data_parallel_all_reduce_opt",
         "optimises the gradient all-reduces of data parallelism across slices (DCN)"),
    _tpu("xla_tpu_data_parallel_opt_different_sized_ops",
         "pipelines those data-parallel all-reduces across iterations"),
)

RECOMMENDED: dict[str, tuple[Setting, ...]] = {"gpu": GPU, "tpu": TPU, "cpu": ()}

# Recommended by a source but not set: (setting, source, why not).
LEFT_OUT: tuple[tuple[str, str, str], ...] = (
    ("--xla_gpu_graph_level=0", _MAXTEXT_A3, "unknown to jaxlib 0.10.2: XLA aborts on it"),
    ("--xla_gpu_enable_triton_softmax_fusion=false", _BOTH,
     "unknown to jaxlib 0.10.2: XLA aborts on it"),
    ("--xla_gpu_enable_async_collectives=true", _TOOLBOX,
     "unknown to jaxlib 0.10.2: XLA aborts on it"),
    ("--xla_disable_hlo_passes=rematerialization", _MAXTEXT_A3,
     "turns XLA's memory-saving rematerialisation off: an out-of-memory error instead of a "
     "slower step when memory is tight; gptjax chooses remat itself (model.remat)"),
    ("--xla_gpu_triton_gemm_any=true", _JAX_TIPS,
     "the opposite of xla_gpu_enable_triton_gemm=false; one of the two, to be measured"),
    ("NCCL_LL_BUFFSIZE=-2, NCCL_LL128_BUFFSIZE=-2", f"{_JAX_TIPS}, 'NCCL flags'",
     "-2 is NCCL's own default for both (NCCL_PARAM in NCCL's init.cc): no effect"),
    ("NCCL_PROTO=SIMPLE,LL,LL128", f"{_JAX_TIPS}, 'NCCL flags'",
     "names LL128 explicitly, which has corrupted data on some HGX H100 layouts (NCCL 2.18.1 "
     "release notes: workaround NCCL_PROTO=^LL128); NCCL picks among the protocols itself"),
    ("CUDA_DEVICE_MAX_CONNECTIONS=1", _BOTH,
     "NVIDIA's JAX-Toolbox tips advise against it on Blackwell, and the GPU's generation is "
     "unknown before JAX starts"),
    ("XLA_PYTHON_CLIENT_MEM_FRACTION", _TOOLBOX,
     "deprecated name of XLA_CLIENT_MEM_FRACTION in jaxlib 0.10.2"),
)

# Variables that set the same thing: a user's value of any of them is kept.
ALIASES = {"XLA_CLIENT_MEM_FRACTION": ("XLA_PYTHON_CLIENT_MEM_FRACTION",)}
# JAX's CUDA plugin, as `pip install jax[cuda12]` (or cuda13) installs it: either module.
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
                "jax_plugins.xla_cuda13")


def _module_exists(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:  # a dotted name whose parent package is not installed
    return False


def detect_backend(environ: MutableMapping[str, str] | None = None,
                   module_exists: Callable[[str], bool] = _module_exists,
                   paths: Callable[[str], list[str]] = glob.glob) -> str:
  """The backend JAX will use, found without starting JAX: 'gpu', 'tpu', 'cpu' (or another name).

  JAX_PLATFORMS decides when set (its first entry: 'cuda' -> 'gpu'); otherwise a TPU (libtpu
  installed and /dev/accel* or /dev/vfio/N present) before an NVIDIA GPU (a CUDA plugin installed
  and /dev/nvidiaN present), as JAX's own priority does, else 'cpu'.
  """
  environ = os.environ if environ is None else environ
  first = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
  if first:
    return {"cuda": "gpu"}.get(first, first)
  if module_exists("libtpu") and (paths("/dev/accel*") or paths("/dev/vfio/[0-9]*")):
    return "tpu"
  if any(module_exists(m) for m in CUDA_PLUGINS) and paths("/dev/nvidia[0-9]*"):
    return "gpu"
  return "cpu"


def _flag_names(text: str) -> set[str]:
  return {t.split("=", 1)[0].lstrip("-") for t in text.split() if t.startswith("-")}


def merge(backend: str, environ: MutableMapping[str, str]) -> tuple[dict[str, str], list[str],
                                                                      list[str]]:
  """What `apply` would change: ({variable: new value}, settings added, names the user set)."""
  changes, added, kept = {}, [], []
  for s in RECOMMENDED.get(backend, ()):
    if s.var in LISTS:
      if s.name.lstrip("-") in _flag_names(environ.get(s.var, "")):
        kept.append(s.name)
        continue
      changes[s.var] = " ".join(x for x in (changes.get(s.var, environ.get(s.var, "")), s.text)
                                if x.strip())
    else:
      if any(n in environ for n in (s.name, *ALIASES.get(s.name, ()))):
        kept.append(s.name)
        continue
      changes[s.name] = s.value
    added.append(s.text)
  return changes, added, kept


def _backends_initialized() -> bool:
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel  (no public API)
  return xla_bridge.backends_are_initialized()


def apply(mode: str = "auto", environ: MutableMapping[str, str] | None = None,
          backend: str | None = None) -> list[str]:
  """Adds the present backend's `RECOMMENDED` settings the environment lacks; returns them.

  Args:
    mode: 'auto' (add them) or 'none' (change nothing).
    environ: the environment to change (default `os.environ`, which must be changed before JAX
      starts its backends: XLA reads XLA_FLAGS, libtpu LIBTPU_INIT_ARGS once, at that point).
    backend: 'gpu', 'tpu' or 'cpu' (default: `detect_backend`).

  Raises:
    ValueError: an unknown mode.
    RuntimeError: there is something to add to `os.environ` but JAX's backends already started.
  """
  if mode not in MODES:
    raise ValueError(f"--xla_flags={mode!r}: choose one of {MODES}.")
  if mode == "none":
    return []
  real = environ is None
  environ = os.environ if real else environ
  backend = backend or detect_backend(environ)
  changes, added, kept = merge(backend, environ)
  if changes and real and _backends_initialized():
    raise RuntimeError("xla_flags.apply: JAX's backends already started, so XLA would ignore "
                       f"{added}. Call it before any JAX computation (first thing in main).")
  environ.update(changes)
  if added or kept:
    print(f"xla_flags ({backend}): added {' '.join(added) or 'nothing'}"
          + (f"; already set, kept: {' '.join(kept)}" if kept else ""), file=sys.stderr,
          flush=True)
  return added


def define_flag() -> None:
  """Defines a script's --xla_flags (absl) for `apply_from_flag`."""
  flags.DEFINE_enum("xla_flags", "auto", MODES,
                    "'auto': add the recommended XLA/runtime settings of the backend present "
                    "(gptjax/xla_flags.py; nothing on CPU; never one the user set); 'none': don't.")


def apply_from_flag() -> list[str]:
  """`apply` with the --xla_flags value `define_flag` made (after absl parsed the flags)."""
  return apply(flags.FLAGS.xla_flags)


def shell_defaults(backend: str) -> list[tuple[str, str]]:
  """[(variable, value)] of `backend`'s settings, for launch recipes: the flag lists joined."""
  out: dict[str, str] = {}
  for s in RECOMMENDED[backend]:
    out[s.var] = f"{out[s.var]} {s.text}" if s.var in out and s.var in LISTS else (
        s.text if s.var in LISTS else s.value)
  return list(out.items())


def table(backend: str) -> str:
  """A Markdown table of `backend`'s settings: setting, reason, source, confirmed."""
  rows = ["| setting | reason | source | confirmed |", "|---|---|---|---|"]
  rows += [f"| `{s.text}` ({s.var}) | {s.reason} | {s.source} | {s.confirmed} |"
           if s.var in LISTS else f"| `{s.text}` | {s.reason} | {s.source} | {s.confirmed} |"
           for s in RECOMMENDED[backend]]
  return "\n".join(rows)
