"""IB_ERM (Ahuja et al., 2021), as DomainBed: ERM plus an information
bottleneck on the features, the mean within-domain variance of each
feature (penalties.ib_penalty), weighted by ib_lambda from step
ib_penalty_anneal_iters on (0 before), with a fresh optimizer then."""

import dataclasses

from fishr_jax import penalties
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(1e2, ranges.NON_NEGATIVE, "a penalty weight")

  def __post_init__(self):
    ranges.check_fields("ib_erm", self)


DOMAINBED = registry.DomainBedSpec(
    name="IB_ERM",
    hparams={
        "ib_lambda": (1e2, lambda r: 10**r.uniform(-1, 5)),
        "ib_penalty_anneal_iters": (500, lambda r: int(10**r.uniform(0, 4))),
    },
    to_config=lambda h: {"lambda_": h["ib_lambda"]},
    to_schedule=lambda h: {
        "penalty_anneal_iters": h["ib_penalty_anneal_iters"],
        "penalty_warmup_weight": 0.0, "reset_optimizer_at_anneal": True})


@registry.register("ib_erm", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh

  def penalty_fn(params, state, batch, forward, rng):
    del params, rng
    return penalties.ib_penalty(forward.features, batch["domain"],
                                num_domains), state

  return base.penalized("ib_erm", network, num_domains, schedule,
                        lambda_=config.lambda_, penalty_fn=penalty_fn)
