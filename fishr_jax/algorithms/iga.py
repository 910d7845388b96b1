"""IGA, Inter-environmental Gradient Alignment (Koyama & Yamaguchi, 2020):
penalise each domain's risk gradient's squared distance to the mean
gradient, sum over domains and parameters. As DomainBed, the mean gradient
is a constant of the penalty's own gradient (no create_graph there), each
domain's gradient is differentiated through (second order). DomainBed
hparam: penalty."""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(1e3, ranges.NON_NEGATIVE, "a penalty weight")

  def __post_init__(self):
    ranges.check_fields("iga", self)


DOMAINBED = registry.DomainBedSpec(
    name="IGA",
    hparams={"penalty": (1000, lambda r: 10**r.uniform(1, 5))},
    to_config=lambda h: {"lambda_": float(h["penalty"])})


def gradient_spread(domain_grads) -> jax.Array:
  """sum_e ||g_e - stop_gradient(mean_e g_e)||^2 over every parameter."""
  def spread(g):
    mean = jax.lax.stop_gradient(g.mean(axis=0))
    return jnp.sum((g - mean)**2)
  return sum(spread(g) for g in jax.tree.leaves(domain_grads))


@registry.register("iga", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh

  def penalty_fn(params, state, batch, forward, rng):
    del forward  # the gradients need their own differentiable pass
    grads, _, _ = base.domain_gradients(network, params, batch, num_domains,
                                        schedule, rng)
    return gradient_spread(grads), state

  return base.penalized("iga", network, num_domains, schedule,
                        lambda_=config.lambda_, penalty_fn=penalty_fn)
