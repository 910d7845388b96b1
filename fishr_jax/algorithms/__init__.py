"""Domain-generalization algorithms, one module each, selected by name."""

import flax.linen as nn
import ml_collections

from fishr_jax.algorithms.base import Algorithm, Network
from fishr_jax.algorithms.registry import get, names, register


def make_algorithm(name: str, network: Network | nn.Module, num_domains: int,
                   config: ml_collections.ConfigDict) -> Algorithm:
  """The algorithm `name` for `network` over `num_domains` training domains.

  A plain flax module (no frozen collections, no dropout) may stand for its
  `Network.from_module(module)`.
  """
  if isinstance(network, nn.Module):
    network = Network.from_module(network)
  return get(name)(network, num_domains, config)
