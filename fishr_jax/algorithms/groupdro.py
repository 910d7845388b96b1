"""GroupDRO (Sagawa et al., 2020): minimise a weighted risk whose domain
weights q grow exponentially with each domain's loss. State: q (E,), ones at
first, as DomainBed. DomainBed hparam: groupdro_eta."""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  # the step size of the domain weights
  eta: float = ranges.field(1e-2, ranges.NON_NEGATIVE, "a step size")

  def __post_init__(self):
    ranges.check_fields("groupdro", self)


DOMAINBED = registry.DomainBedSpec(
    name="GroupDRO",
    hparams={"groupdro_eta": (1e-2, lambda r: 10**r.uniform(-3, -1))},
    to_config=lambda h: {"eta": h["groupdro_eta"]})


@registry.register("groupdro", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del schedule, mesh  # GroupDRO has no penalty to schedule
  eta = config.eta

  def init_state(params, batch):
    del params, batch
    return jnp.ones((num_domains,), jnp.float32)

  def loss_fn(params, q, batch, step, rng):
    del step
    forward, metrics = base.domain_losses(network, params, batch, num_domains,
                                          rng)
    q = q * jnp.exp(eta * jax.lax.stop_gradient(forward.domain_nll))
    q = q / q.sum()
    loss = jnp.dot(forward.domain_nll, q)
    return loss, (q, {**metrics, "loss": loss, "max_domain_weight": q.max()})

  return base.Algorithm(name="groupdro", init_state=init_state, loss_fn=loss_fn)
