"""DomainBed's results tables from a folder of run folders.

  python -m experiments.collect_results --input_dir runs/sweep [--latex] \
      [--output_dir DIR] [--include_unfinished]

Prints what DomainBed's `python -m domainbed.scripts.collect_results` prints
(text tables, or a LaTeX document with --latex), for the three model
selection methods, and writes into --output_dir (default: --input_dir):
  results.txt   the text tables, as printed without --latex
  results.tex   the LaTeX document, as printed with --latex (always written)
  results.md    the same tables in markdown
  <dataset>_<method>.png   per dataset and selection method, mean test
                accuracy per algorithm, grouped by test env, with standard
                error bars; methods that select nothing get no chart.
  colored_mnist.md   for Colored MNIST (IRM setup) runs: per algorithm, the
                last step's train / test / gray accuracy, mean ± std over runs.
Every run folder at or below --input_dir is read; only finished runs (with
a `done` file) unless --include_unfinished.
"""

import os
import re
import sys
from typing import Sequence

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from fishr_jax import cli
from fishr_jax import model_selection

_INPUT_DIR = flags.DEFINE_string("input_dir", None, "Folder of run folders.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "",
                                  "Where the tables and charts go; default --input_dir.")
_LATEX = flags.DEFINE_bool("latex", False, "Print the LaTeX document instead of text tables.")
_INCLUDE_UNFINISHED = flags.DEFINE_bool(
    "include_unfinished", False,
    "Also read runs without `done` (DomainBed's load_records does).")


def plot_table(table: model_selection.Table, method_name: str, path: str) -> bool:
  """Bar chart of a dataset table: groups = test envs, one bar per algorithm
  with a standard-error bar; missing cells have no bar. False if empty."""
  env_labels = table.col_labels[1:-1]
  has_value = [[m is not None for m in row[:-1]] for row in table.means]
  if not any(map(any, has_value)):
    return False
  n_algs = len(table.row_labels)
  width = 0.8 / n_algs
  fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(env_labels) * max(1, n_algs / 2)), 4))
  for i, (label, means, errs) in enumerate(
      zip(table.row_labels, table.means, table.errs)):
    xs = [j for j, m in enumerate(means[:-1]) if m is not None]
    if not xs:
      continue
    ax.bar(np.array(xs) - 0.4 + (i + 0.5) * width, [means[j] for j in xs], width,
           yerr=[errs[j] for j in xs], capsize=3, label=label)
  ax.set_xticks(range(len(env_labels)), env_labels)
  ax.set(xlabel="test env", ylabel="test accuracy (%), mean ± s.e.", ylim=(0, 100))
  ax.set_title(f"{table.dataset}: {method_name}", fontsize="medium")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def _file_name(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def collect(input_dir: str, output_dir: str = "", latex: bool = False,
            include_unfinished: bool = False) -> tuple[str, list[str]]:
  """Reads the records, writes the files; returns (what to print, files written)."""
  everything = model_selection.load_records(input_dir, include_unfinished)
  output_dir = output_dir or input_dir
  os.makedirs(output_dir, exist_ok=True)
  written = []
  colored = model_selection.colored_mnist_table(everything)
  if colored:
    path = os.path.join(output_dir, "colored_mnist.md")
    colored = ("Colored MNIST (IRM setup): last step of each run, mean ± std "
               "over runs\n\n" + colored)
    with open(path, "w") as f:
      f.write(colored)
    written.append(path)
  records = [r for r in everything if not model_selection.is_colored_mnist(r)]
  if not records:
    return colored, written
  text = model_selection.format_report(records, latex=False)
  tex = model_selection.format_report(records, latex=True)
  for name, content in (("results.txt", text), ("results.tex", tex),
                        ("results.md", model_selection.markdown_report(records))):
    path = os.path.join(output_dir, name)
    with open(path, "w") as f:
      f.write(content)
    written.append(path)
  for method in model_selection.SELECTION_METHODS:
    for table in model_selection.results_tables(records, method):
      if table.dataset is None:
        continue
      path = os.path.join(output_dir, _file_name(f"{table.dataset}_{method.key}.png"))
      if plot_table(table, method.name, path):
        written.append(path)
  out = tex if latex else text
  return (colored + "\n" + out if colored else out), written


def _has_missing_cells(text: str) -> bool:
  return re.search(r"(^|  |& )X( |$)", text, re.MULTILINE) is not None


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    out, written = collect(_INPUT_DIR.value, _OUTPUT_DIR.value, _LATEX.value,
                           _INCLUDE_UNFINISHED.value)
  except model_selection.RecordsError as e:
    sys.exit(f"collect_results: {e}")
  # stdout carries only DomainBed's output, so its parsers keep working.
  sys.stdout.write(out)
  print("Wrote " + ", ".join(written), file=sys.stderr)
  if _has_missing_cells(out):
    print("X: no run was selected for that cell. A column is one test "
          "environment and fills only with runs that held it out (a run "
          "covers the columns of its test_envs); Avg needs every column. "
          "Train the other test environments (experiments/sweep.py launch "
          "--single_test_envs) to fill them.", file=sys.stderr)


if __name__ == "__main__":
  flags.mark_flag_as_required("input_dir")
  app.run(cli.reporting_main(
      main, "nothing was written; run the same command again."),
      flags_parser=cli.parse_flags)
