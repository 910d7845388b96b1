"""V-REx (Krueger et al., 2021): penalise the spread of the domain risks."""

from fishr_jax import penalties
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


DOMAINBED = registry.DomainBedSpec(
    name="VREx",
    hparams={
        "vrex_lambda": (1e1, lambda r: 10**r.uniform(-1, 5)),
        "vrex_penalty_anneal_iters": (500, lambda r: int(10**r.uniform(0, 4))),
    },
    to_config=lambda h: {
        "vrex": {"lambda_": h["vrex_lambda"], "reduction": "variance"},
        "penalty_anneal_iters": h["vrex_penalty_anneal_iters"],
        "penalty_warmup_weight": 1.0,
        "reset_optimizer_at_anneal": True,
    })


@registry.register("vrex", DOMAINBED)
def make(network, num_domains, config) -> base.Algorithm:

  def penalty_fn(params, state, batch, forward, rng):
    del params, batch
    return penalties.vrex_penalty(forward.domain_nll,
                                  config.vrex.reduction), state

  return base.penalized("vrex", network, num_domains, config,
                        lambda_=config.vrex.lambda_, penalty_fn=penalty_fn)
