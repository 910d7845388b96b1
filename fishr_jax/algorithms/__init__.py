"""Domain-generalization algorithms, one module each, selected by name."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fishr_jax.algorithms.base import Algorithm, Network, Schedule
from fishr_jax.algorithms.registry import get, names, register


def make_algorithm(name: str, network: Network | nn.Module, num_domains: int,
                   config: Any = None, schedule: Schedule | None = None,
                   mesh: Any = None) -> Algorithm:
  """The algorithm `name` for `network` over `num_domains` training domains.

  config: an instance of the algorithm's `Config` (None: its defaults);
  schedule: a `Schedule` (None: DomainBed's, no annealing); mesh: the
  data-parallel mesh the step runs on (None: one device). A plain flax
  module (no frozen collections, no dropout) may stand for its
  `Network.from_module(module)`.
  """
  entry = get(name)
  if isinstance(network, nn.Module):
    network = Network.from_module(network)
  if config is None:
    config = entry.config_class()
  if not isinstance(config, entry.config_class):
    raise TypeError(f"{name} takes a {entry.config_class.__module__}.Config, "
                    f"got {type(config).__name__}.")
  return entry.make(network, num_domains, config, schedule or Schedule(), mesh)


def network_input(name: str, x: np.ndarray | jnp.ndarray) -> np.ndarray:
  """Zeros shaped like the input the network of algorithm `name` reads for
  data `x` (N, ..., C): `x`'s shape with the algorithm's
  `added_input_channels` more channels (ARM's context); build the network
  on it."""
  extra = get(name).added_input_channels
  return np.zeros(x.shape[:-1] + (x.shape[-1] + extra,), x.dtype)
