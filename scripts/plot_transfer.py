"""Learning-rate transfer of a µP sweep: the best learning rate per width, SP against µP.

  python scripts/sweep.py --config=configs/sweeps/mup_transfer.py:cpu --workdir=runs/mup
  python scripts/plot_transfer.py --sweep_dir=runs/mup

Prints the table (best peak LR and its loss per parametrization and width, and how many grid steps
the best LR drifts across widths) and writes `transfer.md` and `transfer.png` into --out (default:
the sweep folder).
"""

from absl import flags

from gptjax import cli, lr_transfer

_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "The sweep's folder.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder (default: the sweep folder).")


def main(argv):
  del argv
  table, png = lr_transfer.write(_SWEEP_DIR.value, _OUT.value)
  with open(table, encoding="utf-8") as f:
    print(f.read(), end="")
  print(f"wrote {table} and {png}")


if __name__ == "__main__":
  cli.run(main)
