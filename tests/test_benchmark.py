"""experiments/benchmark.py end to end on tiny settings: every variant runs,
ratios are computed against ERM, the tables and JSON are written, and the
weak-scaling row shards over (fake) devices."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# MNIST_CNN's row, and weak scaling on 2 fake CPU devices; 3 x 8 examples
# (per device), as in accelerator_check --tiny: the same programs, which
# the tests' compilation cache holds for whichever runs second.
SCRIPT = """
import chex
chex.set_n_cpu_devices(2)
import sys
from absl import app
from experiments import benchmark
app.run(benchmark.main, argv=sys.argv)
"""


@pytest.mark.slow
def test_benchmark_writes_table_and_json(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  subprocess.run([sys.executable, "-c", SCRIPT, "--repeats", "2", "--warmup",
                  "0", "--mnist_cnn_per_domain", "8", "--output_dir",
                  str(tmp_path), "domainbed_mnist_cnn", "weak_scaling"],
                 check=True, env=env, cwd=ROOT, timeout=900)
  with open(tmp_path / "benchmark.json") as f:
    report = json.load(f)
  rows = report["results"]["domainbed_mnist_cnn"]
  assert set(rows) == {"erm", "fishr_closed_form", "fishr_vmap"}
  assert rows["erm"]["time_ratio_vs_erm"] == 1.0
  for row in rows.values():
    assert row["step_time_s"] > 0 and row["peak_memory_bytes"] > 0
    assert row["memory_ratio_vs_erm"] > 0.5
    # Fishr's head moments and their backward pass add FLOPs to ERM's.
    assert row["flops"] > 0
  assert rows["fishr_closed_form"]["flops_ratio_vs_erm"] > 1.0
  scaling = report["results"]["weak_scaling"]
  assert set(scaling) == {"erm@1", "erm@2", "fishr_closed_form@1",
                          "fishr_closed_form@2"}
  assert scaling["erm@1"]["efficiency"] == 1.0
  assert scaling["fishr_closed_form@2"]["devices"] == 2
  table = (tmp_path / "benchmark.md").read_text()
  assert "| domainbed_mnist_cnn | fishr_closed_form |" in table
  assert "Weak scaling, MNIST_CNN, 3 x 8 examples per device" in table
  assert "| fishr_closed_form | 2 |" in table


@pytest.mark.slow
def test_whole_run_row_times_the_command(tmp_path, tiny_mnist_dir):
  env = {**os.environ, "PYTHONPATH": ROOT}
  subprocess.run([sys.executable, "-m", "experiments.benchmark",
                  "--output_dir", str(tmp_path), "--whole_run_data_dir",
                  tiny_mnist_dir, "--whole_run_steps", "2",
                  "--whole_run_every", "1", "whole_run"],
                 check=True, env=env, cwd=ROOT, timeout=900)
  with open(tmp_path / "benchmark.json") as f:
    rows = json.load(f)["results"]["whole_run"]
  assert set(rows) == {"erm@ours", "fishr@ours"}  # no official checkout
  assert all(r["wall_s"] > 0 and r["steps"] == 2 for r in rows.values())
  assert "| fishr | ours | 2 | 1 |" in (tmp_path / "benchmark.md").read_text()
