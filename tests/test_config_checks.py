"""Every config field that cannot work fails before any work, naming the
field, the value and what is allowed (fishr_jax/config_checks.py)."""

import pytest

from configs import colored_mnist as colored_mnist_config
from configs import domainbed as domainbed_config
from fishr_jax import config_checks
from fishr_jax import errors


def _set(config, path, value):
  *parents, last = path.split(".")
  for part in parents:
    config = config[part]
  config[last] = value


@pytest.mark.parametrize("path,value,message", [
    ("restarts", 0, r"config.restarts=0: must be an integer >= 1"),
    ("steps", 0, r"config.steps=0: must be an integer >= 1"),
    ("steps", -5, r"config.steps=-5"),
    ("log_every", 0, r"config.log_every=0"),
    ("checkpoint_every", 75, r"multiple of log_every=50"),
    ("lr", float("nan"), r"config.lr=nan: must be a finite number > 0"),
    ("lr", 0.0, r"config.lr=0.0"),
    ("weight_decay", -1.0, r"config.weight_decay=-1.0"),
    ("penalty_anneal_iters", -1, r"config.penalty_anneal_iters=-1"),
    ("algorithm", "fisher", r"'fisher' is not one of .* Did you mean 'fishr'"),
    ("data.source", "mnist", r"config.data.source='mnist'"),
    ("data.data_dir", "/data", r"ignored with data.source='embedded'"),
    ("data.label_noise", 1.5, r"must be a probability"),
    ("data.train_color_flip_probs", (), r"one or more probabilities"),
    ("data.train_color_flip_probs", (0.2, 2.0), r"one or more probabilities"),
    ("compute_dtype", "float16", r"config.compute_dtype='float16'"),
    ("num_devices", -1, r"config.num_devices=-1"),
    ("fishr.ema", 1.0, r"fishr.ema must be in \[0, 1\)"),
    ("fishr.grad_path", "jvp", r"fishr.grad_path must be one of"),
])
def test_colored_mnist_config_errors_name_the_field(path, value, message):
  config = colored_mnist_config.get_config()
  _set(config, path, value)
  with pytest.raises(errors.ConfigError, match=message):
    config_checks.check(config)


@pytest.mark.parametrize("path,value,message", [
    ("test_envs", (7,), r"test_envs=\(7,\): ColoredMNIST's environments are "
     r"0..2 \(\+90%, \+80%, -90%\)"),
    ("test_envs", (0, 1, 2), r"leaves no environment to train on"),
    ("test_envs", (1, 1), r"lists an environment twice"),
    ("test_envs", (-1,), r"test_envs=\(-1,\)"),
    ("steps", 0, r"config.steps=0: must be an integer >= 1"),
    ("checkpoint_freq", 0, r"config.checkpoint_freq=0"),
    ("holdout_fraction", 1.0, r"must be in \(0, 1\)"),
    ("dataset", "CMNIST", r"Did you mean 'ColoredMNIST'"),
    ("algorithm", "ERM_", r"Did you mean 'erm'"),
    ("pretrained_checkpoint", "resnet50.npz",
     r"is ignored by ColoredMNIST, whose MNIST CNN has no pretrained weights"),
    ("digits_source", "idx", None),  # fine for an MNIST dataset
    ("hparams.batch_size", 0, r"hparams.batch_size=0"),
    ("fishr.grad_path", "jvp", r"fishr.grad_path must be one of"),
])
def test_domainbed_config_errors_name_the_field(path, value, message):
  config = domainbed_config.get_config()
  _set(config, path, value)
  if message is None:
    config_checks.check(config)
    return
  with pytest.raises(errors.ConfigError, match=message):
    config_checks.check(config)


def test_folder_dataset_refuses_mnist_only_fields():
  config = domainbed_config.get_config()
  config.dataset, config.digits_source = "PACS", "idx"
  with pytest.raises(errors.ConfigError, match="is ignored by PACS"):
    config_checks.check(config)


def test_unknown_hparam_is_named_with_the_close_match():
  config = domainbed_config.get_config()
  config.hparams["ema_"] = 0.5  # not a field of the block: added unlocked
  with pytest.raises(errors.ConfigError,
                     match=r"fishr on ColoredMNIST has no hparam 'ema_'.*"
                     r"Did you mean 'ema'"):
    config_checks.check(config)
  config = domainbed_config.get_config()
  config.algorithm = "erm"
  config.hparams.lambda_ = 10.0  # Fishr's, not ERM's
  with pytest.raises(errors.ConfigError, match="erm on ColoredMNIST has no "
                     "hparam 'lambda'"):
    config_checks.check(config)


def test_both_default_configs_pass():
  config_checks.check(colored_mnist_config.get_config())
  config_checks.check(colored_mnist_config.get_config("paper"))
  config_checks.check(domainbed_config.get_config())


def test_another_algorithms_block_on_the_command_line_is_refused():
  config = colored_mnist_config.get_config()
  config.algorithm = "erm"
  with pytest.raises(errors.ConfigError,
                     match=r"--config.fishr.lambda_ is ignored: "
                     r"config.algorithm='erm'"):
    config_checks.check_overrides(config, ["steps", "fishr.lambda_"])
  config.algorithm = "fishr"
  config_checks.check_overrides(config, ["steps", "fishr.lambda_"])


def test_arm_needs_whole_eval_batches_and_no_landscape():
  """ARM's support sets are cut from DomainBed's eval batches of 64; its
  network reads a context channel the landscape does not give it."""
  config = domainbed_config.get_config()
  config.algorithm = "arm"
  config_checks.check(config)
  config.eval_batch_size = 100
  with pytest.raises(errors.ConfigError,
                     match=r"eval_batch_size=100: must be a multiple of 64"):
    config_checks.check(config)
  config.eval_batch_size = 128
  config.diagnostics_every = config.checkpoint_freq or 100
  with pytest.raises(errors.ConfigError, match=r"must be 0 for arm"):
    config_checks.check(config)
  cmnist = colored_mnist_config.get_config()
  cmnist.algorithm = "arm"
  cmnist.diagnostics_every = cmnist.log_every
  with pytest.raises(errors.ConfigError, match=r"must be 0 for arm"):
    config_checks.check(cmnist)
