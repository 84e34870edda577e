"""A run directory, and the one module that knows what is in it.

    <workdir>/
      config.json             the resolved config the run trained with
      tokenizer.model         its tokenizer: a SentencePiece model, or tokenizer/ (GPT-2 BPE files)
      checkpoints/<step>/     params, opt_state (not in params-only or serving checkpoints), meta
      corrupt_checkpoints/    unreadable checkpoints moved aside when a run resumed
      metrics.jsonl, tb/      metrics as JSON lines and TensorBoard events
      samples.txt             text sampled at the end of training
      eval/step_<n>.json      scripts/evaluate.py's results

Training checks a workdir with `check` before anything is written, and records its config with
`write_config` once every other check passed; `checkpoint.Checkpointer` resumes the latest
checkpoint. Everything that reads a run afterwards opens it here: `read_config`, `tokenizer`,
`restore` (the parameters of the latest or a given step, in a mesh fit for inference), `save_params`
(a params-only or serving checkpoint with its config); quantized serving checkpoints load with
`gptjax.quantize.load`, which opens them with the same functions.
"""

import dataclasses
import json
import os
import tempfile
from typing import Any

import jax
import ml_collections

from gptjax import checkpoint, layout, sharding
from gptjax.data import files, tokenizer as tokenizer_lib
from gptjax.errors import ConfigError
from gptjax.model import ModelArgs
from gptjax.train import Trainer

CONFIG = "config.json"

# Settings that define the token stream a checkpoint's data position points into.
_STREAM = ("seed", "data.source", "data.paths", "data.text_key", "data.txt_split",
           "data.tfds_name", "data.tfds_data_dir", "data.tfds_train_split", "data.tfds_val_split",
           "data.val_fraction", "data.max_docs", "data.tokenizer.", "data.mixture.")
# Fine-tuning: the settings that define its trained parameters and its examples.
_FINETUNE_FIXED = ("seed", "finetune.base", "finetune.task", "finetune.peft", "finetune.freeze",
                   "finetune.train_path", "finetune.text_fields", "finetune.label_field",
                   "finetune.choices_field", "finetune.classes", "finetune.delimiter",
                   "finetune.template", "finetune.completion_field", "finetune.pack",
                   "finetune.adapter_dim", "finetune.prefix_len", "finetune.lora.")


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"gptjax: {msg}", flush=True)


# ---- config.json ------------------------------------------------------------------------------
def saved_config(workdir: str) -> dict[str, Any] | None:
  """The workdir's `config.json` as a dict, or None when it has none."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_config(workdir: str, setting: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved.

  Raises:
    ConfigError: naming `setting` (the flag or key that gave `workdir`) when there is none.
  """
  saved = saved_config(workdir)
  if saved is None:
    raise ConfigError(f"{setting}: {workdir!r} has no {CONFIG}, so it is not a gptjax run. "
                      "Point it at a directory scripts/train.py wrote.")
  return ml_collections.ConfigDict(saved)


def write_config(config: ml_collections.ConfigDict | dict[str, Any], workdir: str) -> None:
  """Records the resolved config as `config.json` (process 0; atomically)."""
  if jax.process_index() != 0:
    return
  text = (config.to_json_best_effort(indent=2, sort_keys=True)
          if isinstance(config, ml_collections.ConfigDict)
          else json.dumps(config, indent=2, sort_keys=True))
  os.makedirs(workdir, exist_ok=True)
  files.write_atomic(os.path.join(workdir, CONFIG), text.encode())


def run_kind(config: dict[str, Any]) -> str:
  """'fine-tuning' for a config with `finetune.train_path` (what scripts/finetune.py runs), else
  'pre-training'."""
  return "fine-tuning" if config.get("finetune", {}).get("train_path") else "pre-training"


# ---- tokenizer and checkpoints ------------------------------------------------------------------
def has_tokenizer(workdir: str) -> bool:
  return any(os.path.exists(os.path.join(workdir, name))
             for name in (tokenizer_lib.WORKDIR_SPM, tokenizer_lib.WORKDIR_GPT2))


def load_tokenizer(cfg: ml_collections.ConfigDict, workdir: str, setting: str = "--workdir"):
  """The tokenizer the run saved (as its config's `data.tokenizer` says), never a new one.

  Raises:
    ConfigError: naming `setting`, when the workdir holds none.
  """
  if not has_tokenizer(workdir):
    raise ConfigError(f"{setting}: {workdir!r} has no saved tokenizer ({tokenizer_lib.WORKDIR_SPM}"
                      f" or {tokenizer_lib.WORKDIR_GPT2}/), so text cannot be encoded as in "
                      "training. Point it at a run scripts/train.py wrote: it saves its tokenizer "
                      "first.")
  return tokenizer_lib.load_or_train(cfg.data, workdir)


def has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def save_params(workdir: str, step: int, params, meta: dict[str, Any]) -> str:
  """A params-only checkpoint `<workdir>/checkpoints/<step>` with `meta` (which holds the resolved
  `config` dict), and that config as the workdir's `config.json`. Returns the checkpoints
  directory."""
  directory = checkpoint.save_params(workdir, step, params, meta)
  write_config(meta["config"], workdir)
  return directory


def checkpoint_config(reader: checkpoint.Reader, step: int) -> tuple[dict[str, Any] | None, str]:
  """(the config the checkpoint at `step` was trained with, where it was read): the one in its
  meta, else (checkpoints older than that) its workdir's `config.json`, else (None, '')."""
  meta = reader.meta(step)
  if "config" in meta:
    return meta["config"], "checkpoint meta"
  workdir = os.path.dirname(reader.directory)
  saved = saved_config(workdir)
  return (saved, os.path.join(workdir, CONFIG)) if saved is not None else (None, "")


# ---- creating and checking a workdir ----------------------------------------------------------
def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{'optim.clip_norm': (1.0, 0.0), ...}: every setting whose value differs (missing = None)."""
  a, b = _flat(old), _flat(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses, before anything is written, a resume that cannot continue the run in the workdir,
  or a workdir that cannot be written; says in one line which settings changed otherwise.

  A resume may change how the model computes (`ModelArgs.RUNTIME_FIELDS`), never what it is, nor
  the token stream (pre-training) or the task and trained parameters (fine-tuning).
  """
  old = saved_config(workdir)
  if old is not None:
    new = json.loads(cfg.to_json_best_effort())
    changes = changed_settings(old, new)
    changes.pop("model.vocab_size", None)  # set from the run's own tokenizer
    changes.pop("model.attention_kernels", None)  # what loop.run recorded, not a setting
    tokenizer_changes = {k: v for k, v in changes.items() if k.startswith("data.tokenizer.")}
    if tokenizer_changes and has_tokenizer(workdir):
      raise ConfigError(
          f"workdir {workdir!r} holds the tokenizer of a run with other tokenizer settings "
          f"({_describe(tokenizer_changes)}); it would be used instead of the one asked for. Put "
          "the settings back, or use a new --workdir.")
    if has_checkpoints(workdir):
      _check_resume(workdir, changes, run_kind(old), run_kind(new))
    if changes:
      _log(f"resuming with changed settings: {_describe(changes)}")
  try:
    os.makedirs(workdir, exist_ok=True)
    # A probe of its own per process: the processes of a multi-host run share the workdir.
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f"workdir {workdir!r} is not writable ({e.strerror}). Choose a directory you "
                      "can write to with --workdir.") from e


def _check_resume(workdir: str, changes: dict[str, tuple[Any, Any]], old_kind: str,
                  new_kind: str) -> None:
  if new_kind != old_kind:
    raise ConfigError(
        f"workdir {workdir!r} holds a {old_kind} run, and this is a {new_kind} run: it would "
        "resume or overwrite the other run's checkpoints. Use a new --workdir (fine-tuning reads "
        "its base through finetune.base).")
  model = {k: v for k, v in changes.items()
           if k.startswith("model.") and k[len("model."):] not in ModelArgs.RUNTIME_FIELDS}
  if model:
    raise ConfigError(
        f"workdir {workdir!r} holds a run of a different model ({_describe(model)}), so it "
        "cannot resume. Use a new --workdir, or checkpoint.restore_from to start from its "
        "weights.")
  fixed = _FINETUNE_FIXED if new_kind == "fine-tuning" else _STREAM
  stream = {k: v for k, v in changes.items() if k == "seed" or any(
      k.startswith(p) for p in fixed if p != "seed")}
  if stream and new_kind == "fine-tuning":
    raise ConfigError(
        f"workdir {workdir!r} holds a fine-tuning run with other task, data or trained-parameter"
        f" settings ({_describe(stream)}), so it cannot resume. Put them back, or use a new "
        "--workdir.")
  if stream:
    raise ConfigError(
        f"workdir {workdir!r} holds a run trained on another token stream ({_describe(stream)}): "
        "its data position would skip or repeat data, and validation documents could move into "
        "training. Put these settings back to resume, or start a new --workdir with "
        f"--config.checkpoint.restore_from={workdir} (its weights, fresh data order).")


# ---- opening a run for inference --------------------------------------------------------------
def fit_mesh(cfg: ml_collections.ConfigDict, n_devices: int) -> None:
  """Keeps the run's mesh (`cfg.mesh`) when it fits `n_devices`; else makes them all the data axis
  (weights replicated), and says so in one line."""
  try:
    sharding.mesh_shape(cfg.mesh, n_devices)
  except ConfigError:
    old = {a: cfg.mesh[a] for a in sharding.MESH_AXES}
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    _log(f"the run's mesh {old} does not fit {n_devices} device(s); using them all as the data "
         "axis, with the weights replicated")


def inference_mesh(cfg: ml_collections.ConfigDict, devices=None):
  """(mesh, rules) to run a trained model on `devices` (default all): the run's own mesh when it
  fits them, else all of them as the data axis (`fit_mesh`, which updates `cfg.mesh`)."""
  devices = jax.devices() if devices is None else list(devices)
  fit_mesh(cfg, len(devices))
  return sharding.make_mesh(cfg.mesh, devices), sharding.rules(cfg.mesh.rules)


@dataclasses.dataclass
class Restored:
  """A run opened for inference: its config, tokenizer, model (in `trainer`) and parameters."""

  cfg: ml_collections.ConfigDict
  tokenizer: Any
  trainer: Trainer
  params: Any
  step: int


def checkpoint_step(workdir: str, step: int | None = None,
                    setting: str = "--workdir") -> tuple[checkpoint.Reader, int]:
  """(a reader of the run's checkpoints, `step` or the latest); a clear error when absent."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not has_checkpoints(workdir):
    raise ConfigError(f"{setting}: {workdir!r} holds no checkpoint (nothing in {directory}). "
                      "Train until it saves one, or point it at a run that did.")
  reader = checkpoint.Reader(workdir)
  steps = reader.steps()
  if step is not None and step not in steps:
    raise ConfigError(f"{setting}: {workdir!r} has no checkpoint at step {step}; it has {steps}. "
                      "Pass one of these as the step, or leave it out for the latest.")
  return reader, steps[-1] if step is None else step


def restore(workdir: str, step: int | None = None, devices=None,
            setting: str = "--workdir") -> Restored:
  """The parameters of a run's checkpoint (the latest, or `step`) with its config and tokenizer,
  sharded over `inference_mesh`."""
  cfg = read_config(workdir, setting)
  reader, step = checkpoint_step(workdir, step, setting)
  tokenizer = load_tokenizer(cfg, workdir, setting)
  trainer = Trainer.build(cfg, inference_mesh(cfg, devices)[0])
  abstract = trainer.abstract_state.params
  layout.check_shapes(reader.tree(step), abstract,
                          f"the checkpoint at {reader.directory} (step {step})")
  params = reader.restore(step, abstract)
  reader.close()
  return Restored(cfg, tokenizer, trainer, params, step)
