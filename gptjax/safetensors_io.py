"""Safetensors files read and written one tensor at a time, for models larger than host RAM.

    state_dict = SafetensorsDir("hf/x")        # name -> LazyTensor, read when converted to numpy
    with SafetensorsWriter("out/model.safetensors", {"w": ((2, 3), np.float32)}) as writer:
      writer.write("w", np.zeros((2, 3), np.float32))

The format only: which tensors a model has, and under what names, is the caller's (`gptjax.hf`).
Reading needs the `safetensors` package and torch (which reads bfloat16; numpy cannot), both
imported only when a file is opened; writing needs neither. `to_numpy` turns what the reader
yields (or any torch, jax or numpy array) into float32 numpy.
"""

import glob
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["to_numpy", "LazyTensor", "SafetensorsDir", "SafetensorsWriter"]


def to_numpy(x) -> np.ndarray:
  """A torch tensor, jax array or numpy array as float32 numpy."""
  if hasattr(x, "detach"):  # torch; bfloat16 has no numpy dtype
    x = x.detach().cpu()
    x = x.float() if x.is_floating_point() else x
    x = x.numpy()
  return np.asarray(x, dtype=np.float32)


class LazyTensor:
  """One tensor of a safetensors file, read only when converted to numpy."""

  def __init__(self, path: str, name: str):
    self.path, self.name = path, name

  def __array__(self, dtype=None, copy=None):
    del copy
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(self.path, framework="pt") as f:  # torch reads bfloat16; numpy cannot
      x = to_numpy(f.get_tensor(self.name))
    return x if dtype is None else x.astype(dtype, copy=False)


class SafetensorsDir(Mapping):
  """The state dict of a folder's `*.safetensors` files, each tensor read when it is used."""

  def __init__(self, directory: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._where = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
      with safe_open(path, framework="pt") as f:
        self._where |= {name: path for name in f.keys()}

  def __getitem__(self, name: str) -> LazyTensor:
    return LazyTensor(self._where[name], name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}


class SafetensorsWriter:
  """Writes a `.safetensors` file one tensor at a time.

  The `safetensors` package serialises a dict of tensors held in memory at once; this writes the
  same format incrementally: an 8-byte little-endian header length, the JSON header (dtype, shape
  and byte range of every tensor, padded with spaces to 8 bytes), then the tensors' bytes. Every
  shape is known up front, so each tensor is written at its place as soon as it is ready.
  """

  def __init__(self, path: str, specs: Mapping[str, tuple[tuple[int, ...], Any]]):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    self._specs = {}
    for name, (shape, dtype) in specs.items():
      dtype = np.dtype(dtype)
      size = math.prod(shape) * dtype.itemsize
      header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                      "data_offsets": [offset, offset + size]}
      self._specs[name] = (tuple(shape), dtype, offset)
      offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    self._start = 8 + len(raw)
    self._file = open(path, "wb")  # pylint: disable=consider-using-with
    self._file.write(struct.pack("<Q", len(raw)) + raw)
    self._file.truncate(self._start + offset)
    self._pending = set(self._specs)

  def write(self, name: str, x: np.ndarray) -> None:
    shape, dtype, offset = self._specs[name]
    if x.shape != shape or x.dtype != dtype:
      raise ValueError(f"{name}: got {x.shape} {x.dtype}, the header says {shape} {dtype}")
    self._file.seek(self._start + offset)
    self._file.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
    self._pending.discard(name)

  def __enter__(self) -> "SafetensorsWriter":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    self._file.close()
    if exc_type is None and self._pending:
      raise ValueError(f"tensors never written: {sorted(self._pending)[:8]}")
