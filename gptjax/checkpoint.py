"""Checkpoints on Orbax: sharded, asynchronous, keep-last-N plus keep-best, with safe fallback.

Each step's checkpoint holds three items: `params`, `opt_state` (sharded arrays) and `meta` (JSON:
step, tokens seen, the data iterator's state and the run's resolved config). Orbax writes into a
temporary directory and renames it when complete, so a crash mid-save never leaves a checkpoint
that looks finished. Restores are portable:

- onto any mesh: arrays are read straight into the target shardings;
- across `model.scan_layers`: the saved layout is read from the checkpoint's tree metadata, the
  arrays are restored in that layout (sharded like the target) and converted on the devices, the
  Adam moments with the params. Remat policy and compute dtype do not change the tree at all;
- onto another device or host count, with another micro-batch: `resume_data_state` moves the data
  position, since the data order depends only on (seed, sequence index).

A params-only checkpoint (`save_params`: for serving, or `checkpoint.restore_from`) has no
`opt_state`. `Reader` reads any checkpoint one array at a time, for conversion and inspection.
"""

import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_lib

from gptjax import layout, optim, optstate
from gptjax.errors import ConfigError


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  """Registered up front, so a fresh manager can read a checkpoint's metadata before restoring."""
  return {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler()}


def checkpoints_dir(path: str) -> str:
  """`<workdir>/checkpoints` for a workdir; a checkpoints directory itself is returned as is."""
  directory = os.path.abspath(path)
  sub = os.path.join(directory, "checkpoints")
  return sub if os.path.isdir(sub) else directory


def _val_loss(metrics: dict[str, float]) -> float:
  return metrics["val_loss"]


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


class Checkpointer:
  """Saves and restores a run's checkpoints under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, ck: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict | None = None):
    """`config`, if given, is recorded in every checkpoint's meta (resume checks, inspection)."""
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.config = config_json(config) if config is not None else None
    policies = [keep_lib.LatestN(ck.keep)]
    best = {}
    if ck.keep_best:
      policies.append(keep_lib.BestN(get_metric_fn=_val_loss, reverse=True,
                                     n=ck.keep_best, keep_checkpoints_without_metrics=False))
      # best_fn makes Orbax write each step's metrics to disk and read them back on resume;
      # without it BestN ranks only the checkpoints saved since the process started.
      best = {"best_fn": _val_loss, "best_mode": "min"}
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=ck.async_save, cleanup_tmp_directories=True,
            preservation_policy=keep_lib.AnyPreservationPolicy(policies), **best))

  def save(self, step: int, state, meta: dict[str, Any], val_loss: float | None = None) -> None:
    """Starts saving `state` at `step` (returns before the write finishes when async)."""
    if self.config is not None:
      meta = {**meta, "config": self.config}
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

  def restore_latest(self, abstract_state,
                     init_opt_state=None) -> tuple[Any, dict[str, Any]] | None:
    """The newest readable checkpoint as (state, meta), or None if there is none.

    The state comes back in `abstract_state`'s layout and shardings, whichever layout and mesh
    wrote it. The optimizer state is matched by role and parameter path (`gptjax.optstate`), so a
    checkpoint restores across changes of the Optax chain (clipping, `train.nonfinite`, pruning):
    state with no counterpart starts from `init_opt_state(params)` (its step counts from the
    checkpoint's step), and one line says which.

    Three outcomes per checkpoint, decided once for all processes:
    - readable: restored;
    - unreadable (incomplete, truncated or garbled files): moved to
      `<workdir>/corrupt_checkpoints/<step>` with a warning, and the previous one is tried;
    - a read error that persists over `READ_ATTEMPTS` tries (I/O error, timeout): the run stops
      with `CheckpointReadError` and the checkpoint stays where it is.
    A checkpoint that does not fit this model raises ConfigError before anything is read or moved.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      self._refuse_params_only(step)
      outcome, error, restored = _READ, None, None
      try:
        restored = self._read_with_retries(step, abstract_state, init_opt_state)
      except _Unreadable as e:
        outcome, error = _UNREADABLE, e
      except CheckpointReadError as e:
        outcome, error = _READ_ERROR, e
      outcome = _worst_on_any_process(outcome)
      if outcome == _READ_ERROR:
        raise error or CheckpointReadError(
            f"another process could not read the checkpoint at step {step} in {self.directory}; "
            "it was left in place. Check the storage and run again.")
      if outcome == _UNREADABLE:
        why = f" ({error})" if error else " (on another process)"
        logging.warning("checkpoint at step %d is unreadable%s", step, why)
        print(f"gptjax: WARNING: checkpoint at step {step} is unreadable{why}; moved to "
              "corrupt_checkpoints/, trying the previous one", flush=True)
        self._quarantine(step)
        continue
      return restored
    return None

  def _refuse_params_only(self, step: int) -> None:
    if (_stored_tree(self.manager, step, "params") is not None
        and not os.path.isdir(os.path.join(self.directory, str(step), "opt_state"))):
      raise ConfigError(
          f"the checkpoint at step {step} in {self.directory} holds parameters only (an export "
          "for serving), so training cannot resume from it. Start a new workdir with "
          f"--config.checkpoint.restore_from={self.workdir}.")

  def _read_with_retries(self, step: int, abstract_state, init_opt_state):
    for attempt in range(READ_ATTEMPTS):
      try:
        return self._read(step, abstract_state, init_opt_state)
      except (ConfigError, _Unreadable):
        raise
      except Exception as e:  # pylint: disable=broad-except  (sorted into the two kinds below)
        if not is_transient(e):
          raise _Unreadable(f"{type(e).__name__}: {str(e)[:300]}") from e
        if attempt + 1 == READ_ATTEMPTS:
          raise CheckpointReadError(
              f"the checkpoint at step {step} in {self.directory} could not be read after "
              f"{READ_ATTEMPTS} tries ({type(e).__name__}: {str(e)[:300]}). It was left in place; "
              "check the storage and run again.") from e
        logging.warning("reading the checkpoint at step %d failed (%s); retrying", step, e)
        time.sleep(READ_RETRY_S * 2 ** attempt)
    raise AssertionError("unreachable")

  def _read(self, step: int, abstract_state, init_opt_state):
    """Restores one checkpoint (see `restore_latest`); raises _Unreadable for missing metadata."""
    stored = _stored_tree(self.manager, step, "params")
    saved_opt = _stored_tree(self.manager, step, "opt_state")
    if stored is None or saved_opt is None:
      raise _Unreadable("its tree metadata cannot be read")
    plan = layout.RestorePlan(stored, abstract_state.params, f"the checkpoint at step {step}")
    target_opt = plan.saved_layout(abstract_state.opt_state)
    opt = optstate.OptPlan(target_opt, saved_opt, f"the checkpoint at step {step}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(plan.saved_layout(abstract_state.params)),
        opt_state=ocp.args.StandardRestore(opt.saved_abstract),
        meta=ocp.args.JsonRestore()))
    meta, params = dict(restored.meta), restored.params
    opt_state = opt.assemble(restored.opt_state)
    del restored  # converted item by item, each saved-layout copy freed as soon as it is done
    params = plan.to_target(params, abstract_state.params)
    opt_state = plan.to_target(opt_state, abstract_state.opt_state)
    if opt.match.fresh or opt.match.dropped:
      opt_state = optstate.fill_fresh(opt_state, abstract_state, params, stored_opt=saved_opt,
                                      plan=plan, init_opt_state=init_opt_state, step=meta["step"])
      _log_once("optimizer state restored by parameter path; "
                + (f"started fresh (no counterpart in the checkpoint): "
                   f"{optstate.describe(opt.match.fresh)}" if opt.match.fresh else "")
                + ("; " if opt.match.fresh and opt.match.dropped else "")
                + (f"not used any more: {optstate.describe(opt.match.dropped)}"
                   if opt.match.dropped else ""))
    state = abstract_state.replace(step=jax.numpy.asarray(meta["step"], "int32"),
                                   params=params, opt_state=opt_state)
    return state, meta

  def _quarantine(self, step: int) -> None:
    """Moves an unreadable checkpoint aside (process 0), then every process sees it gone."""
    if jax.process_index() == 0:
      bad = os.path.join(self.workdir, "corrupt_checkpoints")
      os.makedirs(bad, exist_ok=True)
      target = os.path.join(bad, str(step))
      if os.path.exists(target):  # moved aside before: keep both
        target += f".{int(time.time())}"
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"gptjax quarantine {step}")
    self.manager.reload()

  def quarantined(self) -> list[str]:
    """The checkpoints of this workdir moved aside as unreadable."""
    bad = os.path.join(self.workdir, "corrupt_checkpoints")
    return sorted(os.listdir(bad)) if os.path.isdir(bad) else []

def _stored_tree(manager: ocp.CheckpointManager, step: int, item: str):
  """An item's tree of `ArrayMetadata` as saved, or None if the metadata is unreadable."""
  try:
    stored = manager.item_metadata(step)[item]
  except Exception:  # pylint: disable=broad-except  (unreadable metadata: a broken checkpoint)
    return None
  return stored.tree if hasattr(stored, "tree") else stored


class CheckpointReadError(RuntimeError):
  """A committed checkpoint could not be read after retries; it was left where it is."""


class _Unreadable(Exception):
  """A checkpoint whose files are incomplete, truncated or garbled."""


READ_ATTEMPTS = 3  # tries before a persisting read error stops the run
READ_RETRY_S = 1.0  # first pause between tries; doubled after each
_READ, _UNREADABLE, _READ_ERROR = 0, 1, 2
# Status words of storage errors that may pass (TensorStore reports them in the message).
_TRANSIENT_WORDS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                    "Input/output error", "timed out", "Connection reset")


def is_transient(error: BaseException) -> bool:
  """Whether a read error may pass on a retry (I/O, network, timeout) rather than show damage.

  Missing files (an incomplete checkpoint) and data errors (truncated or garbled bytes:
  TensorStore's OUT_OF_RANGE, DATA_LOSS, decoding errors) are damage.
  """
  if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
    return False
  if isinstance(error, (OSError, TimeoutError, ConnectionError)):
    return True
  return any(word in str(error) for word in _TRANSIENT_WORDS)


def _worst_on_any_process(outcome: int) -> int:
  """The worst outcome over all processes, so they all take the same decision."""
  if jax.process_count() == 1:
    return outcome
  return int(multihost_utils.process_allgather(np.array(outcome, np.int32)).max())


_logged: set[str] = set()


def _log_once(message: str) -> None:
  if message not in _logged and jax.process_index() == 0:
    _logged.add(message)
    print(f"gptjax: {message}", flush=True)


def restore_params(path: str, abstract_params) -> Any:
  """Parameters only (no optimizer state) from the latest checkpoint of another run.

  Args:
    path: a run's workdir, or its `checkpoints` directory (full or params-only checkpoints).
    abstract_params: `jax.ShapeDtypeStruct`s with shardings, the layout to restore into (either
      value of `model.scan_layers`; stored values are cast to its dtypes).
  """
  directory = checkpoints_dir(path)
  if not os.path.isdir(directory):
    raise ConfigError(f"config.checkpoint.restore_from: {path!r} does not exist. Point it at a "
                      "gptjax run's workdir (or its checkpoints/ folder).")
  manager = ocp.CheckpointManager(directory, item_handlers=_handlers(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise ConfigError(f"config.checkpoint.restore_from: {path!r} holds no checkpoint. Train that "
                      "run first, or point at another.")
  what = f"config.checkpoint.restore_from: the checkpoint at {directory} (step {step})"
  plan = layout.RestorePlan(_stored_tree(manager, step, "params"), abstract_params, what)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(plan.saved_layout(abstract_params)))).params
  return plan.to_target(restored, abstract_params)


def save_params(workdir: str, step: int, params, meta: dict[str, Any]) -> str:
  """Writes a params-only checkpoint `<workdir>/checkpoints/<step>` (`gptjax.run.save_params` also
  records its config as the workdir's `config.json`).

  Args:
    workdir: the output folder (created).
    step: the step to file it under.
    params: arrays (numpy or jax) in either layout and any float dtype.
    meta: JSON with at least `config` (the resolved config dict); written as the `meta` item.

  Returns:
    The checkpoints directory.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(directory, item_handlers=_handlers())
  manager.save(step, force=True, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                         meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()
  manager.close()
  return directory


def resume_data_state(meta: dict[str, Any], cfg: ml_collections.ConfigDict, plan) -> dict[str, Any]:
  """The data iterator state that continues a run's batch sequence under this config.

  Batch k holds sequences [k * B, (k + 1) * B) of one shuffled stream that depends only on the seed
  and the sequence length (`gptjax.data.pipeline`), so the device count, the host count and the
  micro-batch may change between save and resume. The global batch and the sequence length may
  not: they would change the run itself (its batches, and the steps its schedule was planned in).

  Args:
    meta: the restored checkpoint's meta (`step`, `tokens`, `data`, and `config` when recorded).
    cfg: the config resuming the run.
    plan: its `optim.RunPlan`.

  Raises:
    ConfigError: the change cannot keep the batch sequence; the message says which setting.
  """
  state, saved = dict(meta["data"]), meta.get("config")
  if saved is None:  # written before configs were recorded: nothing to compare against
    return state
  t, step = saved["train"], meta["step"]
  old_seq, old_batch = optim.seq_len(ml_collections.ConfigDict(saved)), t["global_batch"]
  # The micro-batch the data position counts in: recorded since it can be resolved from 0 (a batch
  # ramp starts below the global batch), else resolved from the saved config the same way.
  old_micro = meta.get("micro_batch") or optim.micro_batch(ml_collections.ConfigDict(saved))
  new_batch = cfg.train.global_batch
  if (old_seq, old_batch) != (plan.seq_len, new_batch):
    raise ConfigError(
        f"config.train.global_batch/seq_len: the checkpoint at step {step} was trained with "
        f"{old_batch} sequences x {old_seq} tokens per step, this config asks for {new_batch} x "
        f"{plan.seq_len}. Resuming with another global batch would change the run's batches and "
        f"schedule. Keep train.global_batch={old_batch} and train.seq_len={old_seq} (set "
        "train.micro_batch to fit the devices: accumulation makes up the rest), or start a new run "
        "from these weights with checkpoint.restore_from.")
  if old_micro == plan.micro_batch:
    return state
  why = None
  if set(state) != {"next_index"}:
    why = ("its data position was saved by Grain worker processes (data.worker_count > 0) or "
           "is a position in a streamed source (data.hf_streaming), and cannot be moved to "
           "another micro-batch")
  elif plan.tokens_before(step) != meta["tokens"]:
    why = (f"with optim.batch_ramp_tokens the ramp is planned in micro-batches, so the new plan "
           f"has {plan.tokens_before(step):,} tokens before step {step} instead of "
           f"{meta['tokens']:,}")
  elif state["next_index"] * old_micro % plan.micro_batch:
    why = (f"{state['next_index'] * old_micro} sequences read so far are not a whole number of "
           f"micro-batches of {plan.micro_batch}")
  if why:
    raise ConfigError(f"config.train.micro_batch: the checkpoint at step {step} used micro-batches"
                      f" of {old_micro} and this config {plan.micro_batch}, but {why}. Resume with "
                      f"train.micro_batch={old_micro}.")
  return {"next_index": state["next_index"] * old_micro // plan.micro_batch}


def is_quantized(path: str, step: int | None = None) -> bool:
  """Whether the checkpoint (the latest, or `step`) was written by `gptjax.quantize.save`."""
  if not os.path.isdir(checkpoints_dir(path)):
    return False
  reader = Reader(path)
  steps = reader.steps()
  if not steps or (step is not None and step not in steps):
    return False
  return "quantize" in reader.meta(steps[-1] if step is None else step)


class Reader:
  """Read-only access to a run's checkpoints, one array at a time (conversion, inspection)."""

  def __init__(self, path: str):
    self.directory = checkpoints_dir(path)
    if not os.path.isdir(self.directory):
      raise ConfigError(f"{path!r} does not exist. Point at a gptjax run's workdir.")
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(),
                                         options=ocp.CheckpointManagerOptions(read_only=True))
    self._pytree = ocp.PyTreeCheckpointer()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def resolve(self, step: int | None) -> int:
    """`step`, or the latest when None; a clear error when it does not exist."""
    steps = self.steps()
    if not steps:
      raise ConfigError(f"{self.directory} holds no checkpoint.")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise ConfigError(f"{self.directory} has no checkpoint at step {step}; it has {steps}.")
    return step

  def has(self, step: int, item: str) -> bool:
    return os.path.isdir(self.path(step, item))

  def path(self, step: int, item: str = "") -> str:
    return os.path.join(self.directory, str(step), item)

  def meta(self, step: int) -> dict[str, Any]:
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                .meta)

  def restore(self, step: int, abstract_params, item: str = "params"):
    """The item restored into `abstract_params` (`jax.ShapeDtypeStruct`s with shardings)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(abstract_params)}))[item]

  def close(self) -> None:
    self.manager.close()

  def tree(self, step: int, item: str = "params"):
    """The item's saved structure: a tree of Orbax `ArrayMetadata` (.shape, .dtype)."""
    md = self.manager.item_metadata(step)[item]
    return md.tree if hasattr(md, "tree") else md

  def read(self, step: int, keys: tuple[str, ...], item: str = "params") -> np.ndarray:
    """One array of the item by its key path, e.g. ('layers', 'block_0', 'mlp', 'fc', 'kernel')."""
    def nest(leaf):
      for k in reversed(keys):
        leaf = {k: leaf}
      return leaf
    out = self._pytree.restore(self.path(step, item), args=ocp.args.PyTreeRestore(
        item=nest(0), restore_args=nest(ocp.RestoreArgs(restore_type=np.ndarray)),
        partial_restore=True))
    for k in keys:
      out = out[k]
    return out

  def read_all(self, step: int, item: str = "params"):
    """The whole item as a tree of numpy arrays on this host."""
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                self.tree(step, item))
    return self._pytree.restore(self.path(step, item),
                                args=ocp.args.PyTreeRestore(restore_args=restore_args))

  def size_on_disk(self, step: int) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(self.path(step)) for f in files)
