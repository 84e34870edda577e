"""Where metrics go: `metrics.jsonl` (one JSON object per logged step) and the run's trackers
(TensorBoard, W&B, MLflow: gptjax/trackers.py).

Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import os
from typing import Any, Callable, Sequence

import jax

from gptjax import trackers as trackers_lib


class MetricsWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and logs their numbers to `trackers` (by default
  TensorBoard files in `<workdir>/tb/`)."""

  def __init__(self, workdir: str, enabled: bool | None = None,
               trackers: Callable[[], Sequence[trackers_lib.Tracker]] | None = None):
    """`trackers` opens the trackers (called on process 0 only)."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a", encoding="utf-8") if self.enabled else None
    opener = trackers or (lambda: [trackers_lib.TensorBoard(workdir)])
    self.trackers = list(opener()) if self.enabled else []

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records `metrics` (numbers, or None for not applicable) at optimizer step `step`."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    numbers = {k: v for k, v in row.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for tracker in self.trackers:
      tracker.log(int(step), numbers)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      for tracker in self.trackers:
        tracker.close()


def _plain(v: Any) -> Any:
  if v is None or isinstance(v, (str, bool)):
    return v
  return float(v) if not isinstance(v, int) else v


def read(workdir: str) -> list[dict[str, Any]]:
  """All rows of a run's `metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
