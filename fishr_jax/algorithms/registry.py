"""Name -> algorithm. A new algorithm is one module in this package that
decorates its factory with `@register("name", Config, DomainBedSpec(...))`;
nothing else to edit: both experiments' configs, the DomainBed hparams and
the test suite find it here.

A factory is `make(network, num_domains, config, schedule, mesh) ->
base.Algorithm`, with `config` an instance of the module's frozen `Config`
dataclass, `schedule` a `base.Schedule` and `mesh` the data-parallel mesh
the step will run on (None: one device). Its `DomainBedSpec` gives
DomainBed's name for it, its own hparams (default and random-search sampler,
DomainBed's names) and how those hparams set its config and schedule fields.
An algorithm whose network reads more input channels than the data has
(ARM appends a context channel) registers `added_input_channels`; the
experiments build the network for them (`network_input`).
"""

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

from fishr_jax import errors

HParams = dict[str, Any]


def _no_fields(hparams: HParams) -> dict[str, Any]:
  del hparams
  return {}


@dataclasses.dataclass(frozen=True)
class DomainBedSpec:
  name: str  # DomainBed's class name, e.g. "Fishr"
  hparams: dict[str, tuple[Any, Callable]]  # name -> (default, sampler)
  # DomainBed hparams (its own and the shared ones) -> fields of the
  # algorithm's Config, e.g. {"lambda_": h["lambda"], "ema": h["ema"]}.
  to_config: Callable[[HParams], dict[str, Any]] = _no_fields
  # DomainBed hparams -> fields of base.Schedule, e.g.
  # {"penalty_anneal_iters": h["penalty_anneal_iters"]}.
  to_schedule: Callable[[HParams], dict[str, Any]] = _no_fields
  # Hparams whose default and sampler depend on the dataset: small_images
  # (DomainBed's SMALL_IMAGES) -> {name: (default, sampler)} (DANN's lr_d).
  by_image_size: Callable[[bool], dict[str, tuple[Any, Callable]]] = (
      lambda small_images: {})

  def hparams_for(self, small_images: bool) -> dict[str, tuple[Any, Callable]]:
    """Every own hparam of the algorithm on a dataset of that image size."""
    return {**self.hparams, **self.by_image_size(small_images)}


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  make: Callable
  config_class: type
  domainbed: DomainBedSpec
  added_input_channels: int = 0


_ENTRIES: dict[str, Entry] = {}


def register(name: str, config_class: type, domainbed: DomainBedSpec, *,
             added_input_channels: int = 0
             ) -> Callable[[Callable], Callable]:
  if not (dataclasses.is_dataclass(config_class)
          and config_class.__dataclass_params__.frozen):
    raise TypeError(f"Algorithm {name!r}: its config must be a frozen "
                    f"dataclass, got {config_class!r}.")

  def decorator(factory: Callable) -> Callable:
    if name in _ENTRIES:
      raise ValueError(f"Algorithm {name!r} is registered twice.")
    _ENTRIES[name] = Entry(name, factory, config_class, domainbed,
                           added_input_channels)
    return factory
  return decorator


def _import_all() -> None:
  package = importlib.import_module("fishr_jax.algorithms")
  for module in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"fishr_jax.algorithms.{module.name}")


def names() -> list[str]:
  _import_all()
  return sorted(_ENTRIES)


def get(name: str) -> Entry:
  _import_all()
  if name not in _ENTRIES:
    raise errors.ConfigError(
        f"Unknown algorithm {name!r}; known: {sorted(_ENTRIES)}.")
  return _ENTRIES[name]


def domainbed_spec(name: str) -> DomainBedSpec:
  return get(name).domainbed
