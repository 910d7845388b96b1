"""DomainBed's hyperparameters: defaults and random-search distributions.

Exactly DomainBed's scheme (domainbed/hparams_registry.py): each hparam has a
default and a sampler; sample `hparams_seed` = 0 is the defaults, any other
draws every hparam from its own np.random.RandomState seeded with
seed_hash(seed_hash(hparams_seed, trial_seed), name), so values do not depend
on which other hparams exist. The algorithm-specific entries live with each
algorithm (`registry.DomainBedSpec`), the shared ones here.
"""

from typing import Any, Callable

import numpy as np

from fishr_jax.algorithms import registry
from fishr_jax.data import domainbed
from fishr_jax.data.domainbed import seed_hash  # pylint: disable=unused-import

Sampler = Callable[[np.random.RandomState], Any]
HParamSpecs = dict[str, tuple[Any, Sampler]]


def shared_specs(algorithm: str, dataset: str) -> HParamSpecs:
  """The hparams every algorithm has; their ranges depend on the dataset's
  spec (small_images, batch_size_log2_high)."""
  spec = domainbed.dataset_spec(dataset)
  specs: HParamSpecs = {
      "data_augmentation": (True, lambda r: True),
      "resnet18": (False, lambda r: False),
      "resnet_dropout": (0.0, lambda r: float(r.choice([0.0, 0.1, 0.5]))),
      "class_balanced": (False, lambda r: False),
      "nonlinear_classifier": (False, lambda r: bool(r.choice([False, False]))),
  }
  # log2 of the largest batch size the random search draws: DomainBed's for
  # the image size unless the spec sets its own (DomainNet's is lower).
  high = spec.batch_size_log2_high
  if spec.small_images:
    high = 9 if high is None else high
    specs["lr"] = (1e-3, lambda r: 10**r.uniform(-4.5, -2.5))
    specs["weight_decay"] = (0.0, lambda r: 0.0)
    specs["batch_size"] = (64, lambda r: int(2**r.uniform(3, high)))
  else:
    high = 5.5 if high is None else high
    specs["lr"] = (5e-5, lambda r: 10**r.uniform(-5, -3.5))
    specs["weight_decay"] = (0.0, lambda r: 10**r.uniform(-6, -2))
    specs["batch_size"] = (32, lambda r: int(2**r.uniform(3, high)))
    if algorithm == "arm":  # DomainBed: ARM's support sets of 8 examples
      specs["batch_size"] = (8, lambda r: 8)
  return specs


def specs(algorithm: str, dataset: str) -> HParamSpecs:
  """Every hparam of `algorithm` (a fishr-jax name) on `dataset`."""
  own = registry.domainbed_spec(algorithm).hparams_for(
      domainbed.dataset_spec(dataset).small_images)
  return {**shared_specs(algorithm, dataset), **own}


def _draw(specs_: HParamSpecs, random_seed: int) -> dict[str, Any]:
  return {name: sampler(np.random.RandomState(seed_hash(random_seed, name)))
          for name, (_, sampler) in specs_.items()}


def default_hparams(algorithm: str, dataset: str) -> dict[str, Any]:
  return {name: default for name, (default, _) in specs(algorithm, dataset).items()}


def random_hparams(algorithm: str, dataset: str, seed: int) -> dict[str, Any]:
  return _draw(specs(algorithm, dataset), seed)


def sample_hparams(algorithm: str, dataset: str, hparams_seed: int,
                   trial_seed: int) -> dict[str, Any]:
  """What DomainBed's train.py uses for a run: sample 0 = the defaults."""
  if hparams_seed == 0:
    return default_hparams(algorithm, dataset)
  return random_hparams(algorithm, dataset, seed_hash(hparams_seed, trial_seed))
