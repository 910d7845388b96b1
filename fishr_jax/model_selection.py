"""DomainBed's model selection and results tables, over run records.

A sweep is a folder of run folders; each run folder holds `results.jsonl`, one
JSON record per checkpoint, and, once the run finished, a file named `done`.
A record has DomainBed's format (DomainBed's train.py and fishr-jax write the
same keys):

  {"args": {"dataset": str, "algorithm": str, "test_envs": [int, ...],
            "hparams_seed": int, "trial_seed": int, ...},
   "hparams": {...}, "step": int, "epoch": float,
   "env0_in_acc": float, "env0_out_acc": float, "env1_in_acc": ..., ...,
   "loss": float, "step_time": float, "mem_gb": float}

Only "args" (those five keys), "step" and the envK_{in,out}_acc keys are read.

The selection semantics follow DomainBed (domainbed/model_selection.py,
domainbed/lib/reporting.py, domainbed/scripts/collect_results.py), ties
included: within a run the first checkpoint (file order) with the best
validation accuracy wins, and across hyperparameter seeds the highest seed
among the best. Everything here is a pure function of the records, except
`load_records`, which reads them.
"""

import dataclasses
import itertools
import math
import os
import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from fishr_jax import errors
from fishr_jax import workdir
from fishr_jax.data import domainbed

Record = dict[str, Any]
# (trial_seed, dataset, algorithm, test_env), DomainBed's grouping.
GroupKey = tuple[Any, str, str, int]

# DomainBed's row order (domainbed/algorithms.py ALGORITHMS); other algorithms
# follow, sorted by name.
ALGORITHMS = (
    "ERM", "Fish", "IRM", "GroupDRO", "Mixup", "MLDG", "CORAL", "MMD", "DANN",
    "CDANN", "MTL", "SagNet", "ARM", "VREx", "RSC", "SD", "ANDMask",
    "SANDMask", "IGA", "SelfReg", "Fishr", "TRM", "IB_ERM", "IB_IRM", "CAD",
    "CondCAD", "Transfer", "CausIRL_CORAL", "CausIRL_MMD", "EQRM")

# DomainBed's datasets that fishr-jax does not build, with their ENVIRONMENTS
# (domainbed/datasets.py): DomainBed's own records get its column labels. Its
# table order puts its debug datasets before those of domainbed.DATASETS and
# the others after them.
_DOMAINBED_DEBUG_DATASETS = {"Debug28": ("0", "1", "2"),
                             "Debug224": ("0", "1", "2")}
_SPAWRIOUS_ENVS = ("Test", "SC_group_1", "SC_group_2")
_DOMAINBED_LATER_DATASETS = {
    "SVIRO": ("aclass", "escape", "hilux", "i3", "lexus", "tesla", "tiguan",
              "tucson", "x5", "zoe"),
    "WILDSCamelyon": tuple(f"hospital_{i}" for i in range(5)),
    "WILDSFMoW": tuple(f"region_{i}" for i in range(6)),
    **{f"Spawrious{kind}_{level}": _SPAWRIOUS_ENVS
       for kind in ("O2O", "M2M") for level in ("easy", "medium", "hard")},
}


def dataset_environments() -> dict[str, tuple[str, ...]]:
  """The column labels of every dataset the tables know, in table order:
  DomainBed's debug datasets, domainbed.DATASETS in its order (a dataset
  added there comes after DomainNet), DomainBed's later datasets. Other
  datasets follow them, sorted by name, with columns env0, env1, ..."""
  return {**_DOMAINBED_DEBUG_DATASETS,
          **{name: spec.environments
             for name, spec in domainbed.DATASETS.items()},
          **_DOMAINBED_LATER_DATASETS}


_REQUIRED_ARGS = ("dataset", "algorithm", "test_envs", "hparams_seed",
                  "trial_seed")


RecordsError = errors.RecordsError


# ------------------------------------------------------------------- loading


COLORED_MNIST_ACCURACIES = ("train_acc", "test_acc", "gray_acc")


def is_colored_mnist(record: Record) -> bool:
  """A Colored MNIST (IRM setup) record: no DomainBed test envs; reported
  by `colored_mnist_table`, not by model selection."""
  return record.get("args", {}).get("experiment") == "colored_mnist"


def _check_record(record: Any, where: str) -> None:
  if not isinstance(record, dict):
    raise RecordsError(f"{where}: expected a JSON object, got {type(record).__name__}.")
  args = record.get("args")
  if not isinstance(args, dict):
    raise RecordsError(f"{where}: record has no 'args' object.")
  if is_colored_mnist(record):
    missing = [k for k in ("algorithm", "restart", "seed") if k not in args]
    missing += [k for k in ("step",) + COLORED_MNIST_ACCURACIES
                if k not in record]
    if missing:
      raise RecordsError(f"{where}: Colored MNIST record lacks "
                         f"{', '.join(missing)}.")
    return
  missing = [k for k in _REQUIRED_ARGS if k not in args]
  if missing:
    raise RecordsError(f"{where}: 'args' lacks {', '.join(missing)}.")
  if not isinstance(args["test_envs"], list) or not args["test_envs"]:
    raise RecordsError(f"{where}: args.test_envs must be a non-empty list.")
  if "step" not in record:
    raise RecordsError(f"{where}: record has no 'step'.")
  missing = [f"env{e}_{split}_acc" for e in args["test_envs"]
             for split in ("in", "out") if f"env{e}_{split}_acc" not in record]
  if missing:
    raise RecordsError(f"{where}: record lacks {', '.join(missing)}.")


def read_results(path: str) -> list[Record]:
  """The records of one results.jsonl (workdir.read_jsonl: blank lines are
  skipped, a torn last line is dropped with a warning)."""
  records = workdir.read_jsonl(path)
  for lineno, record in enumerate(records, start=1):
    _check_record(record, f"{path} record {lineno}")
  return records


def non_finite(records: Sequence[Record]) -> list[str]:
  """'step S: key=value' for each non-finite number in the records (a
  diverged run: its accuracies are those of NaN parameters)."""
  return [f"step {r.get('step')}: {k}={v}" for r in records
          for k, v in r.items()
          if isinstance(v, float) and not math.isfinite(v)]


def run_folders(input_dir: str) -> list[str]:
  """Every folder at or below `input_dir` that holds a results.jsonl, in
  sorted order (a sweep's run folders, a Colored MNIST workdir's restarts,
  or one run folder itself)."""
  found = []
  for root, dirs, files in os.walk(input_dir):
    dirs.sort()
    if "results.jsonl" in files:
      found.append(root)
  return sorted(found)


def load_records(input_dir: str, include_unfinished: bool = False) -> list[Record]:
  """All records of the run folders at or below `input_dir`.

  Runs without a `done` file are skipped unless `include_unfinished` (which
  is what DomainBed's reporting.load_records does: it reads every
  results.jsonl). Folders without results.jsonl are ignored, as in DomainBed.
  Raises RecordsError when nothing is found or a line is malformed.
  """
  if not os.path.isdir(input_dir):
    raise RecordsError(f"Input dir {input_dir!r} does not exist or is not a folder.")
  records, n_runs, n_unfinished, diverged = [], 0, 0, []
  # Sorted so that record order, hence DomainBed's tie-breaking, is reproducible.
  for folder in run_folders(input_dir):
    results_path = os.path.join(folder, "results.jsonl")
    n_runs += 1
    if not os.path.exists(os.path.join(folder, "done")):
      n_unfinished += 1
      if not include_unfinished:
        continue
    run_records = read_results(results_path)
    bad = non_finite(run_records)
    if bad:
      diverged.append(f"{folder} ({bad[0]})")
      continue
    records.extend(run_records)
  if diverged:
    print(f"Skipped {len(diverged)} runs with non-finite records (diverged): "
          + "; ".join(diverged), file=sys.stderr, flush=True)
  if not records:
    detail = (f"{n_runs} run folders with results.jsonl, {n_unfinished} of them "
              "unfinished (no `done` file)")
    if diverged:
      detail += f", {len(diverged)} skipped as diverged"
    if n_unfinished and not include_unfinished:
      detail += "; include_unfinished reads those too"
    raise RecordsError(f"No records under {input_dir!r}: {detail}.")
  return records


# ---------------------------------------------------------- model selection


class RunAcc(NamedTuple):
  """One run's (or one checkpoint's) validation and test accuracy."""
  val_acc: float
  test_acc: float
  step: Any


class Choice(NamedTuple):
  """What a selection method picked for one (trial, dataset, algorithm, test env)."""
  hparams_seed: Any
  val_acc: float
  test_acc: float
  step: Any


def get_test_records(records: Sequence[Record]) -> list[Record]:
  """The records of runs with a single test env."""
  return [r for r in records if len(r["args"]["test_envs"]) == 1]


def _num_envs(record: Record) -> int:
  # Like DomainBed: envs are counted up to the first missing envK_out_acc.
  return next(i for i in itertools.count() if f"env{i}_out_acc" not in record)


def _group(items: Sequence[Any], key: Callable[[Any], Any]) -> list[tuple[Any, list[Any]]]:
  """(key, items) pairs sorted by key, items in input order (DomainBed's Q.group)."""
  groups: dict[Any, list[Any]] = {}
  for item in items:
    groups.setdefault(key(item), []).append(item)
  return sorted(groups.items(), key=lambda kv: kv[0])


def oracle_run_acc(run_records: Sequence[Record]) -> Optional[RunAcc]:
  """Test-domain oracle: the run's LAST checkpoint (no early stopping);
  validation is the test env's out split, test its in split."""
  run_records = get_test_records(run_records)
  if not run_records:
    return None
  test_env = run_records[0]["args"]["test_envs"][0]
  last = sorted(run_records, key=lambda r: r["step"])[-1]
  return RunAcc(last[f"env{test_env}_out_acc"], last[f"env{test_env}_in_acc"],
                last["step"])


def _iid_step_acc(record: Record) -> RunAcc:
  test_env = record["args"]["test_envs"][0]
  val_keys = [f"env{i}_out_acc" for i in range(_num_envs(record)) if i != test_env]
  return RunAcc(np.mean([record[k] for k in val_keys]),
                record[f"env{test_env}_in_acc"], record["step"])


def iid_run_acc(run_records: Sequence[Record]) -> Optional[RunAcc]:
  """Training-domain validation: the checkpoint with the best mean out-split
  accuracy over the training envs (first one on ties)."""
  run_records = get_test_records(run_records)
  if not run_records:
    return None
  return max((_iid_step_acc(r) for r in run_records), key=lambda a: a.val_acc)


def _loo_step_acc(step_records: Sequence[Record]) -> Optional[RunAcc]:
  """One step of one hparams seed: the single-test-env run's record, plus runs
  with two test envs, each of which validates on its second env's in split."""
  test_records = get_test_records(step_records)
  if len(test_records) != 1:
    return None
  test_env = test_records[0]["args"]["test_envs"][0]
  n_envs = _num_envs(step_records[0])
  val_accs = np.full(n_envs, -1.0)
  for r in step_records:
    if len(r["args"]["test_envs"]) == 2:
      (val_env,) = set(r["args"]["test_envs"]) - {test_env}
      val_accs[val_env] = r[f"env{val_env}_in_acc"]
  val_accs = np.delete(val_accs, test_env)
  # Every other env must have been held out once, else no estimate.
  if np.any(val_accs == -1):
    return None
  return RunAcc(np.sum(val_accs) / (n_envs - 1),
                test_records[0][f"env{test_env}_in_acc"], test_records[0]["step"])


def leave_one_out_run_acc(run_records: Sequence[Record]) -> Optional[RunAcc]:
  """Leave-one-domain-out cross-validation: per step, the mean over training
  envs v of the in-split accuracy on v of the run trained with test envs
  {test_env, v}; the best step (first on ties). Needs those two-test-env runs
  (same hparams and trial seeds, same steps), else None."""
  step_accs = [_loo_step_acc(records)
               for _, records in _group(run_records, lambda r: r["step"])]
  step_accs = [a for a in step_accs if a is not None]
  if not step_accs:
    return None
  return max(step_accs, key=lambda a: a.val_acc)


@dataclasses.dataclass(frozen=True)
class SelectionMethod:
  key: str    # file names
  name: str   # DomainBed's name, used in the section headers
  run_acc: Callable[[Sequence[Record]], Optional[RunAcc]]


TRAINING_DOMAIN = SelectionMethod(
    "training_domain_validation", "training-domain validation set", iid_run_acc)
LEAVE_ONE_OUT = SelectionMethod(
    "leave_one_domain_out", "leave-one-domain-out cross-validation",
    leave_one_out_run_acc)
ORACLE = SelectionMethod(
    "test_domain_oracle", "test-domain validation set (oracle)", oracle_run_acc)
# DomainBed's order in collect_results.
SELECTION_METHODS = (TRAINING_DOMAIN, LEAVE_ONE_OUT, ORACLE)


def _nan_low(x: Any) -> Any:
  # DomainBed's Q.sorted ranks NaN below everything.
  return -math.inf if isinstance(x, (float, np.floating)) and np.isnan(x) else x


def hparams_accs(records: Sequence[Record], method: SelectionMethod) -> list[Choice]:
  """Per hparams seed, the run's choice; best validation accuracy first.

  `records` are one (trial, dataset, algorithm, test env) group. On ties the
  higher hparams seed comes first, as DomainBed (stable ascending sort,
  then reversed).
  """
  choices = []
  for seed, run_records in _group(records, lambda r: r["args"]["hparams_seed"]):
    acc = method.run_acc(run_records)
    if acc is not None:
      choices.append(Choice(seed, acc.val_acc, acc.test_acc, acc.step))
  return sorted(choices, key=lambda c: _nan_low(c.val_acc))[::-1]


def sweep_acc(records: Sequence[Record], method: SelectionMethod) -> Optional[float]:
  """The test accuracy of the selected hparams seed, or None."""
  choices = hparams_accs(records, method)
  return choices[0].test_acc if choices else None


def group_records(records: Sequence[Record]) -> dict[GroupKey, list[Record]]:
  """Records by (trial_seed, dataset, algorithm, test_env). A record with
  several test envs lands in each of their groups (leave-one-out needs them)."""
  groups: dict[GroupKey, list[Record]] = {}
  for r in records:
    args = r["args"]
    for test_env in args["test_envs"]:
      key = (args["trial_seed"], args["dataset"], args["algorithm"], test_env)
      groups.setdefault(key, []).append(r)
  return groups


def select(records: Sequence[Record], method: SelectionMethod) -> dict[GroupKey, Choice]:
  """The chosen hparams seed and checkpoint per group that has one."""
  result = {}
  for key, group in group_records(records).items():
    choices = hparams_accs(group, method)
    if choices:
      result[key] = choices[0]
  return result


def selected_accs(records: Sequence[Record], method: SelectionMethod) -> dict[GroupKey, float]:
  """The selected test accuracy (DomainBed's sweep_acc) per group."""
  return {k: c.test_acc for k, c in select(records, method).items()}


# -------------------------------------------------------------------- tables


def format_mean(data: Sequence[float], latex: bool = False
                ) -> tuple[Optional[float], Optional[float], str]:
  """(100 * mean, 100 * standard error, text); DomainBed's standard error is
  np.std (ddof=0) / sqrt(n). "X" when there is no data."""
  if len(data) == 0:
    return None, None, "X"
  mean = 100 * np.mean(list(data))
  err = 100 * np.std(np.asarray(data) / np.sqrt(len(data)))
  pm = "$\\pm$" if latex else "+/-"
  return mean, err, f"{mean:.1f} {pm} {err:.1f}"


def algorithm_names(records: Sequence[Record]) -> list[str]:
  """Table rows: DomainBed's algorithms in its order, then the others sorted."""
  names = {r["args"]["algorithm"] for r in records}
  return [n for n in ALGORITHMS if n in names] + sorted(names - set(ALGORITHMS))


def dataset_names(records: Sequence[Record]) -> list[str]:
  """The known datasets (dataset_environments) in table order, then the
  others sorted (DomainBed itself drops datasets it does not know)."""
  names = {r["args"]["dataset"] for r in records}
  known = dataset_environments()
  return [n for n in known if n in names] + sorted(names - set(known))


def environment_names(dataset: str, records: Sequence[Record]) -> list[str]:
  """Column labels of a dataset's test envs."""
  known = dataset_environments()
  if dataset in known:
    return list(known[dataset])
  n = max(_num_envs(r) for r in records if r["args"]["dataset"] == dataset)
  return [f"env{i}" for i in range(n)]


@dataclasses.dataclass
class Table:
  """One of DomainBed's tables. Cells are in percent; `err` is None in the
  "Avg" column (a plain mean) and both are None where DomainBed prints "X"."""
  header_text: str
  dataset: Optional[str]  # None for the averages table
  row_labels: list[str]
  col_labels: list[str]   # "Algorithm", then one per column, then "Avg"
  means: list[list[Optional[float]]]
  errs: list[list[Optional[float]]]
  colwidth: int


def _avg(means: list[Optional[float]]) -> Optional[float]:
  return None if None in means else sum(means) / len(means)


def results_tables(records: Sequence[Record], method: SelectionMethod) -> list[Table]:
  """Per dataset: algorithms x test envs (mean and standard error over trial
  seeds) and "Avg"; then the averages table, algorithms x datasets, where a
  cell is over trial seeds of the trial's mean over its available test envs."""
  accs = selected_accs(records, method)
  algorithms, datasets = algorithm_names(records), dataset_names(records)
  tables = []
  for dataset in datasets:
    envs = environment_names(dataset, records)
    means, errs = [], []
    for algorithm in algorithms:
      row_means, row_errs = [], []
      for test_env in range(len(envs)):
        trial_accs = [a for (t, d, alg, e), a in accs.items()
                      if (d, alg, e) == (dataset, algorithm, test_env)]
        mean, err, _ = format_mean(trial_accs)
        row_means.append(mean)
        row_errs.append(err)
      means.append(row_means + [_avg(row_means)])
      errs.append(row_errs + [None])
    tables.append(Table(
        f"Dataset: {dataset}, model selection method: {method.name}", dataset,
        list(algorithms), ["Algorithm", *envs, "Avg"], means, errs, colwidth=20))

  means, errs = [], []
  for algorithm in algorithms:
    row_means, row_errs = [], []
    for dataset in datasets:
      by_trial: dict[Any, list[float]] = {}
      for (t, d, alg, _), a in accs.items():
        if (d, alg) == (dataset, algorithm):
          by_trial.setdefault(t, []).append(a)
      trial_means = [float(np.mean(v)) for _, v in sorted(by_trial.items())]
      mean, err, _ = format_mean(trial_means)
      row_means.append(mean)
      row_errs.append(err)
    means.append(row_means + [_avg(row_means)])
    errs.append(row_errs + [None])
  tables.append(Table(
      f"Averages, model selection method: {method.name}", None, list(algorithms),
      ["Algorithm", *datasets, "Avg"], means, errs, colwidth=25))
  return tables


def format_cell(mean: Optional[float], err: Optional[float], style: str = "text") -> str:
  """A cell's text: X (missing), 12.3 (Avg column) or 12.3 +/- 0.4; `style`
  is "text", "latex" ($\\pm$) or "markdown" (±)."""
  if mean is None:
    return "X"
  if err is None:
    return f"{mean:.1f}"
  pm = {"text": "+/-", "latex": "$\\pm$", "markdown": "±"}[style]
  return f"{mean:.1f} {pm} {err:.1f}"


def _format_row(row: Sequence[Any], colwidth: int, latex: bool) -> str:
  # DomainBed's misc.print_row: cells padded AND truncated to colwidth, and
  # print(joined, end_) adds a space before end_.
  def fmt(x):
    if isinstance(x, (float, np.floating)):
      x = f"{x:.10f}"
    return str(x).ljust(colwidth)[:colwidth]
  sep, end = (" & ", "\\\\") if latex else ("  ", "")
  return sep.join(fmt(x) for x in row) + " " + end


def format_table(table: Table, latex: bool = False) -> str:
  """The table as DomainBed's print_table prints it (blank line first)."""
  style = "latex" if latex else "text"
  lines = [""]
  n_cols = len(table.col_labels) - 1
  if latex:
    lines += ["\\begin{center}", "\\adjustbox{max width=\\textwidth}{%",
              "\\begin{tabular}{l" + "c" * n_cols + "}", "\\toprule"]
    col_labels = ["\\textbf{" + str(c).replace("%", "\\%") + "}"
                  for c in table.col_labels]
  else:
    lines.append(f"-------- {table.header_text}")
    col_labels = table.col_labels
  lines.append(_format_row(col_labels, table.colwidth, latex))
  if latex:
    lines.append("\\midrule")
  for label, means, errs in zip(table.row_labels, table.means, table.errs):
    cells = [format_cell(m, e, style) for m, e in zip(means, errs)]
    lines.append(_format_row([label, *cells], table.colwidth, latex))
  if latex:
    lines += ["\\bottomrule", "\\end{tabular}}", "\\end{center}"]
  return "\n".join(lines) + "\n"


def format_report(records: Sequence[Record], latex: bool = False,
                  methods: Sequence[SelectionMethod] = SELECTION_METHODS) -> str:
  """What DomainBed's collect_results prints: text tables, or with `latex` a
  LaTeX document."""
  parts = []
  if latex:
    parts.append("\\documentclass{article}\n\\usepackage{booktabs}\n"
                 "\\usepackage{adjustbox}\n\\begin{document}\n"
                 "\\section{Full DomainBed results}\n"
                 f"% Total records: {len(records)}\n")
  else:
    parts.append(f"Total records: {len(records)}\n")
  for method in methods:
    if latex:
      parts.append(f"\n\\subsection{{Model selection: {method.name}}}\n")
    for table in results_tables(records, method):
      if latex:
        title = table.dataset if table.dataset is not None else "Averages"
        parts.append(f"\n\\subsubsection{{{title}}}\n")
      parts.append(format_table(table, latex))
  if latex:
    parts.append("\\end{document}\n")
  return "".join(parts)


def format_markdown_table(table: Table) -> str:
  lines = ["| " + " | ".join(table.col_labels) + " |",
           "|" + "---|" * len(table.col_labels)]
  for label, means, errs in zip(table.row_labels, table.means, table.errs):
    cells = [format_cell(m, e, "markdown") for m, e in zip(means, errs)]
    lines.append("| " + " | ".join([label, *cells]) + " |")
  return "\n".join(lines) + "\n"


def markdown_report(records: Sequence[Record],
                    methods: Sequence[SelectionMethod] = SELECTION_METHODS) -> str:
  """All methods' tables as markdown (mean ± standard error over trial seeds)."""
  parts = ["# DomainBed results\n\n",
           f"Total records: {len(records)}. Cells: test-env accuracy (%), mean ± "
           "standard error over trial seeds; X: no selected run.\n"]
  for method in methods:
    parts.append(f"\n## Model selection: {method.name}\n")
    for table in results_tables(records, method):
      title = table.dataset if table.dataset is not None else "Averages"
      parts.append(f"\n### {title}\n\n{format_markdown_table(table)}")
  return "".join(parts)


# ------------------------------------------------------ Colored MNIST table


def colored_mnist_table(records: Sequence[Record]) -> str:
  """Markdown: per algorithm, the last record of each run (restart, seed),
  its train / test / gray accuracy as mean ± std over runs (np.std, as the
  official script)."""
  last: dict[tuple, Record] = {}
  for r in records:
    if is_colored_mnist(r):
      a = r["args"]
      key = (a["algorithm"], a["seed"], a["restart"])
      if key not in last or r["step"] >= last[key]["step"]:
        last[key] = r
  if not last:
    return ""
  lines = ["| algorithm | runs | train acc | test acc | gray acc |",
           "|---|---|---|---|---|"]
  for algorithm, group in _group(sorted(last.items()), lambda kv: kv[0][0]):
    finals = [r for _, r in group]
    cells = [f"{np.mean([r[k] for r in finals]):.3f} ± "
             f"{np.std([r[k] for r in finals]):.3f}"
             for k in COLORED_MNIST_ACCURACIES]
    lines.append(f"| {algorithm} | {len(finals)} | {' | '.join(cells)} |")
  return "\n".join(lines) + "\n"
