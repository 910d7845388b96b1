"""MTL, Marginal Transfer Learning (Blanchard et al., 2021), as DomainBed.

DomainBed's classifier reads each example's features and, beside them, its
domain's embedding: a moving average of the domain's mean features (hparam
mtl_ema). But its `MTL.predict` overwrites that embedding in place with
N(0, 1) noise (`.normal_()`) before the classifier reads it, in training and
at evaluation alike. This module does what that code does: the classifier's
second half of inputs is standard normal noise; the embeddings are kept as
DomainBed keeps them (state, (E, D)) and never reach the loss. The loss is
the sum of the domains' risks.

The classifier Linear(2 D, C) on [features, noise] is the network's own head
on the features plus `noise @ params["mtl_embedding_kernel"]` (D, C), the
weights of its second half; both are initialized as that torch Linear is.
Evaluation predicts through `predict`, with noise too.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import losses
from fishr_jax import models
from fishr_jax import penalties
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

EMBEDDING_KERNEL = "mtl_embedding_kernel"


@dataclasses.dataclass(frozen=True)
class Config:
  # the embeddings' moving-average weight of the new mean features
  ema: float = ranges.field(0.99, ranges.PROBABILITY, "a moving-average weight")

  def __post_init__(self):
    ranges.check_fields("mtl", self)


DOMAINBED = registry.DomainBedSpec(
    name="MTL",
    hparams={"mtl_ema": (0.99, lambda r: r.choice([0.5, 0.9, 0.99, 1.0]))},
    to_config=lambda h: {"ema": h["mtl_ema"]})


def draw_embedding_noise(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The N(0, 1) values that stand in for the embeddings, one row per
  example in batch order: DomainBed's `.normal_()`."""
  return jax.random.normal(rng, shape)


def logits_with_noise(network: base.Network, params, x: jax.Array,
                      rng: jax.Array | None, noise_rng: jax.Array,
                      domain: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """(features, logits) of the classifier on [features, noise]. With the
  examples' `domain`, the noise rows are drawn for the examples in domain
  order (as DomainBed's batch comes), so that a sharded batch, which
  interleaves domains, gives each example the same row."""
  features, logits = network.forward(params, x, rng)
  noise = draw_embedding_noise(noise_rng, features.shape)
  if domain is not None:
    noise = noise[jnp.argsort(jnp.argsort(domain, stable=True))]
  return features, logits + noise.astype(features.dtype) @ params[
      EMBEDDING_KERNEL].astype(features.dtype)


@registry.register("mtl", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del schedule, mesh  # no penalty to schedule

  def init_params(rng, params, batch):
    features, logits = network.forward(params, batch["x"][:1], None)
    width, num_outputs = features.shape[-1], logits.shape[-1]
    classifier = models.torch_dense(num_outputs, 2 * width).init(
        rng, jnp.zeros((1, 2 * width), features.dtype))["params"]
    return {**params,
            models.HEAD: {"kernel": classifier["kernel"][:width],
                          "bias": classifier["bias"]},
            EMBEDDING_KERNEL: classifier["kernel"][width:]}

  def init_state(params, batch):
    features, _ = network.forward(params, batch["x"][:1], None)
    return jnp.zeros((num_domains, features.shape[-1]), jnp.float32)

  def loss_fn(params, embeddings, batch, step, rng):
    del step
    dropout_rng, noise_rng = jax.random.split(rng)
    features, logits = logits_with_noise(network, params, batch["x"],
                                         dropout_rng, noise_rng,
                                         batch["domain"])
    nll = losses.per_example_loss(losses.at_least_float32(logits), batch["y"])
    domain_nll = penalties.domain_mean(nll, batch["domain"], num_domains)
    means = penalties.domain_mean(
        jax.lax.stop_gradient(losses.at_least_float32(features)),
        batch["domain"], num_domains)
    embeddings = config.ema * means + (1 - config.ema) * embeddings
    loss = domain_nll.sum()
    return loss, (embeddings, {"loss": loss, "nll": domain_nll.mean()})

  def predict(params, x, valid, rng):
    del valid  # each example's noise is its own
    return logits_with_noise(network, params, x, None, rng)[1]

  return base.Algorithm(name="mtl", init_state=init_state, loss_fn=loss_fn,
                        init_params=init_params, predict=predict)


# The DomainBed vectors' layout (tests/test_domainbed_updates.py): DomainBed's
# classifier.weight is (C, 2 D), the features' half first.
DOMAINBED_OWN_PARAMS = ("classifier.",)


def load_domainbed_extras(params, alg_state, extras):
  """params with DomainBed's classifier (torch layout)."""
  kernel = jnp.asarray(extras["classifier.weight"]).T
  width = kernel.shape[0] // 2
  return {**params,
          models.HEAD: {"kernel": kernel[:width],
                        "bias": jnp.asarray(extras["classifier.bias"])},
          EMBEDDING_KERNEL: kernel[width:]}, alg_state


def domainbed_extras(params, alg_state):
  del alg_state
  kernel = jnp.concatenate([params[models.HEAD]["kernel"],
                            params[EMBEDDING_KERNEL]])
  return {"classifier.weight": kernel.T,
          "classifier.bias": params[models.HEAD]["bias"]}
