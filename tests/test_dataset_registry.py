"""A new dataset is one entry of domainbed.DATASETS: the loader, the config
checks, the hparams, model selection's tables and the sweep's flag routing
all find it there."""

import dataclasses
import os
import re
import textwrap

import numpy as np
import pytest
from PIL import Image

from configs import domainbed as domainbed_config
from experiments import sweep
from fishr_jax import config_checks
from fishr_jax import errors
from fishr_jax import hparams as hparams_lib
from fishr_jax import model_selection
from fishr_jax.data import domainbed

RECIPE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs",
                      "recipes", "add_a_dataset.md")


def _tiny_environments(options: domainbed.LoadOptions
                       ) -> list[domainbed.ArraySource]:
  rng = np.random.default_rng(options.seed)
  return [domainbed.ArraySource(
      rng.integers(0, 256, (24, 28, 28, 3), dtype=np.uint8),
      rng.integers(0, 2, 24)) for _ in range(3)]


# In memory, from no digits: it takes none of the dataset-specific fields.
TINY = domainbed.DatasetSpec(
    "Tiny", ("a", "b", "c"),
    domainbed.InMemory(2, (28, 28, 3), _tiny_environments),
    backbone="mnist_cnn", small_images=True, checkpoint_freq=2)


@pytest.fixture(autouse=True)
def _register_tiny(monkeypatch):
  monkeypatch.setitem(domainbed.DATASETS, TINY.name, TINY)


def _tiny_config(**fields):
  config = domainbed_config.get_config()
  config.dataset, config.algorithm, config.test_envs = "Tiny", "erm", (2,)
  for name, value in fields.items():
    config[name] = value
  return config


def test_the_loader_builds_it():
  dataset = domainbed.get_dataset("Tiny", seed=3)
  assert dataset.environments == ["a", "b", "c"] and len(dataset) == 3
  assert dataset.num_classes == 2 and dataset.input_shape == (28, 28, 3)
  assert not dataset.is_image_folder and dataset.checkpoint_freq == 2
  assert dataset[0][0]["x"].shape == (28, 28, 3)


def test_config_checks_know_its_environments_and_fields():
  config_checks.check(_tiny_config())
  with pytest.raises(errors.ConfigError,
                     match=r"Tiny's environments are 0..2 \(a, b, c\)"):
    config_checks.check(_tiny_config(test_envs=(3,)))
  for field, value, why in (
      ("digits_source", "idx", "which is not made from MNIST digits"),
      ("image_size", 64, "which is not read from image folders"),
      ("pretrained_checkpoint", "r.npz", "whose MNIST CNN has no pretrained")):
    with pytest.raises(errors.ConfigError,
                       match=rf"config.{field}={value!r}: is ignored by Tiny, "
                       + why):
      config_checks.check(_tiny_config(**{field: value}))


def test_the_same_rules_hold_for_domainbeds_datasets():
  config_checks.check(_tiny_config(dataset="ColoredMNIST", digits_source="idx"))
  config_checks.check(_tiny_config(dataset="PACS", image_size=64,
                                   pretrained_checkpoint="r.npz"))
  with pytest.raises(errors.ConfigError, match="is ignored by ColoredMNIST"):
    config_checks.check(_tiny_config(dataset="ColoredMNIST", image_size=64))
  with pytest.raises(errors.ConfigError, match="is ignored by PACS"):
    config_checks.check(_tiny_config(dataset="PACS", digits_source="tfds"))


def test_hparams_follow_its_image_size_class(monkeypatch):
  assert hparams_lib.default_hparams("erm", "Tiny")["lr"] == 1e-3
  assert hparams_lib.default_hparams("erm", "Tiny")["batch_size"] == 64
  monkeypatch.setitem(domainbed.DATASETS, "Tiny", dataclasses.replace(
      TINY, small_images=False, batch_size_log2_high=4.0))
  assert hparams_lib.default_hparams("erm", "Tiny")["lr"] == 5e-5
  assert all(hparams_lib.random_hparams("erm", "Tiny", seed)["batch_size"] < 16
             for seed in range(20))


def test_model_selection_labels_and_orders_its_columns():
  records = [{"args": {"dataset": name}} for name in
             ("Unregistered", "SVIRO", "Tiny", "DomainNet", "ColoredMNIST")]
  assert model_selection.dataset_names(records) == [
      "ColoredMNIST", "DomainNet", "Tiny", "SVIRO", "Unregistered"]
  assert model_selection.environment_names("Tiny", records) == ["a", "b", "c"]


def test_the_sweep_routes_dataset_fields_by_its_spec(tmp_path):
  jobs = sweep.make_jobs(sweep.parse_flags(
      ["list", "--output_dir", str(tmp_path), "--datasets", "Tiny",
       "ColoredMNIST", "PACS", "--algorithms", "ERM", "--n_hparams", "1",
       "--n_trials", "1", "--single_test_envs", "--config.digits_source=idx",
       "--config.image_size=32", "--config.pretrained_checkpoint=r.npz",
       "--config.eval_batch_size=64"]))
  assert sorted(j.args["test_envs"][0] for j in jobs
                if j.args["dataset"] == "Tiny") == [0, 1, 2]
  reads = {"Tiny": set(), "ColoredMNIST": {"digits_source"},
           "PACS": {"image_size", "pretrained_checkpoint"}}
  for job in jobs:
    given = {flag[len("--config."):].split("=")[0] for flag in job.command
             if flag.startswith("--config.") and "=" in flag}
    dataset_fields = given & {"digits_source", "image_size",
                              "pretrained_checkpoint"}
    assert dataset_fields == reads[job.args["dataset"]], job.command
    assert "eval_batch_size" in given
  with pytest.raises(errors.ConfigError, match="Did you mean 'Tiny'"):
    sweep.check_dataset("tiny")


def test_the_recipes_entry_is_all_a_folder_dataset_needs(monkeypatch,
                                                        tmp_path):
  with open(RECIPE) as f:
    (entry,) = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  # As written there, inside DATASETS: an expression and a comma.
  namespace = dict(vars(domainbed))
  (spec,) = eval(textwrap.dedent(entry), namespace)  # pylint: disable=eval-used
  monkeypatch.setitem(domainbed.DATASETS, spec.name, spec)
  for domain in spec.data.domains:
    for label in ("empty", "person"):
      folder = tmp_path / spec.data.folder / domain / label
      folder.mkdir(parents=True)
      Image.new("RGB", (40, 30)).save(folder / "0.png")
  dataset = domainbed.get_dataset(spec.name, str(tmp_path), image_size=32)
  assert dataset.environments == list(spec.environments)
  assert dataset.num_classes == 2 and dataset.input_shape == (32, 32, 3)
  config = _tiny_config(dataset=spec.name, test_envs=(9,), image_size=32,
                        data_dir=str(tmp_path), pretrained_checkpoint="r.npz")
  config_checks.check(config)
  with pytest.raises(errors.ConfigError, match="is ignored by SVIRO"):
    config_checks.check(_tiny_config(dataset=spec.name, digits_source="idx"))
  assert hparams_lib.default_hparams("erm", spec.name)["lr"] == 5e-5


@pytest.mark.slow
def test_a_run_trains_on_it(tmp_path):
  """The entry alone makes a run: its loader, backbone, checkpoint_freq."""
  from fishr_jax import train_domainbed  # pylint: disable=g-import-not-at-top
  config = _tiny_config(steps=5, eval_batch_size=32)
  config.hparams.batch_size = 4
  config_checks.check(config)
  records = train_domainbed.train_and_evaluate(config, str(tmp_path))
  # Every checkpoint_freq = 2 steps, and the last.
  assert [r["step"] for r in records] == [0, 2, 4]
  assert records[-1]["args"]["checkpoint_freq"] == TINY.checkpoint_freq
  assert {f"env{e}_{s}_acc" for e in range(3) for s in ("in", "out")} <= set(
      records[-1])
