"""Fish (Shi et al., 2022, "Gradient matching for domain generalization"),
as DomainBed: from the current weights, an inner network takes one step of
the run's optimizer on each training domain in turn (its optimizer state is
kept from one update to the next), then the weights move `meta_lr` of the
way to the inner network's. DomainBed hparam: meta_lr.

The inner steps read each domain's block of the batch, so the batch comes
in domain blocks (`needs_domain_blocks`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import parallel
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  meta_lr: float = ranges.field(0.5, ranges.NON_NEGATIVE,
                                "the outer interpolation step")

  def __post_init__(self):
    ranges.check_fields("fish", self)


DOMAINBED = registry.DomainBedSpec(
    name="Fish",
    hparams={"meta_lr": (0.5, lambda r: float(r.choice([0.05, 0.1, 0.5])))},
    to_config=lambda h: {"meta_lr": h["meta_lr"]})


@registry.register("fish", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  shards = parallel.data_shards(mesh)

  def update(tx, params, opt_state, state, batch, step, rng):
    """opt_state is the inner optimizer's; the outer one DomainBed builds is
    never stepped."""
    del step
    inner, risks = params, []
    for domain in range(num_domains):
      domain_batch = base.domain_block(batch, domain, num_domains, shards)
      risk, grads = jax.value_and_grad(base.mean_risk, argnums=1)(
          network, inner, domain_batch, schedule,
          jax.random.fold_in(rng, domain))
      inner, opt_state = base.apply_gradients(tx, grads, inner, opt_state)
      risks.append(risk)
    params = jax.tree.map(lambda p, q: p + config.meta_lr * (q - p),
                          params, inner)
    # loss: DomainBed's, the last domain's risk; nll: the domains' mean,
    # each at the inner weights that stepped on it.
    return params, opt_state, state, {"loss": risk, "nll": jnp.mean(
        jnp.stack(risks))}

  return base.Algorithm(name="fish", init_state=base.no_state, update=update,
                        needs_domain_blocks=True)
