"""The paper's Colored MNIST table: ERM, IRM, V-REx and Fishr x N restarts.

  python -m experiments.colored_mnist_table --output_dir runs/cmnist_table

writes runs/cmnist_table/table.md (mean ± std over restarts of the last
step's train, test and gray accuracies), curves.png (train/test accuracy over
steps per algorithm, mean ± std over restarts) and one workdir per algorithm.
--preset=paper --data=tfds gives the paper's setting on full MNIST.
"""

import os
from typing import Any, Sequence

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from configs import colored_mnist as cmnist_config
from fishr_jax import cli
from fishr_jax import train_colored_mnist
from fishr_jax import workdir as workdir_lib

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/colored_mnist_table",
                                  "Where the table, plot and runs go.")
_DATA = flags.DEFINE_enum("data", "embedded", ["embedded", "tfds", "idx"],
                          "Digit source.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "For --data=idx (or tfds).")
_PRESET = flags.DEFINE_enum("preset", "", ["", "paper"], "configs/colored_mnist.py preset.")
_RESTARTS = flags.DEFINE_integer("restarts", 10, "Restarts per algorithm.",
                                 lower_bound=1)
_ALGORITHMS = flags.DEFINE_list("algorithms", ["erm", "irm", "vrex", "fishr"],
                                "Algorithms, in table order.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps between curve points.",
                                  lower_bound=1)
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show the libraries' INFO logs (orbax, JAX).")

NAMES = {"erm": "ERM", "irm": "IRM", "vrex": "V-REx", "fishr": "Fishr"}


def markdown_table(results: dict[str, dict[str, Any]], caption: str) -> str:
  lines = [caption, "",
           "| algorithm | train acc | test acc | gray acc | wall time (s) |",
           "|---|---|---|---|---|"]
  for name, r in results.items():
    accs = " | ".join(f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}"
                      for k in ("train_acc", "test_acc", "gray_acc"))
    lines.append(f"| {NAMES.get(name, name)} | {accs} | {r['wall_time_s']:.1f} |")
  return "\n".join(lines) + "\n"


def read_curves(workdir: str, restarts: int) -> dict[str, np.ndarray]:
  """steps (S,) and per-restart train/test accuracies (R, S), from each
  restart's records."""
  runs = [workdir_lib.read_records(os.path.join(workdir, f"restart_{r}"))
          for r in range(restarts)]
  curves = {"steps": np.array([r["step"] for r in runs[0]])}
  for key in ("train_acc", "test_acc"):
    curves[key] = np.array([[r[key] for r in records] for records in runs])
  return curves


def plot_curves(curves: dict[str, dict[str, np.ndarray]], anneal: int,
                path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, key, title in zip(axes, ("train_acc", "test_acc"),
                            ("train (colors correlate)", "test (colors flipped)")):
    for name, c in curves.items():
      mean, std = c[key].mean(0), c[key].std(0)
      ax.plot(c["steps"], mean, label=NAMES.get(name, name))
      ax.fill_between(c["steps"], mean - std, mean + std, alpha=0.2)
    ax.axvline(anneal, color="gray", ls="--", lw=1)
    ax.set(title=f"Colored MNIST {title}", xlabel="step", ylim=(0, 1))
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("accuracy (mean ± std over restarts)")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  cli.set_library_logs(_VERBOSE.value)
  del argv
  results, curves = {}, {}
  config = None
  for name in _ALGORITHMS.value:
    config = cmnist_config.get_config(_PRESET.value)
    config.algorithm = name
    config.restarts = _RESTARTS.value
    config.log_every = _LOG_EVERY.value
    config.checkpoint_every = config.steps - 1  # resume is not needed here
    config.data.source = _DATA.value
    config.data.data_dir = _DATA_DIR.value
    workdir = os.path.join(_OUTPUT_DIR.value, name)
    results[name] = train_colored_mnist.train_and_evaluate(config, workdir)
    curves[name] = read_curves(workdir, config.restarts)

  caption = (f"Colored MNIST (IRM setup), data={_DATA.value}, "
             f"preset={_PRESET.value or 'default'} (hidden {config.hidden_dim}, "
             f"anneal {config.penalty_anneal_iters}, {config.steps} steps), "
             f"{_RESTARTS.value} restarts; last step's accuracy, mean ± std.")
  table = markdown_table(results, caption)
  with open(os.path.join(_OUTPUT_DIR.value, "table.md"), "w") as f:
    f.write(table)
  plot_curves(curves, config.penalty_anneal_iters,
              os.path.join(_OUTPUT_DIR.value, "curves.png"))
  print(table)


if __name__ == "__main__":
  app.run(cli.reporting_main(
      main, "run the same command again to go on: finished runs are kept."),
          flags_parser=cli.parse_flags)
