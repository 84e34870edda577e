"""Reads a W&B offline run file (`run-<id>.wandb`) without W&B's client: a LevelDB-style log of
32 KiB blocks (after a 7-byte header) whose records are W&B's `Record` protobufs."""

import json

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


def records(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B", path
  pos, parts = HEADER, b""
  while pos + HEADER <= len(data):
    left = BLOCK - pos % BLOCK
    if left < HEADER:  # a block's tail too short for a header is padding
      pos += left
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
    if kind == 0:
      pos += left
      continue
    parts += data[pos + HEADER:pos + HEADER + length]
    pos += HEADER + length
    if kind in (FULL, LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(parts)
      parts = b""
      yield record


def read(path):
  """(run record, config dict, {step: {key: value}}) of an offline run file."""
  run, config, history = None, {}, {}
  for r in records(path):
    kind = r.WhichOneof("record_type")
    if kind == "run":
      run = r.run
      for item in r.run.config.update:
        config[item.key] = json.loads(item.value_json)
    elif kind == "config":
      for item in r.config.update:
        config[item.key] = json.loads(item.value_json)
    elif kind == "history":
      row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      history[r.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
  return run, config, history
