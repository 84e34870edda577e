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
    plan = _RestorePlan(stored, abstract_state.params, f"the checkpoint at step {step}")
    target_opt = plan.saved_layout(abstract_state.opt_state)
    opt = _OptPlan(target_opt, saved_opt, f"the checkpoint at step {step}")
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
      opt_state = _fill_fresh(opt_state, abstract_state, params, stored_opt=saved_opt, plan=plan,
                              init_opt_state=init_opt_state, step=meta["step"])
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


class _OptPlan:
  """How to read a saved optimizer state into the current one's tree (see `gptjax.optstate`).

  Leaves are paired by role; paired leaves must have the same shape. The saved tree is read as it
  was written, each leaf sharded like its counterpart (or like the parameter it belongs to, or
  replicated), and rebuilt in the current tree with placeholders where state starts fresh.
  """

  def __init__(self, target, saved, what: str):
    self.match = optstate.match(target, saved)
    self._target_leaves, self._treedef = jax.tree.flatten(target)
    saved_flat, self._saved_treedef = jax.tree_util.tree_flatten_with_path(saved)
    mesh = next(x.sharding.mesh for x in self._target_leaves
                if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding))
    sharding: dict[int, Any] = {}
    bad = []
    for i, j in enumerate(self.match.source):
      if j is None:
        continue
      t, (path, s) = self._target_leaves[i], saved_flat[j]
      if tuple(t.shape) != tuple(s.shape):
        bad.append(f"{jax.tree_util.keystr(path)}: stored {tuple(s.shape)}, now {tuple(t.shape)}")
      sharding[j] = t.sharding
    if bad:
      raise ConfigError(f"{what} has an optimizer state that does not fit this model: "
                        + "; ".join(bad[:6]) + ". Use the model config it was trained with, or "
                        "checkpoint.restore_from (weights only) in a new workdir.")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.saved_abstract = jax.tree_util.tree_unflatten(self._saved_treedef, [
        jax.ShapeDtypeStruct(tuple(s.shape), s.dtype, sharding=sharding.get(j, replicated))
        for j, (_, s) in enumerate(saved_flat)])

  def assemble(self, restored_saved):
    """The current tree from the restored saved leaves; fresh leaves are zeros for now."""
    saved_leaves = jax.tree.leaves(restored_saved)
    leaves = [saved_leaves[j] if j is not None else
              jax.jit(lambda t=t: jax.numpy.zeros(t.shape, t.dtype), out_shardings=t.sharding)()
              for t, j in zip(self._target_leaves, self.match.source)]
    return jax.tree.unflatten(self._treedef, leaves)


def _fill_fresh(opt_state, abstract_state, params, *, stored_opt, plan, init_opt_state, step):
  """Replaces the leaves of `opt_state` (target layout) that have no saved counterpart with their
  initial values; a fresh step count (`count`) starts at the checkpoint's step."""
  saved_as_target = stored_opt
  if plan.convert:  # roles name parameter paths: compare both in the target layout
    saved_as_target = layout.convert_tree(
        jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored_opt),
        not plan.saved_scanned, plan.period, layout.take_abstract, layout.join_abstract)
  match = optstate.match(abstract_state.opt_state, saved_as_target)
  fresh = [i for i, j in enumerate(match.source) if j is None]
  if not fresh:
    return opt_state
  if init_opt_state is None:
    raise ConfigError("the checkpoint's optimizer state lacks "
                      f"{optstate.describe(match.fresh)}, and no initialiser was given to start it")
  flat = jax.tree_util.tree_flatten_with_path(abstract_state.opt_state)[0]
  shardings = [flat[i][1].sharding for i in fresh]

  def init(p):
    leaves = jax.tree.leaves(init_opt_state(p))
    out = []
    for i in fresh:
      x = leaves[i]
      if optstate.role(flat[i][0]) == ("count",):
        x = jax.numpy.full_like(x, step)
      out.append(x)
    return out

  values = jax.jit(init, out_shardings=shardings)(params)
  leaves = jax.tree.leaves(opt_state)
  for i, v in zip(fresh, values):
    leaves[i] = v
  return jax.tree.unflatten(jax.tree.structure(opt_state), leaves)



class _RestorePlan:
  """How to restore a checkpoint saved in one layout into a model of (maybe) the other one.

  Checks the shapes first (in the model's layout), so a checkpoint of another model is refused with
  the list of mismatched parameters before anything is read.
  """

  def __init__(self, stored, abstract_params, what: str):
    self.convert = False
    if stored is None:  # unreadable metadata: let the restore fail and the caller fall back
      return
    saved_scanned, target_scanned = layout.is_scanned(stored), layout.is_scanned(abstract_params)
    if saved_scanned == target_scanned:
      check_shapes(stored, abstract_params, what)
      return
    self.convert, self.saved_scanned = True, saved_scanned
    self.period = layout.period_of(stored if saved_scanned else abstract_params)
    as_model = layout.convert(
        jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored), target_scanned,
        self.period, layout.take_abstract, layout.join_abstract)
    check_shapes(as_model, abstract_params,
                 f"{what} (saved with model.scan_layers={saved_scanned}, compared unstacked)"
                 if saved_scanned else f"{what} (saved with model.scan_layers=False)")

  def saved_layout(self, abstract_tree):
    """`abstract_tree` (params or an optimizer state) as it was saved, sharded like the target."""
    if not self.convert:
      return abstract_tree
    return layout.convert_tree(abstract_tree, self.saved_scanned, self.period,
                               layout.take_abstract, layout.join_abstract)

  def to_target(self, tree, abstract_tree):
    """Converts restored arrays to the target layout on the devices, placed as the target says."""
    if not self.convert:
      return tree
    out_shardings = jax.tree.map(lambda x: x.sharding, abstract_tree)
    target_scanned = not self.saved_scanned
    return jax.jit(lambda t: layout.convert_tree(t, target_scanned, self.period),
                   out_shardings=out_shardings)(tree)


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
    raise ConfigError(f"{what} does not fit this model; mismatched parameters: "
                      + "; ".join(bad[:8])
                      + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else "")
                      + ". Use the model config it was trained with, or a new workdir.")


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
  plan = _RestorePlan(_stored_tree(manager, step, "params"), abstract_params, what)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(plan.saved_layout(abstract_params)))).params
  return plan.to_target(restored, abstract_params)


def save_params(workdir: str, step: int, params, meta: dict[str, Any]) -> str:
  """Writes a params-only checkpoint `<workdir>/checkpoints/<step>` and `<workdir>/config.json`.

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
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(meta["config"], f, indent=2, sort_keys=True)
  return directory


def read_config(workdir: str, setting: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved as `<workdir>/config.json`.

  Raises:
    ConfigError: naming `setting` (the flag or key that gave `workdir`) when there is none.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{setting}: {workdir!r} has no config.json, so it is not a gptjax run. "
                      "Point it at a directory scripts/train.py wrote.")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


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
  old_seq, old_batch = t["seq_len"] or saved["model"]["ctx"], t["global_batch"]
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
    why = ("its data position was saved by Grain worker processes (data.worker_count > 0) and "
           "cannot be moved to another micro-batch")
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

  def config(self, step: int) -> tuple[dict[str, Any] | None, str]:
    """(the config the checkpoint was trained with, where it came from)."""
    meta = self.meta(step)
    if "config" in meta:
      return meta["config"], "checkpoint meta"
    workdir_config = os.path.join(os.path.dirname(self.directory), "config.json")
    if os.path.exists(workdir_config):  # older checkpoints: the workdir's latest config
      with open(workdir_config, encoding="utf-8") as f:
        return json.load(f), workdir_config
    return None, ""

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
