"""Checkpoints on Orbax: sharded, asynchronous, keep-last-N plus keep-best, with safe fallback.

Each step's checkpoint holds three items: `params`, `opt_state` (both sharded arrays, saved and
restored straight from/to the mesh's shardings, whatever layout wrote them) and `meta` (JSON: step,
tokens seen, the data iterator's state). Orbax writes into a temporary directory and renames it
when complete, so a crash mid-save never leaves a checkpoint that looks finished.
"""

import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_lib

from gptjax.config import ConfigError


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  """Registered up front, so a fresh manager can read a checkpoint's metadata before restoring."""
  return {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:
  """Saves and restores a run's checkpoints under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, ck: ml_collections.ConfigDict):
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    policies = [keep_lib.LatestN(ck.keep)]
    if ck.keep_best:
      policies.append(keep_lib.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True,
                                     n=ck.keep_best, keep_checkpoints_without_metrics=False))
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=ck.async_save, cleanup_tmp_directories=True,
            preservation_policy=keep_lib.AnyPreservationPolicy(policies)))

  def save(self, step: int, state, meta: dict[str, Any], val_loss: float | None = None) -> None:
    """Starts saving `state` at `step` (returns before the write finishes when async)."""
    self.manager.save(
        step, force=True, metrics={"val_loss": val_loss} if val_loss is not None else None,
        args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                opt_state=ocp.args.StandardSave(state.opt_state),
                                meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def restore_latest(self, abstract_state) -> tuple[Any, dict[str, Any]] | None:
    """The newest readable checkpoint as (state, meta), or None if there is none.

    An unreadable checkpoint is moved to `<workdir>/corrupt_checkpoints/<step>` with a warning
    and the previous one is tried; nothing is deleted.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        stored = self.manager.item_metadata(step)["params"]
        stored = stored.tree if hasattr(stored, "tree") else stored
      except Exception:  # pylint: disable=broad-except  (unreadable metadata: a broken checkpoint)
        stored = None
      if stored is not None:
        check_shapes(stored, abstract_state.params, f"the checkpoint at step {step}")
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (any unreadable file means: skip it)
        logging.warning("checkpoint at step %d is unreadable (%s: %s); falling back to the "
                        "previous one", step, type(e).__name__, str(e)[:200])
        print(f"gptjax: WARNING: checkpoint at step {step} is unreadable; moved aside, trying the "
              "previous one", flush=True)
        self._quarantine(step)
        continue
      state = abstract_state.replace(step=jax.numpy.asarray(restored.meta["step"], "int32"),
                                     params=restored.params, opt_state=restored.opt_state)
      return state, dict(restored.meta)
    return None

  def _quarantine(self, step: int) -> None:
    if jax.process_index() == 0:
      bad = os.path.join(self.workdir, "corrupt_checkpoints")
      os.makedirs(bad, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), os.path.join(bad, str(step)))
    self.manager.reload()


def check_shapes(stored, expected, what: str) -> None:
  """Raises ConfigError listing every parameter whose stored shape differs from the model's."""
  stored_flat = {jax.tree_util.keystr(k): v.shape
                 for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
  expected_flat = {jax.tree_util.keystr(k): v.shape
                   for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  bad = [f"{k}: stored {stored_flat.get(k)}, model {expected_flat.get(k)}"
         for k in sorted(set(stored_flat) | set(expected_flat))
         if tuple(stored_flat.get(k) or ()) != tuple(expected_flat.get(k) or ())]
  if bad:
    raise ConfigError(f"{what} does not fit this model; mismatched parameters: " + "; ".join(bad[:8])
                      + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else "")
                      + ". Use the model config it was trained with, or a new workdir.")


def restore_params(path: str, abstract_params) -> Any:
  """Parameters only (no optimizer state) from the latest checkpoint of another run.

  Args:
    path: a run's workdir, or its `checkpoints` directory.
    abstract_params: `jax.ShapeDtypeStruct`s with shardings, the layout to restore into.
  """
  directory = os.path.abspath(path)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise ConfigError(f"config.checkpoint.restore_from: {path!r} does not exist. Point it at a "
                      "gptjax run's workdir (or its checkpoints/ folder).")
  manager = ocp.CheckpointManager(directory, item_handlers=_handlers(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise ConfigError(f"config.checkpoint.restore_from: {path!r} holds no checkpoint. Train that "
                      "run first, or point at another.")
  stored = manager.item_metadata(step)["params"]
  check_shapes(stored.tree if hasattr(stored, "tree") else stored, abstract_params,
               f"config.checkpoint.restore_from: the checkpoint at {directory} (step {step})")
  return manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params))).params
