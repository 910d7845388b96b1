"""Colored MNIST end to end on the embedded digits."""

import json
import os
import subprocess
import sys

import pytest

from configs import colored_mnist as cmnist_config
from fishr_jax import train_colored_mnist
from fishr_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_one_step_smoke(tmp_path):
  """The documented entry point with overrides: tiny, one restart, 3 steps."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "fishr_jax.main",
         "--config", os.path.join(ROOT, "configs", "colored_mnist.py"),
         "--workdir", str(workdir), "--config.algorithm=irm",
         "--config.restarts=2", "--config.steps=3", "--config.hidden_dim=16",
         "--config.log_every=2"]
  # Outside the repository, as the installed `fishr-jax` script runs: the
  # config file must not need configs/ on sys.path.
  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  assert "irm (2 restarts)" in out.stdout
  config = json.loads((workdir / "config.json").read_text())
  assert config["algorithm"] == "irm" and config["hidden_dim"] == 16
  # Each restart is a run of the train loop: its records, checkpoints, done.
  runs = [workdir / f"restart_{r}" for r in range(2)]
  records = [workdir_lib.read_records(str(run)) for run in runs]
  assert [[r["step"] for r in run] for run in records] == [[0, 2], [0, 2]]
  assert all((run / "done").exists() and (run / "checkpoints").is_dir()
             for run in runs)
  assert {"loss", "nll", "penalty", "train_acc", "test_acc", "gray_acc",
          "step_time", "hparams", "args"} <= set(records[0][0])
  assert records[1][0]["args"]["restart"] == 1
  results = json.loads((workdir / "results.json").read_text())
  assert results["algorithm"] == "irm" and results["restarts"] == 2
  for key in ("train_acc", "test_acc", "gray_acc"):
    assert len(results[key]["values"]) == 2
    assert 0.0 <= results[key]["mean"] <= 1.0
  assert results["test_acc"]["values"] == [run[-1]["test_acc"] for run in records]


def test_bad_preset_is_an_error():
  with pytest.raises(ValueError, match="preset"):
    cmnist_config.get_config("papr")


@pytest.mark.slow
def test_fishr_beats_erm_out_of_distribution(tmp_path):
  """The default preset, 2 restarts: Fishr generalizes to the flipped colors,
  ERM does not (official code: Fishr 0.528, ERM 0.236 test accuracy). Each
  restart alone clears both margins (Fishr 0.54-0.63, ERM 0.19-0.25 over
  restarts 0-2), so 2 of them keep the check and save a third of its time."""
  results = {}
  for algorithm in ("erm", "fishr"):
    config = cmnist_config.get_config()
    config.algorithm = algorithm
    config.restarts = 2
    config.log_every = 100
    results[algorithm] = train_colored_mnist.train_and_evaluate(
        config, str(tmp_path / algorithm))
  fishr, erm = results["fishr"]["test_acc"]["mean"], results["erm"]["test_acc"]["mean"]
  assert fishr >= 0.45, results
  assert fishr >= erm + 0.20, results
  assert results["erm"]["train_acc"]["mean"] > 0.9  # ERM fits the colors
