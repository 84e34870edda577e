"""Bad settings fail early with a message naming the setting and the fix."""

import pytest

import configs
from gptjax import config as config_lib
from gptjax.config import ConfigError


def tiny():
  return configs.load("tiny")


@pytest.mark.parametrize("edit, message", [
    (lambda c: setattr(c.model, "n_heads", 5),
     r"model\.n_heads: 5 heads do not divide d_model=256"),
    (lambda c: setattr(c.model, "remat", "sometimes"), r"model\.remat: unknown remat policy"),
    (lambda c: setattr(c.model, "norm", "middle"), r"model\.norm"),
    (lambda c: setattr(c.model, "attention", "sparse"), r"model\.attention"),
    (lambda c: setattr(c.model, "n_layers", 3) or setattr(c.model, "attention", "alternating"),
     r"model\.n_layers: 3 layers cannot alternate"),
    (lambda c: setattr(c.train, "seq_len", 512),
     r"train\.seq_len: 512 exceeds the model context 256"),
    (lambda c: setattr(c.optim, "peak_lr", 0.0), r"optim\.peak_lr: must be > 0"),
    (lambda c: setattr(c.train, "micro_batch", 5), r"train\.micro_batch: 5 does not divide"),
    (lambda c: setattr(c.mesh.rules, "embed", "fsdp,pipeline"),
     r"mesh\.rules\.embed: names unknown"),
    (lambda c: setattr(c.mesh, "data", 3),
     r"mesh: data x fsdp x tensor = 3 x 1 x 1 = 3, but there are 8"),
    (lambda c: setattr(c.mesh, "tensor", 8) or setattr(c.mesh, "data", 1),
     r"mesh\.tensor: tensor parallelism of 8 does not divide n_heads=4"),
    (lambda c: setattr(c.train, "global_batch", 12), r"train\.micro_batch: .* 12 sequences .* 8"),
])
def test_bad_settings_raise_clear_errors(edit, message):
  cfg = tiny()
  edit(cfg)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(cfg, n_devices=8)


def test_unknown_and_mistyped_keys_are_rejected_by_the_locked_config():
  cfg = tiny()
  with pytest.raises(AttributeError, match="peak_lrr"):
    cfg.optim.peak_lrr = 1e-3
  with pytest.raises(TypeError):
    cfg.model.n_layers = "four"


def test_mesh_minus_one_takes_the_rest():
  cfg = tiny()
  cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2
  assert config_lib.mesh_shape(cfg.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  config_lib.validate(cfg, n_devices=8)
