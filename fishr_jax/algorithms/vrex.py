"""V-REx (Krueger et al., 2021): penalise the spread of the domain risks."""

import dataclasses

from fishr_jax import errors
from fishr_jax import penalties
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

REDUCTIONS = ("variance", "pairwise")


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(1e1, ranges.NON_NEGATIVE, "a penalty weight")
  # "variance" (DomainBed) or "pairwise" (the IRM-setup script's
  # (nll_0 - nll_1)^2 for two domains).
  reduction: str = "variance"

  def __post_init__(self):
    ranges.check_fields("vrex", self)
    if self.reduction not in REDUCTIONS:
      raise errors.ConfigError(
          f"vrex.reduction must be one of {REDUCTIONS}, got "
          f"{self.reduction!r}.")


DOMAINBED = registry.DomainBedSpec(
    name="VREx",
    hparams={
        "vrex_lambda": (1e1, lambda r: 10**r.uniform(-1, 5)),
        "vrex_penalty_anneal_iters": (500, lambda r: int(10**r.uniform(0, 4))),
    },
    to_config=lambda h: {"lambda_": h["vrex_lambda"]},
    to_schedule=lambda h: {
        "penalty_anneal_iters": h["vrex_penalty_anneal_iters"],
        "penalty_warmup_weight": 1.0, "reset_optimizer_at_anneal": True})


@registry.register("vrex", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh

  def penalty_fn(params, state, batch, forward, rng):
    del params, batch, rng
    return penalties.vrex_penalty(forward.domain_nll, config.reduction), state

  return base.penalized("vrex", network, num_domains, schedule,
                        lambda_=config.lambda_, penalty_fn=penalty_fn)
