"""Does Fishr align the domains' loss landscapes? The Fishr paper's Hessian
figure on Colored MNIST, for ERM, IRM, V-REx and Fishr.

  python -m experiments.landscape --output_dir runs/landscape --restarts 3

trains Colored MNIST in the authors' setting for this figure (configs/
colored_mnist.py:paper: hidden 390, the IRM script's lr, L2 and penalty
weight, the penalty from step 190, 501 steps) with the landscape
diagnostics every --every steps (fishr_jax/landscape.py: the two training
domains' Hessian diagonals and gradient variances, of the classifier head
and of the whole network), and writes to --output_dir:

  landscape_head.png, landscape_all.png  the gradient-variance distance and
      the Hessian distance between the two training domains over the steps
      (mean and min-max band over restarts, log scale, the anneal step
      dashed), for the head and for the whole network;
  landscape_cosine.png  their cosine similarities;
  landscape.json  every curve: {algorithm: {"step": [...],
      "<part>/<quantity>_<statistic>": [mean over restarts], ..._std: [...],
      "test_acc": [...], ...}};
  landscape.md  the values at steps 0, 190, 300 and 500;
  <algorithm>/restart_<r>/  the runs (their records hold every diagnostic).

Embedded digits by default; full MNIST with --data.source=idx
--data.data_dir=DIR (or tfds). Runs already in --output_dir are read, not
trained again.

  python -m experiments.landscape --domainbed_runs DIR --output_dir OUT

instead plots DomainBed runs' records (any run folders under DIR trained
with --config.diagnostics_every): each algorithm's distances between its
training domains over the steps, OUT/landscape_domainbed.png.
"""

import json
import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from configs import colored_mnist as cmnist_config
from fishr_jax import cli
from fishr_jax import landscape
from fishr_jax import train_colored_mnist
from fishr_jax import workdir as workdir_lib
from fishr_jax.data import colored_mnist as colored_mnist_data
from fishr_jax.data import mnist

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/landscape",
                                  "Where the plots, JSON, table and runs go.")
_RESTARTS = flags.DEFINE_integer("restarts", 3, "Restarts per algorithm.",
                                 lower_bound=1)
_ALGORITHMS = flags.DEFINE_list("algorithms", ["erm", "irm", "vrex", "fishr"],
                                "Algorithms, in plot order.")
_EVERY = flags.DEFINE_integer("every", 10,
                              "Steps between two measurements (records).",
                              lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 501, "Steps per run (the paper's 501).",
                              lower_bound=2)
_SOURCE = flags.DEFINE_enum("data.source", "embedded",
                            ["embedded", "tfds", "idx"], "Digit source.")
_DATA_DIR = flags.DEFINE_string("data.data_dir", "",
                                "For --data.source=idx (or tfds).")
_DOMAINBED_RUNS = flags.DEFINE_string(
    "domainbed_runs", "", "Plot these DomainBed run folders' diagnostics "
    "instead of training Colored MNIST.")
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show the libraries' INFO logs (orbax, JAX).")

NAMES = {"erm": "ERM", "irm": "IRM", "vrex": "V-REx", "fishr": "Fishr"}
PREFIX = "landscape/"
TABLE_STEPS = (0, 190, 300, 500)
ACCURACIES = ("train_acc", "test_acc", "gray_acc")


def config_for(algorithm: str) -> Any:
  config = cmnist_config.get_config("paper")
  config.update(algorithm=algorithm, restarts=_RESTARTS.value,
                steps=_STEPS.value,
                log_every=_EVERY.value, diagnostics_every=_EVERY.value,
                diagnostics_layers="all")
  # One checkpoint at the end: a killed experiment restarts its runs.
  config.checkpoint_every = _EVERY.value * ((config.steps - 1) // _EVERY.value)
  config.data.update(source=_SOURCE.value, data_dir=_DATA_DIR.value)
  return config


def curves_of(runs: list[list[dict[str, Any]]]) -> dict[str, list[float]]:
  """The runs' records (same steps) -> {"step", each diagnostic and
  accuracy's mean over the runs, and its "_std", "_min", "_max"}."""
  measured = [r for r in runs[0] if any(k.startswith(PREFIX) for k in r)]
  steps = [r["step"] for r in measured]
  by_step = [{r["step"]: r for r in records} for records in runs]
  keys = [k for k in measured[0]
          if k.startswith(PREFIX) or k in ACCURACIES]
  curves: dict[str, list[float]] = {"step": steps}
  for key in keys:
    values = np.array([[run[s][key] for s in steps] for run in by_step])
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    curves[name] = values.mean(0).tolist()
    for stat in ("std", "min", "max"):
      curves[f"{name}_{stat}"] = getattr(values, stat)(0).tolist()
  return curves


def plot_panels(curves: dict[str, dict[str, list[float]]],
                panels: Sequence[tuple[str, str]], anneal: int | None,
                title: str, path: str, log: bool = True) -> None:
  """One panel per (curve key, label): each algorithm's mean over runs and
  its min-max band."""
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
  for ax, (key, label) in zip(np.atleast_1d(axes), panels):
    for name, c in curves.items():
      if key not in c:
        continue
      line, = ax.plot(c["step"], c[key], label=NAMES.get(name, name))
      ax.fill_between(c["step"], c[f"{key}_min"], c[f"{key}_max"],
                      color=line.get_color(), alpha=0.2)
    if anneal is not None:
      ax.axvline(anneal, color="gray", ls="--", lw=1)
    ax.set(title=label, xlabel="step")
    if log:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown_table(curves: dict[str, dict[str, list[float]]],
                   runs: dict[str, list[list[dict[str, Any]]]],
                   caption: str) -> str:
  """The head's and the network's distances at TABLE_STEPS, mean ± std."""
  columns = [("head/hessian_distance", "Hessian dist. (head)"),
             ("head/fishr_distance", "variance dist. (head)"),
             ("all/hessian_distance", "Hessian dist. (all)"),
             ("all/fishr_distance", "variance dist. (all)")]
  lines = [caption, "",
           "| algorithm | step | " + " | ".join(c for _, c in columns)
           + " | test acc |",
           "|---|---|" + "---|" * (len(columns) + 1)]
  for name, c in curves.items():
    for step in TABLE_STEPS:
      if step not in c["step"]:
        continue
      i = c["step"].index(step)
      cells = [f"{c[k][i]:.3g} ± {c[f'{k}_std'][i]:.2g}" for k, _ in columns]
      accs = [next(r for r in records if r["step"] == step)["test_acc"]
              for records in runs[name]]
      lines.append(f"| {NAMES.get(name, name)} | {step} | "
                   + " | ".join(cells)
                   + f" | {np.mean(accs):.3f} ± {np.std(accs):.3f} |")
  return "\n".join(lines) + "\n"


def diagnostics_cost(config: Any, runs: list[list[dict[str, Any]]],
                     repeats: int = 5) -> dict[str, float]:
  """Seconds of one measurement (head; head and all layers) on the
  config's training environments, against the runs' median update time
  (their records' step_time)."""
  pools = mnist.load_digit_pools(config.data.source, config.data.data_dir)
  envs = colored_mnist_data.make_environments(
      pools, config.data, np.random.default_rng([config.seed, 0]))
  model = train_colored_mnist.make_model(config)
  params = model.init(jax.random.key(config.seed),
                      envs.train["x"][:1])["params"]
  batch = jax.device_put(envs.train)
  step_times = [r["step_time"] for records in runs for r in records[1:]]
  cost = {"examples": len(envs.train["y"]),
          "train_step_s": float(np.median(step_times))}
  for layers in landscape.LAYERS:
    measure = landscape.recorder(
        lambda p, x: model.apply({"params": p}, x),
        len(config.data.train_color_flip_probs), layers)
    measure(params, batch)  # compiles
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      measure(params, batch)
      times.append(time.perf_counter() - start)
    cost[f"{layers}_s"] = float(np.median(times))
  return cost


def colored_mnist(output_dir: str) -> None:
  runs, curves, config = {}, {}, None
  for name in _ALGORITHMS.value:
    config = config_for(name)
    workdir = os.path.join(output_dir, name)
    train_colored_mnist.train_and_evaluate(config, workdir)
    runs[name] = [workdir_lib.read_records(
        train_colored_mnist.restart_folder(workdir, r))
                  for r in range(config.restarts)]
    curves[name] = curves_of(runs[name])
  anneal = config.penalty_anneal_iters
  setting = (f"Colored MNIST (data.source={config.data.source}), hidden "
             f"{config.hidden_dim}, penalty from step {anneal}, "
             f"{config.steps} steps, {config.restarts} restarts")
  for part, label in (("head", "classifier head"), ("all", "whole network")):
    plot_panels(curves, [(f"{part}/fishr_distance",
                          "gradient variances: ||v_0 - v_1||^2"),
                         (f"{part}/hessian_distance",
                          "Hessian diagonals: ||h_0 - h_1||^2")],
                anneal, f"{setting}\nbetween the two training domains, "
                f"{label}",
                os.path.join(output_dir, f"landscape_{part}.png"))
  plot_panels(curves, [(f"{part}/{q}_cosine", f"{label}, {part}")
                       for part in ("head", "all")
                       for q, label in (("fishr", "variance cosine"),
                                        ("hessian", "Hessian cosine"))],
              anneal, f"{setting}\ncosine similarity of the two training "
              "domains",
              os.path.join(output_dir, "landscape_cosine.png"), log=False)
  cost = diagnostics_cost(config, runs[_ALGORITHMS.value[-1]])
  with open(os.path.join(output_dir, "landscape.json"), "w") as f:
    json.dump({**curves, "cost": cost}, f)
  table = markdown_table(
      curves, runs, f"{setting}; between the two training domains, mean ± "
      "std over restarts.")
  table += (f"\nOne measurement on the {cost['examples']} training "
            f"examples takes {cost['head_s'] * 1e3:.0f} ms for the head, "
            f"{cost['all_s'] * 1e3:.0f} ms for the head and all layers; one "
            f"update of the {config.restarts} restarts trained together "
            f"{cost['train_step_s'] * 1e3:.0f} ms (the median step_time of "
            "the last algorithm's records).\n")
  with open(os.path.join(output_dir, "landscape.md"), "w") as f:
    f.write(table)
  print(table)


def domainbed(runs_dir: str, output_dir: str) -> None:
  """Each algorithm's runs under `runs_dir` (any folders with records that
  hold diagnostics), one curve per algorithm (mean and band over its runs,
  on the steps they share)."""
  by_algorithm: dict[str, list[list[dict[str, Any]]]] = {}
  for folder, _, files in sorted(os.walk(runs_dir)):
    if workdir_lib.RECORDS not in files:
      continue
    records = workdir_lib.read_records(folder)
    if records and any(k.startswith(PREFIX) for k in records[-1]):
      algorithm = records[-1].get("args", {}).get("algorithm", "?")
      by_algorithm.setdefault(algorithm, []).append(records)
  if not by_algorithm:
    raise app.UsageError(f"No run under {runs_dir} has landscape diagnostics "
                         "in its records (train with "
                         "--config.diagnostics_every).")
  curves = {}
  for name, runs in by_algorithm.items():
    shortest = min(len(r) for r in runs)
    curves[name] = curves_of([r[:shortest] for r in runs])
  parts = [p for p in ("head", "all") if any(
      f"{p}/hessian_distance" in c for c in curves.values())]
  plot_panels(curves, [(f"{p}/{q}_distance", f"{label} ({p})")
                       for p in parts
                       for q, label in (("fishr", "variance distance"),
                                        ("hessian", "Hessian distance"))],
              None, "DomainBed runs: mean distance between training domains",
              os.path.join(output_dir, "landscape_domainbed.png"))
  with open(os.path.join(output_dir, "landscape_domainbed.json"), "w") as f:
    json.dump(curves, f)
  print(f"Wrote {output_dir}/landscape_domainbed.png from "
        + ", ".join(f"{len(r)} {n} run(s)" for n, r in by_algorithm.items()))


def main(argv: Sequence[str]) -> None:
  del argv
  cli.set_library_logs(_VERBOSE.value)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  if _DOMAINBED_RUNS.value:
    domainbed(_DOMAINBED_RUNS.value, _OUTPUT_DIR.value)
  else:
    colored_mnist(_OUTPUT_DIR.value)


if __name__ == "__main__":
  app.run(cli.reporting_main(
      main, "run the same command again to go on: finished runs are kept."),
          flags_parser=cli.parse_flags)
