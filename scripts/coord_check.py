"""The µP coordinate check of a config's model: activation sizes across widths, SP against µP.

  python scripts/coord_check.py --config=configs/tiny.py --widths=64,128,256,512 \\
      --config.model.n_layers=2 --config.model.vocab_size=512 --config.optim.peak_lr=1e-2 \\
      --out=docs/coord_check.png

Trains the model at each width for --steps Adam steps on one fixed batch of random tokens, under
the standard parametrization and under µP with the narrowest width as the base, prints the widest
over narrowest ratio of every layer's mean |output| after the last step, and plots every step
(gptjax/coord_check.py). Under µP the ratios stay near 1; under SP they grow with the width.
"""

from absl import flags
from ml_collections import config_flags

from gptjax import cli, coord_check

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config, e.g. configs/tiny.py.")
_WIDTHS = flags.DEFINE_list("widths", ["64", "128", "256", "512"], "d_model values, narrowest "
                            "first (the µP base).")
_STEPS = flags.DEFINE_integer("steps", 5, "Adam steps.")
_OUT = flags.DEFINE_string("out", "coord_check.png", "The plot.")


def main(argv):
  del argv
  widths = [int(w) for w in _WIDTHS.value]
  results = {}
  for kind, name in (("sp", "SP"), ("mup", "µP")):
    c = _CONFIG.value.copy_and_resolve_references()
    c.unlock()
    c.model.update(d_model=widths[0], parametrization=kind,
                   mup_base_width=widths[0] if kind == "mup" else 0)
    results[name] = data = coord_check.run(c, widths, steps=_STEPS.value)
    ratios = {layer: data[widths[-1]][layer][-1] / data[widths[0]][layer][-1]
              for layer in data[widths[0]]}
    print(f"{name}: width {widths[-1]} / {widths[0]} after {_STEPS.value} steps: "
          + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
  print(f"wrote {coord_check.plot(results, _OUT.value)}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(main)
