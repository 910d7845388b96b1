"""ERM: the mean risk over training domains, no penalty."""

from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


DOMAINBED = registry.DomainBedSpec(name="ERM", hparams={},
                                   to_config=lambda h: {})


@registry.register("erm", DOMAINBED)
def make(network, num_domains, config) -> base.Algorithm:
  return base.penalized("erm", network, num_domains, config, lambda_=0.0,
                        penalty_fn=None)
