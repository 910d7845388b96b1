"""IB_IRM (Ahuja et al., 2021), as DomainBed: IRM's penalty plus IB_ERM's
information bottleneck on the features, each with its own anneal step.

The Schedule is IRM's (weight 1 before irm_penalty_anneal_iters, lambda_
from it, a fresh optimizer then); the bottleneck's weight is 0 before
`ib_penalty_anneal_iters` and `ib_lambda` from it, and DomainBed builds a
fresh Adam at that step too, which this module's update does.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import penalties
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(1e2, ranges.NON_NEGATIVE, "a penalty weight")
  ib_lambda: float = ranges.field(1e2, ranges.NON_NEGATIVE, "a penalty weight")
  ib_penalty_anneal_iters: int = ranges.field(500, ranges.COUNT, "a step")

  def __post_init__(self):
    ranges.check_fields("ib_irm", self)


DOMAINBED = registry.DomainBedSpec(
    name="IB_IRM",
    hparams={
        "irm_lambda": (1e2, lambda r: 10**r.uniform(-1, 5)),
        "irm_penalty_anneal_iters": (500, lambda r: int(10**r.uniform(0, 4))),
        "ib_lambda": (1e2, lambda r: 10**r.uniform(-1, 5)),
        "ib_penalty_anneal_iters": (500, lambda r: int(10**r.uniform(0, 4))),
    },
    to_config=lambda h: {"lambda_": h["irm_lambda"],
                         "ib_lambda": h["ib_lambda"],
                         "ib_penalty_anneal_iters":
                             h["ib_penalty_anneal_iters"]},
    to_schedule=lambda h: {
        "penalty_anneal_iters": h["irm_penalty_anneal_iters"],
        "penalty_warmup_weight": 1.0, "reset_optimizer_at_anneal": True})


@registry.register("ib_irm", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh

  def loss_fn(params, state, batch, step, rng):
    forward, metrics = base.domain_losses(network, params, batch, num_domains,
                                          rng)
    irm_penalty = penalties.irm_penalty(forward.logits, batch["y"],
                                        batch["domain"], num_domains,
                                        split_halves=True)
    ib_penalty = penalties.ib_penalty(forward.features, batch["domain"],
                                      num_domains)
    irm_weight = base.penalty_weight(step, config.lambda_, schedule)
    ib_weight = jnp.where(step >= config.ib_penalty_anneal_iters,
                          config.ib_lambda, 0.0).astype(float)
    loss = (metrics["nll"] + base.l2_term(params, schedule)
            + irm_weight * irm_penalty + ib_weight * ib_penalty)
    metrics.update(loss=loss, irm_penalty=irm_penalty, ib_penalty=ib_penalty,
                   penalty_weight=irm_weight)
    return loss, (state, metrics)

  gradient_step = base.gradient_update(loss_fn)

  def update(tx, params, opt_state, state, batch, step, rng):
    # The Schedule resets the optimizer at IRM's anneal step; DomainBed
    # also starts a fresh Adam at the bottleneck's.
    anneal = config.ib_penalty_anneal_iters
    opt_state = jax.tree.map(
        lambda new, old: jnp.where((step == anneal) & (anneal > 0), new, old),
        tx.init(params), opt_state)
    return gradient_step(tx, params, opt_state, state, batch, step, rng)

  return base.Algorithm(name="ib_irm", init_state=base.no_state,
                        update=update)
