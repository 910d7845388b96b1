"""V-REx (Krueger et al., 2021): penalise the spread of the domain risks."""

from fishr_jax import penalties
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@registry.register("vrex")
def make(network, num_domains, config) -> base.Algorithm:

  def penalty_fn(params, state, batch, forward):
    del params, batch
    return penalties.vrex_penalty(forward.domain_nll,
                                  config.vrex.reduction), state

  return base.penalized("vrex", network, num_domains, config,
                        lambda_=config.vrex.lambda_, penalty_fn=penalty_fn)
