"""Name -> algorithm factory. A new algorithm is one module in this package
that decorates its factory with `@register("name")`; nothing else to edit.

A factory is `make(network, num_domains, config) -> base.Algorithm`.
"""

import importlib
import pkgutil
from typing import Callable

_FACTORIES: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
  def decorator(factory: Callable) -> Callable:
    if name in _FACTORIES:
      raise ValueError(f"Algorithm {name!r} is registered twice.")
    _FACTORIES[name] = factory
    return factory
  return decorator


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
