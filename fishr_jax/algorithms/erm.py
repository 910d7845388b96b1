"""ERM: the mean risk over training domains, no penalty."""

import dataclasses

from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  """ERM has no options of its own."""


@registry.register("erm", Config, registry.DomainBedSpec(name="ERM", hparams={}))
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del config, mesh
  return base.penalized("erm", network, num_domains, schedule, lambda_=0.0,
                        penalty_fn=None)
