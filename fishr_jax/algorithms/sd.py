"""Spectral Decoupling (Pezeshki et al., 2021, "Gradient Starvation"; their
Eq. 25): penalise the squared logits. DomainBed hparam: sd_reg."""

import dataclasses

import jax.numpy as jnp

from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(0.1, ranges.NON_NEGATIVE, "a penalty weight")

  def __post_init__(self):
    ranges.check_fields("sd", self)


DOMAINBED = registry.DomainBedSpec(
    name="SD",
    hparams={"sd_reg": (0.1, lambda r: 10**r.uniform(-5, -1))},
    to_config=lambda h: {"lambda_": h["sd_reg"]})


@registry.register("sd", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh

  def penalty_fn(params, state, batch, forward, rng):
    del params, batch, rng
    return jnp.mean(forward.logits**2), state

  return base.penalized("sd", network, num_domains, schedule,
                        lambda_=config.lambda_, penalty_fn=penalty_fn)
