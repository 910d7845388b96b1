"""MMD (Li et al., 2018): match the domains' feature distributions under a
sum of Gaussian kernels. DomainBed hparam: mmd_gamma (the penalty weight)."""

from fishr_jax import penalties
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@registry.register("mmd")
def make(network, num_domains, config) -> base.Algorithm:

  def penalty_fn(params, state, batch, forward):
    del params
    return penalties.mmd_penalty(forward.features, batch["domain"],
                                 num_domains), state

  return base.penalized("mmd", network, num_domains, config,
                        lambda_=config.mmd.lambda_, penalty_fn=penalty_fn)
