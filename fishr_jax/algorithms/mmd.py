"""MMD (Li et al., 2018): match the domains' feature distributions under a
sum of Gaussian kernels. DomainBed hparam: mmd_gamma (the penalty weight)."""

from fishr_jax import penalties
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


DOMAINBED = registry.DomainBedSpec(
    name="MMD",
    hparams={"mmd_gamma": (1.0, lambda r: 10**r.uniform(-1, 1))},
    to_config=lambda h: {"mmd": {"lambda_": h["mmd_gamma"]}})


@registry.register("mmd", DOMAINBED)
def make(network, num_domains, config) -> base.Algorithm:

  def penalty_fn(params, state, batch, forward, rng):
    del params
    return penalties.mmd_penalty(forward.features, batch["domain"],
                                 num_domains), state

  return base.penalized("mmd", network, num_domains, config,
                        lambda_=config.mmd.lambda_, penalty_fn=penalty_fn)
