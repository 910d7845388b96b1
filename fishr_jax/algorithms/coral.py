"""Deep CORAL (Sun & Saenko, 2016): align the domains' feature means and
covariances. DomainBed hparam: mmd_gamma (the penalty weight)."""

import dataclasses

from fishr_jax import penalties
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(1.0, ranges.NON_NEGATIVE, "a penalty weight")

  def __post_init__(self):
    ranges.check_fields("coral", self)


DOMAINBED = registry.DomainBedSpec(
    name="CORAL",
    hparams={"mmd_gamma": (1.0, lambda r: 10**r.uniform(-1, 1))},
    to_config=lambda h: {"lambda_": h["mmd_gamma"]})


@registry.register("coral", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh

  def penalty_fn(params, state, batch, forward, rng):
    del params, rng
    return penalties.coral_penalty(forward.features, batch["domain"],
                                   num_domains), state

  return base.penalized("coral", network, num_domains, schedule,
                        lambda_=config.lambda_, penalty_fn=penalty_fn)
