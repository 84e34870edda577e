"""gptjax.run: opening a run on other devices never changes its layout without saying so."""

import jax

import configs
from gptjax import run as run_lib


def test_a_mesh_that_does_not_fit_becomes_data_parallel_and_says_so(capsys):
  cfg = configs.load("tiny")
  cfg.mesh.update(data=1, fsdp=2, tensor=4)  # 8 devices; the run is opened on 2
  mesh, _ = run_lib.inference_mesh(cfg, jax.devices()[:2])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 1, 1)
  out = capsys.readouterr().out
  assert out.count("does not fit 2 device(s); using them all as the data axis") == 1
  assert "'fsdp': 2, 'tensor': 4" in out


def test_a_mesh_that_fits_is_kept_quietly(capsys):
  cfg = configs.load("tiny")
  cfg.mesh.update(data=1, fsdp=2, tensor=4)
  mesh, _ = run_lib.inference_mesh(cfg, jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
  assert "does not fit" not in capsys.readouterr().out
