"""Run directories at s3:// URLs, against a real S3-compatible server (moto in server mode) on
localhost: what reaches the store and in which state, what a fresh machine pulls back, clear errors
for a store that cannot be reached, and a train, kill, resume and evaluate cycle."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import boto3
import numpy as np
import pytest

from gptjax import metrics, storage
from gptjax.errors import ConfigError

pytest.importorskip("s3fs", reason="the cloud extra (s3fs) is part of the dev install")

BUCKET = "runs"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
  """An S3-compatible server on localhost, with the bucket `runs`; its endpoint as env vars."""
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), 0.2).close()
      break
    except OSError:
      assert time.time() < deadline and proc.poll() is None, "moto server did not start"
      time.sleep(0.1)
  with pytest.MonkeyPatch.context() as mp:
    for k, v in env.items():
      mp.setenv(k, v)
    client().create_bucket(Bucket=BUCKET)
    yield env
  proc.terminate()
  proc.wait(timeout=30)


def client():
  return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def objects(prefix: str) -> dict[str, bytes]:
  """The store's objects under `prefix` (read with boto3, not through gptjax's path layer)."""
  c, out = client(), {}
  for page in c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
    for o in page.get("Contents", []):
      out[o["Key"][len(prefix) + 1:]] = c.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
  return out


@pytest.fixture
def env(server, tmp_path, monkeypatch):
  monkeypatch.setenv("GPTJAX_MIRROR", str(tmp_path / "mirror"))
  return server


def write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def test_push_uploads_committed_checkpoints_with_their_marker_last_file_and_deletes_old(env,
                                                                                        tmp_path):
  url = f"s3://{BUCKET}/push"
  m = storage.Mirror(url)
  m.pull()  # a new run: nothing in the store yet
  write(os.path.join(m.local, "config.json"), b'{"a": 1}')
  write(os.path.join(m.local, "checkpoints", "3", "params", "x"), b"three")
  write(os.path.join(m.local, "checkpoints", "6.orbax-checkpoint-tmp-1", "params", "x"), b"half")
  write(os.path.join(m.local, "metrics.jsonl.tmp-1-ab"), b"half")
  m.push()
  assert objects("push") == {"config.json": b'{"a": 1}', "checkpoints/3/params/x": b"three",
                             f"checkpoints/3/{storage.MARKER}": b"complete\n"}

  os.rename(os.path.join(m.local, "checkpoints", "6.orbax-checkpoint-tmp-1"),
            os.path.join(m.local, "checkpoints", "6"))  # Orbax commits step 6 ...
  os.rename(os.path.join(m.local, "checkpoints", "3"),
            os.path.join(tmp_path, "gone"))  # ... and its keep policy drops step 3
  write(os.path.join(m.local, "config.json"), b'{"a": 2}')
  m.push()
  assert objects("push") == {"config.json": b'{"a": 2}', "checkpoints/6/params/x": b"half",
                             f"checkpoints/6/{storage.MARKER}": b"complete\n"}


def test_pull_takes_complete_checkpoints_only_and_moves_unsynced_work_aside(env, tmp_path,
                                                                           capsys):
  c = client()
  for key, body in {"m/config.json": b"{}", "m/metrics.jsonl": b'{"step": 1}\n',
                    "m/checkpoints/2/params/x": b"two", f"m/checkpoints/2/{storage.MARKER}": b"",
                    "m/checkpoints/4/params/x": b"four (its upload was cut short)"}.items():
    c.put_object(Bucket=BUCKET, Key=key, Body=body)
  url = f"s3://{BUCKET}/m"
  m = storage.Mirror(url)
  m.pull()
  got = {os.path.relpath(os.path.join(d, f), m.local): open(os.path.join(d, f), "rb").read()
         for d, _, fs in os.walk(m.local) for f in fs if f != storage.RECORD}
  assert got == {"config.json": b"{}", "metrics.jsonl": b'{"step": 1}\n',
                 "checkpoints/2/params/x": b"two", f"checkpoints/2/{storage.MARKER}": b""}

  write(os.path.join(m.local, "metrics.jsonl"), b'{"step": 1}\n{"step": 2}\n')  # never uploaded
  again = storage.Mirror(url)
  again.pull()
  out = capsys.readouterr().out
  assert "held 1 file(s) the store does not (e.g. metrics.jsonl" in out
  aside = [p for p in os.listdir(tmp_path / "mirror" / "s3" / BUCKET) if ".unsynced-" in p]
  assert len(aside) == 1
  assert open(tmp_path / "mirror" / "s3" / BUCKET / aside[0] / "metrics.jsonl", "rb").read() == (
      b'{"step": 1}\n{"step": 2}\n')
  assert open(os.path.join(m.local, "metrics.jsonl"), "rb").read() == b'{"step": 1}\n'


def test_an_unreachable_store_is_an_error_naming_the_url_and_the_cause(server, monkeypatch):
  with pytest.raises(ConfigError, match=r"--workdir=s3://nobucket/run: the bucket 'nobucket' "
                                        "does not exist"):
    storage.Mirror("s3://nobucket/run")
  monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens
  with pytest.raises(ConfigError, match=r"--workdir=s3://runs/x: cannot reach the store "
                                        r"\(EndpointConnectionError: .*127\.0\.0\.1"):
    storage.Mirror("s3://runs/x")


def test_a_multi_process_run_refuses_a_url_workdir():
  with pytest.raises(ConfigError, match="needs a directory every process writes"):
    storage.check_single_process("gs://b/run", 2)
  storage.check_single_process("gs://b/run", 1)


@pytest.mark.slow
def test_train_kill_resume_and_evaluate_on_s3(env, tmp_path, monkeypatch):
  """A run on s3:// killed three steps after its checkpoint at 4 reached the store, and resumed,
  logs the losses and ends with the train state of an uninterrupted local run, bit for bit;
  evaluating the s3:// workdir uploads its results."""
  import test_kill_resume as k  # pylint: disable=import-outside-toplevel  (slow-test helpers)

  url, straight = f"s3://{BUCKET}/kill", str(tmp_path / "straight")
  local_run = k.start(tmp_path, straight, make="dropout_cfg")
  killed = k.start(tmp_path, url, make="dropout_cfg", hang=7)
  marker = f"kill/checkpoints/4/{storage.MARKER}"
  deadline = time.time() + 600
  while time.time() < deadline and killed.poll() is None and not client().list_objects_v2(
      Bucket=BUCKET, Prefix=marker).get("KeyCount"):
    time.sleep(0.1)
  hung = storage.local_path(url) + ".hung"
  while time.time() < deadline and killed.poll() is None and not os.path.exists(hung):
    time.sleep(0.1)
  running = killed.poll() is None
  killed.send_signal(signal.SIGKILL)
  out = killed.communicate()[0]
  assert running and os.path.exists(hung), out
  assert [n for n in objects("kill") if n.endswith(storage.MARKER)] == [marker[5:]]

  out = k.finish(k.start(tmp_path, url, make="dropout_cfg"))
  assert "resuming from the checkpoint at step 4 " in out
  k.finish(local_run)
  stored = objects("kill")
  assert {n for n in stored if n.endswith(storage.MARKER)} == {
      f"checkpoints/{s}/{storage.MARKER}" for s in (4, 8, 12)}

  monkeypatch.setenv("GPTJAX_MIRROR", str(tmp_path / "fresh"))  # another machine: store only
  fresh = storage.Mirror(url)
  fresh.pull()
  k.assert_same_run(k.dropout_cfg(tmp_path), straight, fresh.local)
  assert [r["step"] for r in metrics.read(fresh.local)][-1] == 12

  def script(*args):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout

  out = script("scripts/evaluate.py", f"--workdir={url}", "--val_docs=4")
  assert f"wrote {url}/eval/step_12.json" in out
  results = json.loads(objects("kill")["eval/step_12.json"])
  assert results["step"] == 12 and "val" in results["tasks"]
  assert "step 12" in script("scripts/inspect_checkpoint.py", f"--workdir={url}")


def test_a_cache_at_a_url_is_built_once_and_pulled_by_other_machines(env, tmp_path, monkeypatch):
  """Machine A trains the tokenizer and builds the token cache into s3://; machine B (another
  local copy) pulls both and builds nothing, and gets the same tokens as a local cache holds."""
  from test_data_cache import data_config, write_jsonl  # pylint: disable=import-outside-toplevel
  from gptjax.data import cache, sources, tokenizer as tokenizer_lib, workers  # pylint: disable=import-outside-toplevel

  write_jsonl(tmp_path / "docs.jsonl", 60)
  d = data_config(tmp_path, tmp_path / "docs.jsonl", cache_dir=f"s3://{BUCKET}/cache")
  local = data_config(tmp_path, tmp_path / "docs.jsonl")
  a = cache.load_or_build(d, tokenizer_lib.load_or_train(d, None))
  stored = objects("cache")
  manifest = [n for n in stored if n.endswith("/manifest.json")]
  assert len(manifest) == 1 and len([n for n in stored if n.startswith("tokenizers/")]) == 2
  assert json.loads(stored[manifest[0]])["splits"]["train"]["tokens"] == len(a.tokens("train"))

  monkeypatch.setenv("GPTJAX_MIRROR", str(tmp_path / "machine_b"))
  monkeypatch.setattr(tokenizer_lib, "train", lambda *a, **k: pytest.fail("trained again"))
  monkeypatch.setattr(cache, "_build_units", lambda *a, **k: pytest.fail("built again"))
  tok = tokenizer_lib.load_or_train(d, None)
  b = cache.load_or_build(d, tok)
  assert b.path.startswith(str(tmp_path / "machine_b"))
  monkeypatch.undo()
  reference = cache.load_or_build(local, tokenizer_lib.load_or_train(local, None))
  for split in (sources.TRAIN, sources.VAL):
    np.testing.assert_array_equal(b.tokens(split), reference.tokens(split))

  with pytest.raises(Exception, match=r"config.data.cache_dir: is a URL \(s3://runs/cache/"):
    workers.check_shared(d)


def test_a_tokenizer_path_at_a_url_is_downloaded(env, tmp_path):
  from test_data_cache import data_config, write_jsonl  # pylint: disable=import-outside-toplevel
  from gptjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

  write_jsonl(tmp_path / "docs.jsonl", 60)
  d = data_config(tmp_path, tmp_path / "docs.jsonl")
  trained = tokenizer_lib.load_or_train(d, None)
  trained.save(str(tmp_path / "spm.model"))
  client().upload_file(str(tmp_path / "spm.model"), BUCKET, "tok/spm.model")
  d.tokenizer.path = f"s3://{BUCKET}/tok/spm.model"
  got = tokenizer_lib.load_or_train(d, None)
  text = "the model token data cache stream"
  assert got.encode(text) == trained.encode(text) and got.fingerprint == trained.fingerprint
  d.tokenizer.path = f"s3://{BUCKET}/tok/missing.model"
  with pytest.raises(ConfigError, match="data.tokenizer.path=s3://runs/tok/missing.model: no such"):
    tokenizer_lib.load_or_train(d, None)
