"""SAND-mask (Shahtalebi et al., 2021): AND-mask's update with a smooth mask
in [0, 1], mask = max(0, tanh(k * (|mean_e sign(g_e)| - tau) / var_e(g_e))),
the variance unbiased over domains, as DomainBed (a coordinate whose domains
agree exactly, 0 / 0, gets 1e-17). DomainBed hparams: tau, k.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import ranges
from fishr_jax.algorithms import andmask
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  tau: float = ranges.field(1.0, ranges.PROBABILITY,
                            "the sign agreement a coordinate needs")
  k: float = ranges.field(10.0, ranges.NON_NEGATIVE, "the mask's steepness")

  def __post_init__(self):
    ranges.check_fields("sandmask", self)


DOMAINBED = registry.DomainBedSpec(
    name="SANDMask",
    hparams={"tau": (1.0, lambda r: r.uniform(0.0, 1.)),
             "k": (1e+1, lambda r: 10**r.uniform(-3, 5))},
    to_config=lambda h: {"tau": float(h["tau"]), "k": float(h["k"])})


def sand_mask(domain_grads: jax.Array, tau: float | jax.Array,
              k: float | jax.Array) -> jax.Array:
  """(E, ...) per-domain gradients of one tensor -> its mask in [0, 1]."""
  agreement = jnp.abs(jnp.sign(domain_grads).mean(axis=0))
  variance = jnp.var(domain_grads, axis=0, ddof=1)
  mask = jnp.maximum(jnp.tanh(k * (agreement - tau) / variance), 0.0)
  return jnp.where(jnp.isnan(mask), 1e-17, mask)


@registry.register("sandmask", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh
  base.require(num_domains > 1, "sandmask needs two or more training domains "
               "(a variance over domains).")
  return andmask.masked_update("sandmask", network, num_domains, schedule,
                               lambda g: sand_mask(g, config.tau, config.k))
