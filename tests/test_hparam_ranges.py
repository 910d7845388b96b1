"""Every number whose range is part of its meaning is checked in one place
(fishr_jax/ranges.py), with the range in the message: DomainBed's hparams,
every algorithm's Config, the Colored MNIST blocks (issue 19)."""

import dataclasses
import math
import os
import subprocess
import sys

import pytest

from configs import colored_mnist as colored_mnist_config
from configs import domainbed as domainbed_config
from fishr_jax import config_checks
from fishr_jax import errors
from fishr_jax import hparams as hparams_lib
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_numeric_hparam_and_config_field_has_a_range():
  for name in registry.names():
    for hparam, (default, _) in hparams_lib.specs(name, "PACS").items():
      if isinstance(default, bool):
        continue
      assert hparam in ranges.HPARAMS, (name, hparam)
      assert ranges.HPARAMS[hparam].contains(default), (name, hparam)
    for f in dataclasses.fields(registry.get(name).config_class):
      if f.type in (float, int, "float", "int") or "int | None" in str(f.type):
        assert "range" in f.metadata, (name, f.name)


@pytest.mark.parametrize("name", sorted(registry.names()))
def test_the_random_search_draws_inside_the_ranges(name):
  for seed in range(1, 30):
    for hparam, value in hparams_lib.random_hparams(name, "PACS", seed).items():
      ranges.check_hparam(hparam, value)
    for hparam, value in hparams_lib.random_hparams(
        name, "ColoredMNIST", seed).items():
      ranges.check_hparam(hparam, value)


@pytest.mark.parametrize("algorithm,field,value,message", [
    ("fishr", "lambda", -1000.0,
     r"config.hparams.lambda_ must be >= 0; got -1000.0"),
    ("fishr", "ema", 1.5, r"config.hparams.ema must be in \[0, 1\); got 1.5"),
    ("fishr", "lr", -0.001, r"config.hparams.lr must be > 0; got -0.001"),
    ("fishr", "lr", float("nan"), r"config.hparams.lr must be > 0; got nan"),
    ("fishr", "weight_decay", -1e-4, r"weight_decay must be >= 0"),
    ("fishr", "resnet_dropout", 1.0, r"resnet_dropout must be in \[0, 1\)"),
    ("fishr", "penalty_anneal_iters", -1,
     r"penalty_anneal_iters must be an integer >= 0"),
    ("irm", "irm_lambda", -1.0, r"irm_lambda must be >= 0"),
    ("vrex", "vrex_lambda", -1.0, r"vrex_lambda must be >= 0"),
    ("groupdro", "groupdro_eta", -0.1, r"groupdro_eta must be >= 0"),
    ("mixup", "mixup_alpha", 0.0, r"mixup_alpha must be > 0"),
    ("mmd", "mmd_gamma", -1.0, r"mmd_gamma must be >= 0"),
    ("coral", "mmd_gamma", float("inf"), r"mmd_gamma must be >= 0; got inf"),
])
def test_a_forced_domainbed_hparam_out_of_range_is_refused(
    algorithm, field, value, message):
  config = domainbed_config.get_config()
  config.algorithm = algorithm
  config.hparams[field + ("_" if field == "lambda" else "")] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_checks.check(config)


@pytest.mark.parametrize("field,value,message", [
    ("fishr.lambda_", -1000.0,
     r"config.fishr.lambda_ must be >= 0 \(a penalty weight\); got -1000.0"),
    ("irm.lambda_", -1.0, r"config.irm.lambda_ must be >= 0"),
    ("vrex.lambda_", -1.0, r"config.vrex.lambda_ must be >= 0"),
    ("mixup.alpha", -0.2, r"config.mixup.alpha must be > 0"),
    ("groupdro.eta", -0.01, r"config.groupdro.eta must be >= 0"),
    ("fishr.vmap_chunk_size", 0, r"config.fishr.vmap_chunk_size must be an "
     r"integer >= 1 \(or unset\)"),
])
def test_a_colored_mnist_block_out_of_range_is_refused(field, value, message):
  config = colored_mnist_config.get_config()
  block, name = field.split(".")
  config.algorithm = block
  config[block][name] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_checks.check(config)


def test_the_configs_refuse_out_of_range_values_from_the_api_too():
  from fishr_jax.algorithms import fishr, groupdro  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match=r"fishr.lambda_ must be >= 0"):
    fishr.Config(lambda_=-1.0)
  with pytest.raises(errors.ConfigError, match=r"groupdro.eta must be >= 0"):
    groupdro.Config(eta=-1.0)
  with pytest.raises(errors.ConfigError,
                     match=r"schedule.penalty_warmup_weight must be >= 0"):
    base.Schedule(penalty_warmup_weight=-1.0)
  with pytest.raises(errors.ConfigError,
                     match=r"schedule.penalty_anneal_iters must be an integer"):
    base.Schedule(penalty_anneal_iters=1.5)
  assert fishr.Config(lambda_=0.0).lambda_ == 0.0  # the edges are allowed


def test_range_descriptions():
  assert ranges.POSITIVE.describe() == "> 0"
  assert ranges.DECAY.describe() == "in [0, 1)"
  assert ranges.COUNT.describe() == "an integer >= 0"
  assert not ranges.POSITIVE.contains(math.nan)
  assert not ranges.NON_NEGATIVE.contains(True)
  assert not ranges.NON_NEGATIVE.contains(None)


@pytest.mark.parametrize("config,flag,message", [
    ("domainbed.py", "--config.hparams.lr=-0.001",
     "error: config.hparams.lr must be > 0; got -0.001."),
    ("colored_mnist.py", "--config.fishr.lambda_=-1000",
     "error: config.fishr.lambda_ must be >= 0 (a penalty weight); got "
     "-1000.0."),
])
def test_the_command_line_refuses_them_with_exit_2_and_writes_nothing(
    tmp_path, config, flag, message):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "fishr_jax.main", "--config",
       os.path.join(ROOT, "configs", config), "--workdir", str(workdir), flag],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == message
  assert not workdir.exists()
