"""IRMv1 (Arjovsky et al., 2019): penalise each domain's dummy-scale gradient."""

import dataclasses

from fishr_jax import penalties
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(1e2, ranges.NON_NEGATIVE, "a penalty weight")
  # DomainBed's even/odd product estimate; False: the IRM-setup script's
  # square of each domain's gradient.
  split_halves: bool = True

  def __post_init__(self):
    ranges.check_fields("irm", self)


DOMAINBED = registry.DomainBedSpec(
    name="IRM",
    hparams={
        "irm_lambda": (1e2, lambda r: 10**r.uniform(-1, 5)),
        "irm_penalty_anneal_iters": (500, lambda r: int(10**r.uniform(0, 4))),
    },
    to_config=lambda h: {"lambda_": h["irm_lambda"]},
    to_schedule=lambda h: {
        "penalty_anneal_iters": h["irm_penalty_anneal_iters"],
        "penalty_warmup_weight": 1.0, "reset_optimizer_at_anneal": True})


@registry.register("irm", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh

  def penalty_fn(params, state, batch, forward, rng):
    del params, rng
    penalty = penalties.irm_penalty(forward.logits, batch["y"], batch["domain"],
                                    num_domains, config.split_halves)
    return penalty, state

  return base.penalized("irm", network, num_domains, schedule,
                        lambda_=config.lambda_, penalty_fn=penalty_fn)
