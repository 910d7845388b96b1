"""AND-mask (Parascandolo et al., 2021, "Learning explanations that are
hard to vary"): step along the mean of the domains' gradients only where
their signs agree. Per parameter tensor: mask = |mean_e sign(g_e)| >= tau,
gradient = mask * mean_e g_e / (1e-10 + mean(mask)), as DomainBed.
DomainBed hparam: tau. sandmask.py shares its update.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  tau: float = ranges.field(1.0, ranges.PROBABILITY,
                            "the sign agreement a coordinate needs")

  def __post_init__(self):
    ranges.check_fields("andmask", self)


DOMAINBED = registry.DomainBedSpec(
    name="ANDMask",
    hparams={"tau": (1.0, lambda r: r.uniform(0.5, 1.))},
    to_config=lambda h: {"tau": float(h["tau"])})


def and_mask(domain_grads: jax.Array, tau: float | jax.Array) -> jax.Array:
  """(E, ...) per-domain gradients of one tensor -> its 0/1 mask."""
  agreement = jnp.abs(jnp.sign(domain_grads).mean(axis=0))
  return (agreement >= tau).astype(domain_grads.dtype)


def rescaled(mask: jax.Array, domain_grads: jax.Array) -> jax.Array:
  """mask * mean gradient, scaled up by the fraction of the tensor kept."""
  return mask * domain_grads.mean(axis=0) / (1e-10 + mask.mean())


def masked_update(name: str, network: base.Network, num_domains: int,
                  schedule: base.Schedule,
                  mask_fn: Callable[[jax.Array], jax.Array]) -> base.Algorithm:
  """The algorithm that steps along `rescaled(mask_fn(g), g)` per tensor,
  g its (E, ...) per-domain gradients, with the run's optimizer."""

  def update(tx, params, opt_state, state, batch, step, rng):
    del step
    grads, _, metrics = base.domain_gradients(network, params, batch,
                                              num_domains, schedule, rng)
    masks = jax.tree.map(mask_fn, grads)
    kept = jnp.mean(jnp.stack([m.mean() for m in jax.tree.leaves(masks)]))
    params, opt_state = base.apply_gradients(
        tx, jax.tree.map(rescaled, masks, grads), params, opt_state)
    return params, opt_state, state, {**metrics, "loss": metrics["nll"],
                                      "mask_kept": kept}

  return base.Algorithm(name=name, init_state=base.no_state, update=update)


@registry.register("andmask", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh
  return masked_update("andmask", network, num_domains, schedule,
                       lambda g: and_mask(g, config.tau))
