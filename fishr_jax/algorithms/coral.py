"""Deep CORAL (Sun & Saenko, 2016): align the domains' feature means and
covariances. DomainBed hparam: mmd_gamma (the penalty weight)."""

from fishr_jax import penalties
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


DOMAINBED = registry.DomainBedSpec(
    name="CORAL",
    hparams={"mmd_gamma": (1.0, lambda r: 10**r.uniform(-1, 1))},
    to_config=lambda h: {"coral": {"lambda_": h["mmd_gamma"]}})


@registry.register("coral", DOMAINBED)
def make(network, num_domains, config) -> base.Algorithm:

  def penalty_fn(params, state, batch, forward, rng):
    del params
    return penalties.coral_penalty(forward.features, batch["domain"],
                                   num_domains), state

  return base.penalized("coral", network, num_domains, config,
                        lambda_=config.coral.lambda_, penalty_fn=penalty_fn)
