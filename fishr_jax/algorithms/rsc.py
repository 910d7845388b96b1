"""RSC, Representation Self-Challenging (Huang et al., 2020), as DomainBed:
mute each example's features with the largest gradient of its true-class
logit (those above the (1 - f_drop_factor) percentile of its row), and
undo the muting for the examples whose true-class probability the muting
changes least (below the batch's (1 - b_drop_factor) percentile); the loss
is the cross-entropy of the head on the muted features. The masks are
constants of the gradient. DomainBed hparams: rsc_f_drop_factor,
rsc_b_drop_factor.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import losses
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  f_drop_factor: float = ranges.field(1 / 3, ranges.PROBABILITY,
                                      "a fraction of features")
  b_drop_factor: float = ranges.field(1 / 3, ranges.PROBABILITY,
                                      "a fraction of examples")

  def __post_init__(self):
    ranges.check_fields("rsc", self)


DOMAINBED = registry.DomainBedSpec(
    name="RSC",
    hparams={"rsc_f_drop_factor": (1 / 3, lambda r: r.uniform(0, 0.5)),
             "rsc_b_drop_factor": (1 / 3, lambda r: r.uniform(0, 0.5))},
    to_config=lambda h: {"f_drop_factor": h["rsc_f_drop_factor"],
                         "b_drop_factor": h["rsc_b_drop_factor"]})


def class_logits(network: base.Network, params, features: jax.Array
                 ) -> jax.Array:
  """The head's logits, a single (sigmoid) logit z as the classes' [0, z]."""
  logits = network.classify(params, features)
  if logits.shape[-1] == 1:
    return jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
  return logits


def feature_mask(network: base.Network, params, features: jax.Array,
                 labels: jax.Array, config: Config) -> jax.Array:
  """(N, D) 0/1: the features each example keeps (DomainBed's mask)."""
  logits = lambda f: class_logits(network, params, f)
  num_classes = logits(features[:1]).shape[-1]
  one_hot = jax.nn.one_hot(labels.astype(jnp.int32), num_classes,
                           dtype=features.dtype)
  true_logit = lambda f: jnp.sum(logits(f) * one_hot)
  grads = jax.grad(true_logit)(features)
  # np.percentile's default (linear) interpolation, as DomainBed.
  cut = jnp.percentile(grads, (1 - config.f_drop_factor) * 100, axis=1,
                       keepdims=True)
  keep_f = grads < cut
  true_prob = lambda f: jnp.sum(jax.nn.softmax(logits(f)) * one_hot, axis=1)
  changes = true_prob(features) - true_prob(features * keep_f)
  keep_b = changes < jnp.percentile(changes, (1 - config.b_drop_factor) * 100)
  return (keep_f | keep_b[:, None]).astype(features.dtype)


@registry.register("rsc", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del num_domains, mesh

  def loss_fn(params, state, batch, step, rng):
    del step
    features, logits = network.forward(params, batch["x"], rng)
    features = losses.at_least_float32(features)
    mask = jax.lax.stop_gradient(feature_mask(
        network, jax.lax.stop_gradient(params),
        jax.lax.stop_gradient(features), batch["y"], config))
    muted = losses.at_least_float32(network.classify(params, features * mask))
    nll = losses.per_example_loss(muted, batch["y"]).mean()
    loss = nll + base.l2_term(params, schedule)
    batch_acc = losses.correct(losses.at_least_float32(logits),
                               batch["y"]).mean()
    return loss, (state, {"loss": loss, "nll": nll, "batch_acc": batch_acc})

  return base.Algorithm(name="rsc", init_state=base.no_state, loss_fn=loss_fn)
