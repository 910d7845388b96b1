"""Domain-generalization algorithms, one module each, selected by name."""

from fishr_jax.algorithms.base import Algorithm
from fishr_jax.algorithms.registry import get, names, register


def make_algorithm(name, model, num_domains, config) -> Algorithm:
  """The algorithm `name` for `model` over `num_domains` training domains."""
  return get(name)(model, num_domains, config)
