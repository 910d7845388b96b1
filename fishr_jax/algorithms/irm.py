"""IRMv1 (Arjovsky et al., 2019): penalise each domain's dummy-scale gradient.

config.irm: lambda_; split_halves (DomainBed's even/odd product estimate;
default False, the IRM-setup script's square)."""

from fishr_jax import penalties
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@registry.register("irm")
def make(network, num_domains, config) -> base.Algorithm:

  def penalty_fn(params, state, batch, forward):
    del params
    penalty = penalties.irm_penalty(
        forward.logits, batch["y"], batch["domain"], num_domains,
        split_halves=config.irm.get("split_halves", False))
    return penalty, state

  return base.penalized("irm", network, num_domains, config,
                        lambda_=config.irm.lambda_, penalty_fn=penalty_fn)
