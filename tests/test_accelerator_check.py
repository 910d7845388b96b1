"""experiments/accelerator_check.py at tiny sizes on CPU, so that the script
a GPU or TPU session runs first cannot rot: tests run on the backend, every
quick benchmark row is timed, the report names the device."""

import json
import os
import subprocess
import sys

import pytest

from experiments import pytest_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_check_writes_its_report(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  test = "tests/test_penalties.py::test_penalty_reductions"  # 0.3 s
  subprocess.run([sys.executable, "-m", "experiments.accelerator_check",
                  "--tiny", "--output_dir", str(tmp_path), f"--tests={test}"],
                 check=True, cwd=ROOT, env=env, timeout=900)
  report = json.loads((tmp_path / "accelerator_check.json").read_text())
  assert report["device"].startswith("CPU") and report["tiny"]
  assert report["complete"]
  assert report["tests"]["exit_code"] == 0
  assert report["tests"]["summary"].startswith("1 passed")
  runs = report["benchmark"].pop("runs_per_program")
  assert set(report["benchmark"]) == {"colored_mnist_full_batch",
                                      "domainbed_mnist_cnn"}
  assert sorted(runs) == ["colored_mnist_full_batch@1",
                          "colored_mnist_full_batch@2",
                          "domainbed_mnist_cnn@1", "domainbed_mnist_cnn@2"]
  for row in runs.values():
    assert row["step_time_s"] > 0 and row["throughput_vs_one_by_one"] > 0
  for rows in report["benchmark"].values():
    assert rows["erm"]["time_ratio_vs_erm"] == 1.0
    assert all(r["step_time_s"] > 0 for r in rows.values())
  text = (tmp_path / "accelerator_check.md").read_text()
  assert "Device: CPU" in text and "Tests (" + test + "): 1 passed" in text
  assert "| domainbed_mnist_cnn | fishr_closed_form |" in text
  assert "| DomainBed MNIST_CNN, 3 x 8, 10 classes | 2 |" in text


def test_the_report_keeps_each_failed_test_and_its_reason():
  verbose = ("[gw1] [  2%] FAILED tests/test_a.py::test_one[4] \n"
             "[gw0] [  5%] PASSED tests/test_a.py::test_two\n"
             "[gw0] [  9%] FAILED tests/test_b.py::test_three \n")
  summary = ("=== short test summary info ===\n"
             "FAILED tests/test_a.py::test_one[4] - AssertionError: rtol=1e-06\n"
             "FAILED tests/test_b.py::test_three - assert 1 == 2\n"
             "=== 2 failed, 1 passed in 3.20s ===\n")
  assert pytest_output.failures(verbose + summary) == {
      "tests/test_a.py::test_one[4]": "AssertionError: rtol=1e-06",
      "tests/test_b.py::test_three": "assert 1 == 2"}
  # Cut short before the summary: the names, without reasons.
  assert pytest_output.failures(verbose) == {
      "tests/test_a.py::test_one[4]": "", "tests/test_b.py::test_three": ""}
