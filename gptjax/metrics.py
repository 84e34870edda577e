"""Where metrics go: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import os
from typing import Any

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard files in `<workdir>/tb/`."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a", encoding="utf-8") if self.enabled else None
    self._tb = SummaryWriter(os.path.join(workdir, "tb")) if self.enabled else None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records `metrics` (numbers, or None for not applicable) at optimizer step `step`."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def _plain(v: Any) -> Any:
  if v is None or isinstance(v, (str, bool)):
    return v
  return float(v) if not isinstance(v, int) else v


def read(workdir: str) -> list[dict[str, Any]]:
  """All rows of a run's `metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
