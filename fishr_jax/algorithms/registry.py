"""Name -> algorithm factory. A new algorithm is one module in this package
that decorates its factory with `@register("name", domainbed=...)`; nothing
else to edit.

A factory is `make(network, num_domains, config) -> base.Algorithm`. Its
`DomainBedSpec` gives DomainBed's name for it, its own hparams (default and
random-search sampler, DomainBed's names) and how those hparams set the
algorithm's config fields.
"""

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class DomainBedSpec:
  name: str  # DomainBed's class name, e.g. "Fishr"
  hparams: dict[str, tuple[Any, Callable]]  # name -> (default, sampler)
  # DomainBed hparams -> config fields, e.g. {"fishr": {...},
  # "penalty_anneal_iters": ..., "reset_optimizer_at_anneal": True}.
  to_config: Callable[[dict[str, Any]], dict[str, Any]]


_FACTORIES: dict[str, Callable] = {}
_DOMAINBED: dict[str, DomainBedSpec] = {}


def register(name: str, domainbed: DomainBedSpec | None = None
             ) -> Callable[[Callable], Callable]:
  def decorator(factory: Callable) -> Callable:
    if name in _FACTORIES:
      raise ValueError(f"Algorithm {name!r} is registered twice.")
    _FACTORIES[name] = factory
    if domainbed is not None:
      _DOMAINBED[name] = domainbed
    return factory
  return decorator


def domainbed_spec(name: str) -> DomainBedSpec:
  get(name)
  if name not in _DOMAINBED:
    raise ValueError(f"Algorithm {name!r} has no DomainBed hparams.")
  return _DOMAINBED[name]


def _import_all() -> None:
  package = importlib.import_module("fishr_jax.algorithms")
  for module in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"fishr_jax.algorithms.{module.name}")


def names() -> list[str]:
  _import_all()
  return sorted(_FACTORIES)


def get(name: str) -> Callable:
  _import_all()
  if name not in _FACTORIES:
    raise ValueError(f"Unknown algorithm {name!r}; known: {sorted(_FACTORIES)}.")
  return _FACTORIES[name]
