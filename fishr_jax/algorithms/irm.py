"""IRMv1 (Arjovsky et al., 2019): penalise each domain's dummy-scale gradient.

config.irm: lambda_; split_halves (DomainBed's even/odd product estimate;
default False, the IRM-setup script's square)."""

from fishr_jax import penalties
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


DOMAINBED = registry.DomainBedSpec(
    name="IRM",
    hparams={
        "irm_lambda": (1e2, lambda r: 10**r.uniform(-1, 5)),
        "irm_penalty_anneal_iters": (500, lambda r: int(10**r.uniform(0, 4))),
    },
    to_config=lambda h: {
        "irm": {"lambda_": h["irm_lambda"], "split_halves": True},
        "penalty_anneal_iters": h["irm_penalty_anneal_iters"],
        "penalty_warmup_weight": 1.0,
        "reset_optimizer_at_anneal": True,
    })


@registry.register("irm", DOMAINBED)
def make(network, num_domains, config) -> base.Algorithm:

  def penalty_fn(params, state, batch, forward, rng):
    del params
    penalty = penalties.irm_penalty(
        forward.logits, batch["y"], batch["domain"], num_domains,
        split_halves=config.irm.get("split_halves", False))
    return penalty, state

  return base.penalized("irm", network, num_domains, config,
                        lambda_=config.irm.lambda_, penalty_fn=penalty_fn)
