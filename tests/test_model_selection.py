"""DomainBed model selection and results tables on a hand-checked tiny sweep.

The sweep: ColoredMNIST (3 envs), ERM and Fishr, hparams seeds 0 and 1, trial
seeds 0 and 1, checkpoints at steps 100 and 200. Every selected value below is
worked out by hand from the literals in RUNS.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import collect_results
from fishr_jax import model_selection as ms

DATASET = "ColoredMNIST"
FILLER = 0.5  # in-split accuracy of training envs; never selected on


def ckpt(step, test_env, train_outs, test_out, test_in):
  """Accuracies of one single-test-env checkpoint: the out-split accuracies of
  the two training envs (in env order), and the test env's out and in."""
  accs = {"step": step}
  train_envs = [e for e in range(3) if e != test_env]
  for e, out in zip(train_envs, train_outs):
    accs[f"env{e}_in_acc"], accs[f"env{e}_out_acc"] = FILLER, out
  accs[f"env{test_env}_in_acc"], accs[f"env{test_env}_out_acc"] = test_in, test_out
  return accs


def pair_ckpt(step, val_env, val_in):
  """A checkpoint of a run with test envs {0, val_env}: leave-one-out reads
  only env{val_env}_in_acc. The rest is 0.99, so that a method that failed
  to skip two-test-env runs in IID/oracle selection would pick it."""
  accs = {"step": step}
  for e in range(3):
    accs[f"env{e}_in_acc"] = accs[f"env{e}_out_acc"] = 0.99
  accs[f"env{val_env}_in_acc"] = val_in
  return accs


# (algorithm, trial_seed, hparams_seed, test_envs, checkpoints in file order)
RUNS = [
    # ----- ERM, test env 0 (training envs 1, 2)
    # IID: step 100 (mean out .75 > .73) -> .61. Including env0_out would
    #   wrongly give step 200 (mean(.99,.72,.74)=.82 > .70). Oracle: last -> val .99, test .63.
    ("ERM", 0, 0, [0], [ckpt(100, 0, (.70, .80), .60, .61), ckpt(200, 0, (.72, .74), .99, .63)]),
    # IID: step 100 (.80) -> .52. Oracle: val .66, test .65.
    ("ERM", 0, 1, [0], [ckpt(100, 0, (.80, .80), .50, .52), ckpt(200, 0, (.70, .70), .66, .65)]),
    # IID: step 200 (.80 > .60) -> .73. Oracle: val .72, test .73.
    ("ERM", 1, 0, [0], [ckpt(100, 0, (.60, .60), .70, .71), ckpt(200, 0, (.90, .70), .72, .73)]),
    # IID: step 100 (.85) -> .42. Oracle: val .80, test .45.
    ("ERM", 1, 1, [0], [ckpt(100, 0, (.85, .85), .40, .42), ckpt(200, 0, (.50, .50), .80, .45)]),
    # ----- ERM, test env 1 (training envs 0, 2)
    # IID: step 200 (.75) -> .76. Oracle: val .75, test .76.
    ("ERM", 0, 0, [1], [ckpt(100, 1, (.70, .70), .70, .71), ckpt(200, 1, (.75, .75), .75, .76)]),
    # IID: step 100 (.65) -> .91. Oracle: val .60, test .62.
    ("ERM", 0, 1, [1], [ckpt(100, 1, (.65, .65), .90, .91), ckpt(200, 1, (.60, .60), .60, .62)]),
    # IID: tie at .70, the first checkpoint wins -> .80. Oracle: val .70, test .70.
    ("ERM", 1, 0, [1], [ckpt(100, 1, (.70, .70), .70, .80), ckpt(200, 1, (.70, .70), .70, .70)]),
    # IID: tie at .60 -> step 100 -> .60. Oracle: val .60, test .64.
    ("ERM", 1, 1, [1], [ckpt(100, 1, (.60, .60), .60, .60), ckpt(200, 1, (.60, .60), .60, .64)]),
    # ----- ERM, test env 2 (training envs 0, 1), hparams seed 0 only
    # Written step 200 first: the oracle takes the largest step, not the last
    # line. IID: step 100 (.80 > .70) -> .86. Oracle: step 200 -> test .88.
    ("ERM", 0, 0, [2], [ckpt(200, 2, (.70, .70), .90, .88), ckpt(100, 2, (.80, .80), .85, .86)]),
    # IID: step 200 (.90) -> .84. Oracle: test .84.
    ("ERM", 1, 0, [2], [ckpt(100, 2, (.80, .80), .85, .90), ckpt(200, 2, (.90, .90), .80, .84)]),
    # ----- Fishr, test env 0, trial 0 only
    # IID: step 100 (.90) -> val .90, test .72. Oracle: val .75, test .74.
    ("Fishr", 0, 0, [0], [ckpt(100, 0, (.90, .90), .70, .72), ckpt(200, 0, (.80, .80), .75, .74)]),
    # IID: step 200 (.88) -> val .88, test .79. Oracle: val .78, test .79.
    ("Fishr", 0, 1, [0], [ckpt(100, 0, (.85, .85), .80, .81), ckpt(200, 0, (.88, .88), .78, .79)]),
    # ----- ERM, trial 0, runs with test envs {0, v} for leave-one-out on env 0
    # hparams 0: step 100 val (.90 + .80) / 2 = .85, step 200 (.50 + .60) / 2 = .55
    #   -> step 100, test env0_in of the single-test-env run = .61.
    ("ERM", 0, 0, [0, 1], [pair_ckpt(100, 1, .90), pair_ckpt(200, 1, .50)]),
    ("ERM", 0, 0, [0, 2], [pair_ckpt(100, 2, .80), pair_ckpt(200, 2, .60)]),
    # hparams 1: step 100 (.60 + .70) / 2 = .65, step 200 .40 -> val .65 < .85.
    ("ERM", 0, 1, [0, 1], [pair_ckpt(100, 1, .60), pair_ckpt(200, 1, .40)]),
    ("ERM", 0, 1, [0, 2], [pair_ckpt(100, 2, .70), pair_ckpt(200, 2, .40)]),
]
# Would win every method for Fishr / trial 0 / env 0 if it were read.
UNFINISHED = ("Fishr", 0, 2, [0], [ckpt(100, 0, (.99, .99), .99, .99)])
N_RECORDS = sum(len(run[4]) for run in RUNS)  # 32

# Selected test-env in-split accuracy per (method, trial, algorithm, test env).
EXPECTED = {
    # IID: per trial, the hparams seed with the best validation wins.
    # ERM env0: t0 hp1 (.80 > .75) -> .52; t1 hp1 (.85 > .80) -> .42.
    # ERM env1: t0 hp0 (.75 > .65) -> .76; t1 hp0 (.70 > .60) -> .80.
    # ERM env2: one seed -> .86, .84. Fishr env0: t0 hp0 (.90 > .88) -> .72.
    ("training_domain_validation", 0, "ERM", 0): .52,
    ("training_domain_validation", 1, "ERM", 0): .42,
    ("training_domain_validation", 0, "ERM", 1): .76,
    ("training_domain_validation", 1, "ERM", 1): .80,
    ("training_domain_validation", 0, "ERM", 2): .86,
    ("training_domain_validation", 1, "ERM", 2): .84,
    ("training_domain_validation", 0, "Fishr", 0): .72,
    # Oracle: ERM env0 t0 hp0 (.99 > .66) -> .63; t1 hp1 (.80 > .72) -> .45.
    # ERM env1 t0 hp0 (.75 > .60) -> .76; t1 hp0 (.70 > .60) -> .70.
    # ERM env2 -> .88, .84. Fishr env0 hp1 (.78 > .75) -> .79.
    ("test_domain_oracle", 0, "ERM", 0): .63,
    ("test_domain_oracle", 1, "ERM", 0): .45,
    ("test_domain_oracle", 0, "ERM", 1): .76,
    ("test_domain_oracle", 1, "ERM", 1): .70,
    ("test_domain_oracle", 0, "ERM", 2): .88,
    ("test_domain_oracle", 1, "ERM", 2): .84,
    ("test_domain_oracle", 0, "Fishr", 0): .79,
    # Leave-one-out: only ERM / trial 0 / env 0 has both {0,1} and {0,2} runs;
    # hp0 (.85 > .65) at step 100 -> .61. Env 1 lacks a {1,2} run, env 2 a
    # {1,2} run, trial 1 and Fishr have no pairs: nothing selected there.
    ("leave_one_domain_out", 0, "ERM", 0): .61,
}

# SE = np.std(values) / sqrt(n), so for two trials |a - b| / 2 / sqrt(2).
EXPECTED_ROWS = {
    "training_domain_validation": {
        # env0 [.52,.42]: 47.0, .05/1.414 -> 3.5; env1 [.76,.80]: 78.0, .02/1.414 -> 1.4;
        # env2 [.86,.84]: 85.0, .01/1.414 -> 0.7; Avg (47 + 78 + 85) / 3 = 70.0.
        "ERM": ["47.0 +/- 3.5", "78.0 +/- 1.4", "85.0 +/- 0.7", "70.0"],
        "Fishr": ["72.0 +/- 0.0", "X", "X", "X"],
    },
    "leave_one_domain_out": {
        "ERM": ["61.0 +/- 0.0", "X", "X", "X"],
        "Fishr": ["X", "X", "X", "X"],
    },
    "test_domain_oracle": {
        # env0 [.63,.45]: 54.0, .09/1.414 -> 6.4; env1 [.76,.70]: 73.0, .03/1.414 -> 2.1;
        # env2 [.88,.84]: 86.0, .02/1.414 -> 1.4; Avg (54 + 73 + 86) / 3 = 71.0.
        "ERM": ["54.0 +/- 6.4", "73.0 +/- 2.1", "86.0 +/- 1.4", "71.0"],
        "Fishr": ["79.0 +/- 0.0", "X", "X", "X"],
    },
}
# Averages table: per trial, the mean over the test envs it has, then mean/SE
# over trials. IID ERM: t0 (.52+.76+.86)/3 = .7133, t1 (.42+.80+.84)/3 = .6867
#   -> 70.0, (.02667/2)/1.414 -> 0.9. Oracle ERM: t0 2.27/3 = .7567,
#   t1 1.99/3 = .6633 -> 71.0, (.09333/2)/1.414 -> 3.3. Fishr: one trial,
#   env0 only (DomainBed averages what is there). LOO ERM: .61.
EXPECTED_AVERAGES = {
    "training_domain_validation": {"ERM": ["70.0 +/- 0.9", "70.0"],
                                   "Fishr": ["72.0 +/- 0.0", "72.0"]},
    "leave_one_domain_out": {"ERM": ["61.0 +/- 0.0", "61.0"],
                             "Fishr": ["X", "X"]},
    "test_domain_oracle": {"ERM": ["71.0 +/- 3.3", "71.0"],
                           "Fishr": ["79.0 +/- 0.0", "79.0"]},
}


def _record(algorithm, trial, hparams_seed, test_envs, accs):
  return {"args": {"dataset": DATASET, "algorithm": algorithm,
                   "test_envs": test_envs, "hparams_seed": hparams_seed,
                   "trial_seed": trial, "seed": 1234, "steps": 201},
          "hparams": {"lr": 1e-3, "batch_size": 32},
          "epoch": accs["step"] / 50, "loss": 0.3, "step_time": 0.01,
          "mem_gb": 0.1, **accs}


def _write_run(path, run, done=True):
  os.makedirs(path)
  with open(os.path.join(path, "results.jsonl"), "w") as f:
    for accs in run[4]:
      f.write(json.dumps(_record(*run[:4], accs), sort_keys=True) + "\n")
  if done:
    with open(os.path.join(path, "done"), "w") as f:
      f.write("done")


@pytest.fixture
def sweep(tmp_path):
  sweep_dir = tmp_path / "sweep"
  for i, run in enumerate(RUNS):
    _write_run(sweep_dir / f"run{i:02d}", run)
  _write_run(sweep_dir / "unfinished", UNFINISHED, done=False)
  os.makedirs(sweep_dir / "no_results")  # ignored, like DomainBed
  return str(sweep_dir)


def _methods():
  return {m.key: m for m in ms.SELECTION_METHODS}


def test_selected_accuracies(sweep):
  records = ms.load_records(sweep)
  assert len(records) == N_RECORDS
  got = {}
  for key, method in _methods().items():
    for (trial, dataset, algorithm, test_env), acc in ms.selected_accs(records, method).items():
      assert dataset == DATASET
      got[(key, trial, algorithm, test_env)] = acc
  assert got == pytest.approx(EXPECTED)


def test_choice_records_seed_and_step(sweep):
  records = ms.load_records(sweep)
  choices = ms.select(records, ms.TRAINING_DOMAIN)
  # ERM / trial 0 / env 0: hparams 1 at step 100 with val .80.
  assert choices[(0, DATASET, "ERM", 0)] == pytest.approx(ms.Choice(1, .80, .52, 100))
  choices = ms.select(records, ms.LEAVE_ONE_OUT)
  assert choices[(0, DATASET, "ERM", 0)] == pytest.approx(ms.Choice(0, .85, .61, 100))


def test_unfinished_runs_ignored_unless_asked(sweep):
  records = ms.load_records(sweep)
  assert all(r["args"]["hparams_seed"] != 2 for r in records)
  # DomainBed's load_records reads them: then the unfinished run wins Fishr.
  records = ms.load_records(sweep, include_unfinished=True)
  assert len(records) == N_RECORDS + 1
  assert ms.selected_accs(records, ms.TRAINING_DOMAIN)[(0, DATASET, "Fishr", 0)] == .99


def test_table_cells(sweep):
  records = ms.load_records(sweep)
  for key, method in _methods().items():
    dataset_table, averages = ms.results_tables(records, method)
    assert dataset_table.col_labels == ["Algorithm", "+90%", "+80%", "-90%", "Avg"]
    assert averages.col_labels == ["Algorithm", DATASET, "Avg"]
    for table, expected in ((dataset_table, EXPECTED_ROWS[key]),
                            (averages, EXPECTED_AVERAGES[key])):
      assert table.row_labels == ["ERM", "Fishr"]  # DomainBed's order
      cells = {label: [ms.format_cell(m, e) for m, e in zip(means, errs)]
               for label, means, errs in zip(table.row_labels, table.means, table.errs)}
      assert cells == expected, (key, table.header_text)


def test_printed_text_layout(sweep):
  text = ms.format_report(ms.load_records(sweep))
  lines = text.split("\n")
  assert lines[0] == f"Total records: {N_RECORDS}"
  headers = [l for l in lines if l.startswith("--------")]
  assert headers == [
      "-------- Dataset: ColoredMNIST, model selection method: training-domain validation set",
      "-------- Averages, model selection method: training-domain validation set",
      "-------- Dataset: ColoredMNIST, model selection method: leave-one-domain-out cross-validation",
      "-------- Averages, model selection method: leave-one-domain-out cross-validation",
      "-------- Dataset: ColoredMNIST, model selection method: test-domain validation set (oracle)",
      "-------- Averages, model selection method: test-domain validation set (oracle)",
  ]
  # print_table: blank line, header, then rows; cells padded to 20 (dataset)
  # or 25 (averages) chars, joined by two spaces, plus print's trailing space.
  i = lines.index(headers[0])
  assert lines[i - 1] == ""
  assert lines[i + 1] == "  ".join(c.ljust(20) for c in
                                   ["Algorithm", "+90%", "+80%", "-90%", "Avg"]) + " "
  assert lines[i + 2] == "  ".join(c.ljust(20) for c in
                                   ["ERM", "47.0 +/- 3.5", "78.0 +/- 1.4",
                                    "85.0 +/- 0.7", "70.0"]) + " "
  i = lines.index(headers[1])
  assert lines[i + 2] == "  ".join(c.ljust(25) for c in ["ERM", "70.0 +/- 0.9", "70.0"]) + " "


def test_layout_matches_domainbed_ground_truth():
  """Lines copied from DomainBed's domainbed/misc/test_sweep_results.txt and
  its print_table tests (test_collect_results.py)."""
  table = ms.Table("Averages, model selection method: training-domain validation set",
                   None, ["ERM"], ["Algorithm", "VLCS", "Avg"],
                   [[78.3, 78.3]], [[0.0, None]], colwidth=25)
  assert ms.format_table(table) == (
      "\n-------- Averages, model selection method: training-domain validation set\n"
      "Algorithm                  VLCS                       Avg                       \n"
      "ERM                        78.3 +/- 0.0               78.3                      \n")
  table = ms.Table("Header text", None, ["R1"], ["C1", "C2"], [[None]], [[None]], colwidth=10)
  assert ms.format_table(table) == (
      "\n-------- Header text\nC1          C2         \nR1          X          \n")
  assert ms.format_table(table, latex=True) == (
      "\n\\begin{center}\n\\adjustbox{max width=\\textwidth}{%\n"
      "\\begin{tabular}{lc}\n\\toprule\n"
      "\\textbf{C1 & \\textbf{C2 \\\\\n\\midrule\n"  # DomainBed truncates labels too
      "R1         & X          \\\\\n"
      "\\bottomrule\n\\end{tabular}}\n\\end{center}\n")
  assert ms.format_mean([0.1, 0.2, 0.3])[2] == "20.0 +/- 4.7"
  assert ms.format_mean([0.1, 0.2, 0.3], latex=True)[2] == "20.0 $\\pm$ 4.7"
  assert ms.format_mean([]) == (None, None, "X")


def test_domainbed_unit_cases():
  """DomainBed's own test_model_selection cases, incl. its hparams tie rule."""
  def record(step, hparams_seed, envs):
    r = {"args": {"test_envs": [], "hparams_seed": hparams_seed}, "step": step}
    for i, (in_acc, out_acc, is_test) in enumerate(envs):
      if is_test:
        r["args"]["test_envs"].append(i)
      r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = in_acc, out_acc
    return r
  run = [record(0, 0, [(.1, .2, True), (.5, .6, False), (.6, .7, False)]),
         record(1, 0, [(.3, .4, True), (.6, .7, False), (.7, .8, False)])]
  assert ms.iid_run_acc(run)[:2] == pytest.approx((.75, .3))
  run = [record(0, 0, [(.1, 0., True), (0., 0., False), (0., 0., False)]),
         record(0, 0, [(0., 0., True), (.5, 0., True), (0., 0., False)]),
         record(0, 0, [(0., 0., True), (0., 0., False), (.6, 0., True)])]
  assert ms.leave_one_out_run_acc(run)[:2] == pytest.approx((.55, .1))
  assert ms.leave_one_out_run_acc(run[:2]) is None
  assert ms.oracle_run_acc([]) is None and ms.iid_run_acc([]) is None
  # Equal validation accuracy: DomainBed ends up with the higher hparams seed.
  tie = [record(0, 0, [(.7, .5, True), (.0, .9, False)]),
         record(0, 1, [(.6, .5, True), (.0, .9, False)])]
  assert ms.sweep_acc(tie, ms.TRAINING_DOMAIN) == .6


def test_collect_writes_files(sweep, tmp_path):
  out_dir = str(tmp_path / "tables")
  printed, written = collect_results.collect(sweep, out_dir)
  assert printed == ms.format_report(ms.load_records(sweep))
  with open(os.path.join(out_dir, "results.txt")) as f:
    assert f.read() == printed
  with open(os.path.join(out_dir, "results.md")) as f:
    md = f.read()
  for method in ms.SELECTION_METHODS:
    assert f"## Model selection: {method.name}" in md
  assert "| ERM | 47.0 ± 3.5 | 78.0 ± 1.4 | 85.0 ± 0.7 | 70.0 |" in md
  with open(os.path.join(out_dir, "results.tex")) as f:
    tex = f.read()
  assert tex.startswith("\\documentclass{article}") and tex.endswith("\\end{document}\n")
  assert "\\subsection{Model selection: test-domain validation set (oracle)}" in tex
  assert "54.0 $\\pm$ 6.4" in tex and "\\textbf{+90\\%}" in tex
  printed_tex, _ = collect_results.collect(sweep, out_dir, latex=True)
  assert printed_tex == tex
  for method in ms.SELECTION_METHODS:
    path = os.path.join(out_dir, f"{DATASET}_{method.key}.png")
    assert path in written
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = collect_results.plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_default_output_dir_is_input_dir(sweep):
  _, written = collect_results.collect(sweep)
  assert os.path.join(sweep, "results.txt") in written
  # The written files are not run folders: reading again gives the same records.
  assert len(ms.load_records(sweep)) == N_RECORDS


def test_errors(tmp_path):
  with pytest.raises(ms.RecordsError, match="does not exist"):
    ms.load_records(str(tmp_path / "missing"))
  with pytest.raises(ms.RecordsError, match="No records.*0 run folders"):
    ms.load_records(str(tmp_path))
  _write_run(tmp_path / "a", UNFINISHED, done=False)
  with pytest.raises(ms.RecordsError, match="1 of them unfinished"):
    ms.load_records(str(tmp_path))
  bad = tmp_path / "b"
  _write_run(bad, RUNS[0])
  with open(bad / "results.jsonl", "a") as f:
    f.write('{"args": {"dataset": \n')
  with pytest.raises(ms.RecordsError, match=r"b/results\.jsonl line 3: malformed JSON"):
    ms.load_records(str(tmp_path))
  with open(bad / "results.jsonl", "w") as f:
    f.write(json.dumps({"args": {"dataset": DATASET}, "step": 0}) + "\n")
  with pytest.raises(ms.RecordsError, match="record 1: 'args' lacks algorithm"):
    ms.load_records(str(tmp_path))


def test_cli_reports_empty_input_dir(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.collect_results", f"--input_dir={tmp_path}"],
      capture_output=True, text=True, timeout=60,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 1
  assert "No records under" in result.stderr and result.stdout == ""


def test_unknown_dataset_kept_with_generic_columns():
  records = [_record("MyAlg", 0, 0, [1], dict(ckpt(0, 1, (.5, .5), .5, .5)))]
  for r in records:
    r["args"]["dataset"] = "MyData"
  table = ms.results_tables(records, ms.ORACLE)[0]
  assert table.col_labels == ["Algorithm", "env0", "env1", "env2", "Avg"]
  assert [ms.format_cell(m, e) for m, e in zip(table.means[0], table.errs[0])] == [
      "X", "50.0 +/- 0.0", "X", "X"]


def test_a_diverged_run_is_skipped_and_listed_not_averaged(sweep, capsys):
  clean = ms.load_records(sweep)
  diverged = os.path.join(sweep, "diverged")
  _write_run(diverged, RUNS[0])
  with open(os.path.join(diverged, "results.jsonl"), "a") as f:
    f.write(json.dumps({**_record(*RUNS[0][:4], RUNS[0][4][-1]),
                        "loss": float("nan")}) + "\n")
  assert ms.load_records(sweep) == clean
  err = capsys.readouterr().err
  assert f"Skipped 1 runs with non-finite records (diverged): {diverged} (" in err
  assert "loss=nan" in err


def test_missing_cells_are_explained(sweep, tmp_path, capsys):
  text, _ = collect_results.collect(sweep, str(tmp_path / "out"))
  explained = collect_results._has_missing_cells(text)  # pylint: disable=protected-access
  assert explained == any(
      m is None for method in ms.SELECTION_METHODS
      for table in ms.results_tables(ms.load_records(sweep), method)
      for row in table.means for m in row)
  assert collect_results._has_missing_cells(  # pylint: disable=protected-access
      "Fishr  X  12.3 +/- 0.4 \nERM  & X & 1.0 \\\\")
  assert not collect_results._has_missing_cells("XRM  12.3 +/- 0.4 ")  # pylint: disable=protected-access
