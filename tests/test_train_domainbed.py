"""DomainBed runs: records, hparams, the done marker, and bitwise resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import domainbed as domainbed_config
from fishr_jax import hparams as hparams_lib
from fishr_jax import train_domainbed
from fishr_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("step_time",)


@pytest.fixture(autouse=True)
def _tiny_digits(tiny_mnist_dir, monkeypatch):
  monkeypatch.setenv("TINY_MNIST_DIR", tiny_mnist_dir)


def _config(**overrides):
  config = domainbed_config.get_config()
  config.digits_source = "idx"
  config.data_dir = os.environ["TINY_MNIST_DIR"]
  config.steps = 5
  config.checkpoint_freq = 2
  config.hparams.batch_size = 8
  config.eval_batch_size = 512
  for key, value in overrides.items():
    config[key] = value
  return config


def test_hparams_sample_zero_is_default_and_overrides_win():
  config = _config(algorithm="fishr")
  config.hparams.batch_size = None
  resolved = train_domainbed.resolve_hparams(config)
  assert resolved == hparams_lib.default_hparams("fishr", "ColoredMNIST")
  config.hparams.lambda_ = 10.0
  config.hparams.ema = 0.5
  resolved = train_domainbed.resolve_hparams(config)
  assert resolved["lambda"] == 10.0 and resolved["ema"] == 0.5
  config.hparams_seed = 3
  config.hparams.lambda_ = None
  sampled = train_domainbed.resolve_hparams(config)
  assert sampled == {**hparams_lib.random_hparams(
      "fishr", "ColoredMNIST", hparams_lib.seed_hash(3, 0)), "ema": 0.5}


def test_random_hparams_follow_domainbed_seeding():
  # DomainBed: RandomState(seed_hash(seed_hash(hparams_seed, trial_seed), name)).
  import hashlib
  md5 = lambda s: int(hashlib.md5(s.encode()).hexdigest(), 16) % 2**31
  seed = md5("(2, 1)")
  r = np.random.RandomState(md5(f"({seed}, 'lambda')"))
  assert hparams_lib.sample_hparams("fishr", "PACS", 2, 1)["lambda"] == 10**r.uniform(1, 4)
  defaults = hparams_lib.default_hparams("fishr", "PACS")
  assert (defaults["lambda"], defaults["penalty_anneal_iters"], defaults["ema"],
          defaults["lr"], defaults["batch_size"]) == (1000.0, 1500, 0.95, 5e-5, 32)


@pytest.mark.slow
def test_run_writes_domainbed_records(tmp_path):
  records = train_domainbed.train_and_evaluate(_config(algorithm="fishr"),
                                               str(tmp_path))
  assert [r["step"] for r in records] == [0, 2, 4]
  lines = (tmp_path / "results.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [0, 2, 4]
  record = records[-1]
  for env in range(3):
    for split in ("in", "out"):
      assert 0.0 <= record[f"env{env}_{split}_acc"] <= 1.0
  assert record["args"]["algorithm"] == "Fishr"
  assert record["args"]["test_envs"] == [2]
  assert record["hparams"]["batch_size"] == 8 and record["hparams"]["lambda"] == 1000.0
  assert {"loss", "nll", "penalty", "step_time", "epoch"} <= set(record)
  assert (tmp_path / "done").exists()
  # A finished run is not run again.
  again = train_domainbed.train_and_evaluate(_config(algorithm="fishr"), str(tmp_path))
  assert again == [json.loads(l) for l in lines]


def _command(workdir, steps, freq):
  return [sys.executable, "-m", "fishr_jax.main",
          "--config", os.path.join(ROOT, "configs", "domainbed.py"),
          "--workdir", str(workdir), "--config.algorithm=fishr",
          f"--config.steps={steps}", f"--config.checkpoint_freq={freq}",
          "--config.hparams.batch_size=8", "--config.hparams.penalty_anneal_iters=10",
          "--config.eval_batch_size=512", "--config.digits_source=idx",
          f"--config.data_dir={os.environ['TINY_MNIST_DIR']}"]


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return step, restored["params"]


def _strip_timing(path):
  records = [json.loads(l) for l in open(path)]
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.slow
def test_killed_run_resumes_bitwise(tmp_path):
  steps, freq = 30, 5
  reference, resumed = tmp_path / "reference", tmp_path / "resumed"
  subprocess.run(_command(reference, steps, freq), cwd=ROOT, check=True,
                 capture_output=True, timeout=600)
  proc = subprocess.Popen(_command(resumed, steps, freq), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  records = resumed / "results.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if records.exists() and len(records.read_text().splitlines()) >= 3:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (resumed / "done").exists(), "the run ended before it was killed"
  killed_at = len(records.read_text().splitlines())
  assert killed_at < steps // freq
  out = subprocess.run(_command(resumed, steps, freq), cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=600)
  assert "Resuming" in out.stdout
  assert _strip_timing(resumed / "results.jsonl") == _strip_timing(
      reference / "results.jsonl")
  (step_a, params_a), (step_b, params_b) = _final_params(reference), _final_params(resumed)
  assert step_a == step_b == steps
  flat_a = jax_leaves(params_a)
  flat_b = jax_leaves(params_b)
  assert all(np.array_equal(a, b) for a, b in zip(flat_a, flat_b))


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_run_that_diverges_in_a_program_stops_alone(tmp_path):
  """Two Fishr runs, one with a learning rate that blows up, share a
  program: the diverged one stops at its record, unmarked; the other
  finishes as it would alone; DivergedError names the diverged one."""
  from fishr_jax import errors  # pylint: disable=g-import-not-at-top
  from fishr_jax import train  # pylint: disable=g-import-not-at-top
  good, bad = _config(algorithm="fishr"), _config(algorithm="fishr", seed=1)
  bad.hparams.lr = 1e30
  assert train_domainbed.program_key(good) == train_domainbed.program_key(bad)
  workdirs = [str(tmp_path / "good"), str(tmp_path / "bad")]
  with pytest.raises(errors.DivergedError,
                     match=r"diverged by step (\d+): .* is in .*bad") as caught:
    train_domainbed.train_runs([good, bad], workdirs)
  step = int(caught.value.args[0].split("diverged by step ")[1].split(":")[0])
  assert os.path.exists(os.path.join(workdirs[0], train.DONE))
  assert not os.path.exists(os.path.join(workdirs[1], train.DONE))
  assert workdir_lib.read_records(workdirs[1])[-1]["step"] == step < 4
  alone = train_domainbed.train_and_evaluate(good, str(tmp_path / "alone"))
  together = workdir_lib.read_records(workdirs[0])
  assert [r["step"] for r in together] == [r["step"] for r in alone]
  for a, b in zip(alone, together):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    assert b["env0_out_acc"] == pytest.approx(a["env0_out_acc"], abs=1e-9)
