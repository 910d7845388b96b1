"""ERM: the mean risk over training domains, no penalty."""

from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@registry.register("erm")
def make(network, num_domains, config) -> base.Algorithm:
  return base.penalized("erm", network, num_domains, config, lambda_=0.0,
                        penalty_fn=None)
