"""Runs trained as one vectorized program equal the same runs trained one by
one (fishr_jax/vectorized.py), on 1 device and on 2 fake devices (runs over
devices, and each run's batch over devices)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from fishr_jax import parallel
from fishr_jax import train
from fishr_jax import vectorized
from fishr_jax import workdir as workdir_lib
from fishr_jax.algorithms import base
from fishr_jax.algorithms import fishr
from tests import conftest
from tests import vectorized_run

# Every test here compares float32 computations (and vectorized_run caches
# the runs alone per process: all at one precision).
pytestmark = pytest.mark.usefixtures("float32_matmuls")

# Relative differences of float32 rounding after a few Adam steps.
TOLERANCE = {"params": 1e-4, "alg_state": 1e-5, "loss": 1e-5, "step": 0}
# DANN's discriminator has near-zero gradients (ReLU units off on the tiny
# batch) that Adam scales up to steps of ~lr: one run jitted vs. eager
# already differs by 6e-5 relative after 5 steps.
# CausIRL_MMD's kernel exp(-1000 d^2) takes d^2 = |a|^2 + |b|^2 - 2 a.b in
# float32, where rounding is large next to d^2 for nearby features; its
# K runs together differ from the runs alone by 8.3e-4 (parameters) and
# 7.4e-5 (losses) after 5 steps.
TOLERANCE_FOR = {"dann": {"params": 1e-3}, "cdann": {"params": 1e-3},
                 "causirl_mmd": {"params": 2e-3, "loss": 2e-4}}


def _assert_close(differences: dict[str, float], case: str = "") -> None:
  tolerance = {**TOLERANCE, **TOLERANCE_FOR.get(case, {})}
  for part, worst in differences.items():
    assert worst <= tolerance[part], (part, differences)


@pytest.mark.parametrize("case", sorted(vectorized_run.CASES))
def test_runs_trained_together_equal_the_runs_alone(case):
  _assert_close(vectorized_run.largest_differences(
      case, [0, 1], parallel.make_runs_mesh(2)), case)


@pytest.fixture(scope="module")
def two_device_differences(tmp_path_factory):
  folder = conftest.made_in_background(tmp_path_factory, "vectorized")
  return json.loads((folder / "differences.json").read_text())


@pytest.mark.slow
def test_groups_of_restarts_on_two_devices_equal_the_restarts_alone(
    two_device_differences):
  """3 restarts 2 to a program (a program of 2, then of 1) on 2 devices."""
  for group_step in ("vmap", "each"):
    _assert_close(two_device_differences[f"colored_mnist {group_step}"])


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["(2, 1)", "(1, 2)"])
@pytest.mark.parametrize("case", sorted(vectorized_run.TWO_DEVICE_CASES))
def test_runs_together_on_two_devices_equal_the_runs_alone(
    two_device_differences, case, shape):
  _assert_close(two_device_differences[f"{case} {shape}"], case)


def test_a_program_that_ignored_the_per_run_values_would_fail_the_check(
    monkeypatch):
  """The equality above is not vacuous: every run taking the first run's
  values makes the later runs differ far beyond rounding."""
  monkeypatch.setattr(vectorized, "split_hparams",
                      lambda runs: (runs[0], {}))
  differences = vectorized_run.largest_differences(
      "fishr_closed_form", [0, 1], parallel.make_runs_mesh(2))
  assert differences["params"] > 1e-2, differences


def _hparams(**changes) -> train.StepSpec:
  hparams = train.StepSpec(
      fishr.Config(lambda_=10.0, ema=0.9), base.Schedule(
          penalty_anneal_iters=5, reset_optimizer_at_anneal=True), 1e-3, 0.0)
  for part, fields in changes.items():
    if isinstance(fields, dict):
      fields = dataclasses.replace(getattr(hparams, part), **fields)
    hparams = dataclasses.replace(hparams, **{part: fields})
  return hparams


def test_only_the_values_that_differ_become_arrays():
  shared, varying = vectorized.split_hparams([
      _hparams(), _hparams(algorithm={"lambda_": 20.0}, lr=1e-2,
                           schedule={"penalty_anneal_iters": 7})])
  assert shared == _hparams()
  assert sorted(varying) == ["algorithm.lambda_", "lr",
                             "schedule.penalty_anneal_iters"]
  np.testing.assert_array_equal(varying["algorithm.lambda_"], [10.0, 20.0])
  assert varying["schedule.penalty_anneal_iters"].dtype == np.int32
  assert varying["lr"].dtype == np.float32


@pytest.mark.parametrize("other", [
    {"algorithm": {"grad_path": "vmap"}},  # another program
    {"algorithm": {"ema": 0.0}},  # no moving average: another state
    {"schedule": {"reset_optimizer_at_anneal": False}},
])
def test_runs_that_differ_in_more_than_scalars_are_refused(other):
  assert vectorized.group_key(_hparams()) != vectorized.group_key(
      _hparams(**other))
  with pytest.raises(ValueError, match="cannot train as one program"):
    vectorized.split_hparams([_hparams(), _hparams(**other)])


def test_zero_weight_decay_and_anneal_group_with_nonzero_ones():
  assert vectorized.group_key(_hparams()) == vectorized.group_key(
      _hparams(weight_decay=1e-4, schedule={"penalty_anneal_iters": 0}))


def test_stack_and_unstack_round_trip_keys_and_arrays():
  trees = [{"w": np.full((2,), i, np.float32), "rng": jax.random.key(i)}
           for i in range(3)]
  stacked = vectorized.stack(trees)
  assert stacked["w"].shape == (3, 2)
  for i, tree in enumerate(trees):
    lane = vectorized.unstack(stacked, i)
    np.testing.assert_array_equal(lane["w"], tree["w"])
    np.testing.assert_array_equal(jax.random.key_data(lane["rng"]),
                                  jax.random.key_data(tree["rng"]))


def _colored_mnist(tiny_mnist_dir, **changes):
  from configs import colored_mnist  # pylint: disable=g-import-not-at-top
  config = colored_mnist.get_config()
  config.update(restarts=3, steps=6, hidden_dim=8, log_every=2,
                checkpoint_every=2, penalty_anneal_iters=3, **changes)
  config.data.update(source="idx", data_dir=tiny_mnist_dir)
  return config


def _numbers(records):
  return [{k: v for k, v in r.items() if isinstance(v, float)
           and k != "step_time"} for r in records]


def _restart_records(workdir, restart):
  return workdir_lib.read_records(os.path.join(workdir, f"restart_{restart}"))


@pytest.mark.parametrize("group_step", ["vmap", "each"])
def test_restarts_in_one_program_write_the_files_of_restarts_alone(
    tiny_mnist_dir, tmp_path, group_step):
  """Each restart of a program has its own folder, records (equal to the
  restart trained alone) and done; one resumes alone afterwards."""
  from fishr_jax import train  # pylint: disable=g-import-not-at-top
  from fishr_jax import train_colored_mnist  # pylint: disable=g-import-not-at-top
  alone, together = str(tmp_path / "alone"), str(tmp_path / "together")
  train_colored_mnist.train_and_evaluate(_colored_mnist(tiny_mnist_dir), alone)
  train_colored_mnist.train_and_evaluate(
      _colored_mnist(tiny_mnist_dir, runs_per_program=0,
                     group_step=group_step), together)
  for restart in range(3):
    folder = os.path.join(together, f"restart_{restart}")
    assert os.path.exists(os.path.join(folder, train.DONE))
    assert sorted(os.listdir(os.path.join(folder, train.CHECKPOINTS))) == [
        "5", "6"]
    expected = _numbers(_restart_records(alone, restart))
    got = _numbers(_restart_records(together, restart))
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    for a, b in zip(expected, got):
      np.testing.assert_allclose([b[k] for k in a], list(a.values()),
                                 rtol=1e-4, atol=1e-6)
  # Restart 1 loses its `done` and last checkpoint: alone, it resumes from
  # step 5 and ends with the same records.
  folder = os.path.join(together, "restart_1")
  os.remove(os.path.join(folder, train.DONE))
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(folder, train.CHECKPOINTS, "6"))
  before = _numbers(_restart_records(together, 1))
  train_colored_mnist.train_and_evaluate(
      _colored_mnist(tiny_mnist_dir, runs_per_program=1), together)
  after = _numbers(_restart_records(together, 1))
  for a, b in zip(before, after):
    np.testing.assert_allclose([b[k] for k in a], list(a.values()),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5])
def test_dropout_equals_flax_dropout_and_takes_a_traced_rate(rate):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fishr_jax import models  # pylint: disable=g-import-not-at-top
  x = jnp.arange(1.0, 201.0).reshape(4, 50)
  rngs = {"dropout": jax.random.key(3)}
  expected = nn.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(
      models.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs),
      expected)
  traced = jax.vmap(lambda r: models.Dropout(r).apply(
      {}, x, deterministic=False, rngs=rngs))(jnp.full((2,), rate))
  np.testing.assert_allclose(traced, np.stack([expected] * 2), rtol=1e-6)
  if rate:
    assert 0 < np.mean(np.asarray(expected) == 0) < 1
