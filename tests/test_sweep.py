"""A short DomainBed sweep end to end: launch, list, collect the tables."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from experiments import sweep
from fishr_jax import algorithms
from fishr_jax import errors
from fishr_jax import workdir
from fishr_jax.algorithms import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_pacs(root):
  rng = np.random.default_rng(0)
  for domain in ("art_painting", "cartoon", "photo", "sketch"):
    for cls in ("dog", "horse"):
      folder = root / "PACS" / domain / cls
      folder.mkdir(parents=True)
      for i in range(3):  # 6 per domain: int(6 * 0.2) = 1 held out
        size = tuple(rng.integers(24, 48, 2))
        pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def _sweep(*args):
  cmd = [sys.executable, "-m", "experiments.sweep", *args]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def test_jobs_names_and_test_envs():
  assert sweep.algorithm_name("Fishr") == "fishr" == sweep.algorithm_name("fishr")
  with pytest.raises(ValueError):
    sweep.algorithm_name("NotAnAlgorithm")
  assert sweep.test_env_sets(3, True) == [[0], [1], [2]]
  assert sweep.test_env_sets(3, False)[3:] == [[0, 1], [0, 2], [1, 2]]
  assert sweep.test_env_sets(3, False, only=[2]) == [[2]]
  with pytest.raises(ValueError, match=r"--test_envs \[3\]"):
    sweep.test_env_sets(3, True, only=[3])
  # Every registered algorithm, by DomainBed's name too.
  for name in algorithms.names():
    assert sweep.algorithm_name(registry.get(name).domainbed.name) == name


@pytest.mark.slow
def test_short_sweep_then_collect_results(tmp_path, tiny_mnist_dir):
  """ColoredMNIST (real digits: a small IDX copy of the embedded ones) and a
  generated PACS folder, ERM and Fishr x 1 hparams sample x 1 trial x every
  test env, 3 steps each; then all three model-selection tables."""
  _fake_pacs(tmp_path / "data")
  output_dir = tmp_path / "sweep"
  # Small batches keep it quick; the other hparams are DomainBed's defaults.
  # Each dataset's runs of one algorithm go to one process (their shapes
  # agree): 3 launches in place of 10.
  common = lambda n_hparams: [
      "--algorithms", "ERM", "Fishr", "--n_hparams", str(n_hparams),
      "--n_trials", "1", "--single_test_envs", "--steps", "3",
      "--runs_per_program", "0", "--skip_confirmation"]
  mnist = ["--datasets", "ColoredMNIST", "--output_dir", str(output_dir),
           "--data_dir", tiny_mnist_dir, "--config.digits_source=idx",
           "--config.eval_batch_size=64", "--hparams", '{"batch_size": 8}', *common(1)]
  pacs = ["--datasets", "PACS", "--output_dir", str(output_dir),
          "--data_dir", str(tmp_path / "data"), "--hparams", '{"resnet18": true, "batch_size": 4}',
          "--config.image_size=32", "--config.eval_batch_size=16",
          *common(1), "--algorithms", "Fishr"]  # ERM: on ColoredMNIST
  _sweep("launch", *mnist)
  _sweep("launch", *pacs)
  listing = _sweep("list", *pacs)
  assert "4 jobs: 4 done, 0 running, 0 incomplete, 0 not launched" in listing
  assert "6 jobs: 6 done" in _sweep("list", *mnist)
  # A finished sweep launched again runs nothing.
  assert "6 jobs: 6 done" in _sweep("launch", *mnist)

  out = subprocess.run([sys.executable, "-m", "experiments.collect_results",
                        "--input_dir", str(output_dir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  for method in ("training-domain validation set", "leave-one-domain-out "
                 "cross-validation", "test-domain validation set (oracle)"):
    for dataset in ("ColoredMNIST", "PACS"):
      assert f"-------- Dataset: {dataset}, model selection method: {method}" in out.stdout
    assert f"-------- Averages, model selection method: {method}" in out.stdout
  assert "Fishr" in out.stdout and "ERM" in out.stdout


def _sweep_result(*args, stdin=subprocess.DEVNULL):
  return subprocess.run([sys.executable, "-m", "experiments.sweep", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        stdin=stdin)


ONE_DATASET = ["--datasets", "ColoredMNIST", "--algorithms", "ERM",
               "--n_hparams", "1", "--n_trials", "1", "--single_test_envs"]
# Every job fails (exit 3) on data the sweep does not read itself.
MISSING_DATA = ["--data_dir=/nonexistent", "--config.digits_source=idx"]


def test_failed_jobs_make_the_sweep_fail_and_name_their_logs(tmp_path):
  result = _sweep_result("launch", *ONE_DATASET, "--output_dir",
                         str(tmp_path), "--skip_confirmation", *MISSING_DATA)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "0 jobs finished, 3 failed" in result.stdout
  assert "3 of 3 jobs failed; their logs:" in result.stderr
  logs = [l.split(": ", 1)[1] for l in result.stderr.splitlines()
          if l.startswith("  exit 3: ")]
  assert len(logs) == 3
  assert all("train-images-idx3-ubyte[.gz] (the standard MNIST files); it "
             "is missing." in open(l).read() for l in logs)


def test_a_config_no_run_can_take_is_refused_before_any_job(tmp_path):
  for flag, message in [
      (["--steps", "-5"], "config.steps=-5: must be an integer >= 1."),
      (["--holdout_fraction", "1.5"], "config.holdout_fraction=1.5: must be "
       "in (0, 1): the part of each env held out for validation."),
      (["--data_dir", str(tmp_path)], f"config.data_dir='{tmp_path}': is not "
       "read by ColoredMNIST on the embedded digits; pass "
       "--config.digits_source=idx (or tfds) to read MNIST from it, or drop "
       "it.")]:
    result = _sweep_result("launch", *ONE_DATASET, "--skip_confirmation",
                           "--output_dir", str(tmp_path / "sweep"), *flag)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {message}\n"
    assert not (tmp_path / "sweep").exists()


def test_unknown_names_and_a_closed_stdin_are_one_line_errors(tmp_path):
  result = _sweep_result("launch", "--datasets", "CMNIST", "--output_dir",
                         str(tmp_path))
  assert result.returncode == 2
  assert result.stderr.strip() == (
      "error: Unknown dataset 'CMNIST'; known: ColoredMNIST, RotatedMNIST, "
      "VLCS, PACS, OfficeHome, TerraIncognita, DomainNet. Did you mean "
      "'ColoredMNIST'?")
  result = _sweep_result("launch", "--algorithms", "Fisher", "--output_dir",
                         str(tmp_path))
  assert result.returncode == 2 and "Did you mean 'Fishr'" in result.stderr
  result = _sweep_result("launch", *ONE_DATASET, "--hparams", '{"lr": -0.001}',
                         "--output_dir", str(tmp_path / "negative"))
  assert result.returncode == 2
  assert result.stderr == "error: --hparams lr must be > 0; got -0.001.\n"
  assert not (tmp_path / "negative").exists()  # no job launched
  for job in sweep.make_jobs(sweep.parse_flags(
      ["list", *ONE_DATASET, "--output_dir", str(tmp_path)])):
    os.makedirs(job.output_dir)  # incomplete
  result = _sweep_result("delete_incomplete", *ONE_DATASET, "--output_dir",
                         str(tmp_path))
  assert result.returncode == 2
  assert "no answer (stdin is closed); pass --skip_confirmation" in result.stderr
  assert "Traceback" not in result.stderr


def test_a_running_job_is_neither_launched_nor_deleted(tmp_path):
  flags = ["--output_dir", str(tmp_path), *ONE_DATASET]
  jobs = sweep.make_jobs(sweep.parse_flags(["list", *flags]))
  for job in jobs[1:]:
    os.makedirs(job.output_dir)
  with workdir.lock(jobs[0].output_dir):  # as a live run would
    listing = _sweep_result("list", *flags).stdout
    assert "3 jobs: 0 done, 1 running, 2 incomplete, 0 not launched" in listing
    result = _sweep_result("delete_incomplete", "--skip_confirmation", *flags)
    assert "Deleted 2 incomplete runs; 1 running ones kept." in result.stdout
    assert os.path.isdir(jobs[0].output_dir)
    assert not any(os.path.exists(j.output_dir) for j in jobs[1:])
    result = _sweep_result("launch", "--skip_confirmation", *MISSING_DATA,
                           *flags)
    assert result.returncode == 1  # the two others ran (and failed)
    assert "0 jobs finished, 2 failed" in result.stdout
    assert not os.path.exists(jobs[0].log)  # never started


def test_an_algorithms_block_flag_goes_to_its_jobs_only(tmp_path):
  jobs = sweep.make_jobs(sweep.parse_flags(
      ["list", "--output_dir", str(tmp_path), "--datasets", "ColoredMNIST",
       "--algorithms", "ERM", "Fishr", "--n_hparams", "1", "--n_trials", "1",
       "--single_test_envs", "--config.fishr.params=all",
       "--config.eval_batch_size=64"]))
  for job in jobs:
    assert "--config.eval_batch_size=64" in job.command
    assert ("--config.fishr.params=all" in job.command) == (
        job.args["algorithm"] == "fishr")


def test_forced_hparams_and_dataset_fields_go_only_where_they_apply(tmp_path):
  jobs = sweep.make_jobs(sweep.parse_flags(
      ["list", "--output_dir", str(tmp_path), "--datasets", "ColoredMNIST",
       "PACS", "--algorithms", "ERM", "Fishr", "--n_hparams", "1",
       "--n_trials", "1", "--single_test_envs", "--hparams",
       '{"lambda": 100, "lr": 0.001}', "--config.pretrained_checkpoint=r.npz",
       "--config.digits_source=idx"]))
  for job in jobs:
    fishr = job.args["algorithm"] == "fishr"
    folder = job.args["dataset"] == "PACS"
    assert ("--config.hparams.lambda=100" in job.command) == fishr
    assert "--config.hparams.lr=0.001" in job.command
    assert ("--config.pretrained_checkpoint=r.npz" in job.command) == folder
    assert ("--config.digits_source=idx" in job.command) == (not folder)
  with pytest.raises(errors.ConfigError, match=r"--hparams \['lamda'\]: no "
                     "job's algorithm has them.*Did you mean 'lambda'"):
    sweep.make_jobs(sweep.parse_flags(
        ["list", "--output_dir", str(tmp_path), "--hparams", '{"lamda": 1}']))


def _records_by_run(output_dir):
  from fishr_jax import train  # pylint: disable=g-import-not-at-top
  out = {}
  for name in sorted(os.listdir(output_dir)):
    folder = os.path.join(output_dir, name)
    if os.path.exists(os.path.join(folder, train.RECORDS)):
      out[name] = [{k: v for k, v in r.items()
                    if isinstance(v, float) and k != "step_time"}
                   for r in workdir.read_records(folder)]
  return out


@pytest.mark.slow
def test_runs_launched_as_vectorized_programs_equal_runs_launched_alone(
    tmp_path, tiny_mnist_dir):
  """Fishr x a random hparams sample x 3 test envs (batch size forced, so
  the runs share one program): 1 launch of 3 runs gives each run its folder
  with the records of the run launched alone."""
  common = ["--datasets", "ColoredMNIST", "--algorithms", "Fishr",
            "--n_hparams_from", "1", "--n_hparams", "2", "--n_trials", "1",
            "--steps", "3",
            "--checkpoint_freq", "2", "--single_test_envs",
            "--data_dir", tiny_mnist_dir, "--config.digits_source=idx",
            "--config.eval_batch_size=64", "--hparams", '{"batch_size": 8}', "--skip_confirmation"]
  alone, together = tmp_path / "alone", tmp_path / "together"
  _sweep("launch", "--output_dir", str(alone), *common)
  out = _sweep("launch", "--output_dir", str(together), "--runs_per_program",
               "0", *common)
  assert "in 1 launch(es) of up to all runs each" in out, out[-2000:]
  expected, got = _records_by_run(alone), _records_by_run(together)
  assert sorted(got) == sorted(expected) and len(got) == 3
  for name, records in expected.items():
    assert [sorted(r) for r in got[name]] == [sorted(r) for r in records]
    for a, b in zip(records, got[name]):
      np.testing.assert_allclose([b[k] for k in a], list(a.values()),
                                 rtol=1e-4, atol=1e-6, err_msg=name)
  listing = _sweep("list", "--output_dir", str(together), *common)
  assert "3 done" in listing, listing[-1000:]
