"""IRMv1 (Arjovsky et al., 2019): penalise each domain's dummy-scale gradient."""

from fishr_jax import penalties
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@registry.register("irm")
def make(model, num_domains, config) -> base.Algorithm:

  def penalty_fn(params, state, batch, forward):
    del params
    penalty = penalties.irm_penalty(forward.logits, batch["y"],
                                    batch["domain"], num_domains)
    return penalty, state

  return base.penalized("irm", model, num_domains, config,
                        lambda_=config.irm.lambda_, penalty_fn=penalty_fn)
