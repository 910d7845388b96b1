"""SagNet, Style-Agnostic Networks (Nam et al., 2021), as DomainBed: the
features' per-example mean and variance (over the feature axis) are their
"style". Each update takes three steps, each with its own Adam at the run's
learning rate and weight decay:
  1. content: featurizer and classifier on features whose style is mixed
     with another example's (weight alpha ~ U(0, 1));
  2. style: a second classifier (params["style_classifier"]) on features
     whose content is another example's;
  3. adversary: the featurizer, weighted by sag_w_adv, pushes the style
     classifier's predictions towards uniform.
Predictions are the featurizer and classifier's, as for any network.
DomainBed hparam: sag_w_adv. The draws are `draw_randomizations`'.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import losses
from fishr_jax import models
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

STYLE = "style_classifier"


@dataclasses.dataclass(frozen=True)
class Config:
  w_adv: float = ranges.field(0.1, ranges.NON_NEGATIVE,
                              "the adversary's weight")

  def __post_init__(self):
    ranges.check_fields("sagnet", self)


DOMAINBED = registry.DomainBedSpec(
    name="SagNet",
    hparams={"sag_w_adv": (0.1, lambda r: 10**r.uniform(-2, 1))},
    to_config=lambda h: {"w_adv": h["sag_w_adv"]})


def draw_randomizations(rng: jax.Array, num_examples: int
                        ) -> tuple[jax.Array, jax.Array]:
  """(alpha (3, N) ~ U(0, 1), partner indices (3, N), each row a random
  permutation), one row per step (content, style, adversary)."""
  alpha_rng, perm_rng = jax.random.split(rng)
  alpha = jax.random.uniform(alpha_rng, (3, num_examples))
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_examples))(
      jax.random.split(perm_rng, 3))
  return alpha, perms


def randomize(features: jax.Array, alpha: jax.Array, partner: jax.Array,
              what: str, eps: float = 1e-5) -> jax.Array:
  """(N, D) features with their style mixed with their partner's
  (what="style"), or their content replaced by it (what="content", the
  content a constant)."""
  mean = features.mean(-1, keepdims=True)
  var = features.var(-1, ddof=1, keepdims=True)
  content = (features - mean) / jnp.sqrt(var + eps)
  if what == "style":
    alpha = alpha[:, None]
    mean = alpha * mean + (1 - alpha) * mean[partner]
    var = alpha * var + (1 - alpha) * var[partner]
  else:
    content = jax.lax.stop_gradient(content[partner])
  return content * jnp.sqrt(var + eps) + mean


def split(params):
  """(featurizer params, classifier params, style classifier params)."""
  featurizer = {k: v for k, v in params.items()
                if k not in (models.HEAD, STYLE)}
  return featurizer, {models.HEAD: params[models.HEAD]}, params[STYLE]


@registry.register("sagnet", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del num_domains, mesh

  def init_params(rng, params, batch):
    features, logits = network.forward(params, batch["x"][:1], None)
    # DomainBed's style network is a fresh torch nn.Linear.
    head = models.torch_dense(logits.shape[-1], features.shape[-1])
    return {**params, STYLE: head.init(rng, features)["params"]}

  def init_optimizer(tx, params):
    featurizer, classifier, style = split(params)
    return {"featurizer": tx.init(featurizer), "classifier": tx.init(classifier),
            "style": tx.init(style)}

  def style_logits(network_params, style, x, rng, alpha, partner):
    """The style classifier on features whose content is a partner's."""
    features, _ = network.forward(network_params, x, rng)
    features = randomize(losses.at_least_float32(features), alpha, partner,
                         "content")
    return network.classify({models.HEAD: style}, features)

  def update(tx, params, opt_state, state, batch, step, rng):
    del step
    opt_state = dict(opt_state)
    x, y = batch["x"], batch["y"]
    alpha, partner = draw_randomizations(jax.random.fold_in(rng, 0),
                                         x.shape[0])
    # The draws are for the examples in domain order (as DomainBed's batch
    # comes), so that a sharded batch, which interleaves domains, pairs the
    # same examples.
    order = jnp.argsort(batch["domain"], stable=True)
    position = jnp.argsort(order)
    alpha, partner = alpha[:, position], order[partner[:, position]]
    featurizer, classifier, style = split(params)

    def content_loss(featurizer_and_classifier):
      p = {**featurizer_and_classifier[0], **featurizer_and_classifier[1]}
      features, _ = network.forward(p, x, jax.random.fold_in(rng, 1))
      features = randomize(losses.at_least_float32(features), alpha[0],
                           partner[0], "style")
      logits = losses.at_least_float32(network.classify(p, features))
      return losses.per_example_loss(logits, y).mean() + base.l2_term(
          p, schedule)

    loss_c, (g_f, g_c) = jax.value_and_grad(content_loss)(
        (featurizer, classifier))
    featurizer, opt_state["featurizer"] = base.apply_gradients(
        tx, g_f, featurizer, opt_state["featurizer"])
    classifier, opt_state["classifier"] = base.apply_gradients(
        tx, g_c, classifier, opt_state["classifier"])
    with_head = lambda f: {**f, **classifier}

    def style_loss(style):
      logits = style_logits(with_head(featurizer), style, x,
                            jax.random.fold_in(rng, 2), alpha[1], partner[1])
      return losses.per_example_loss(losses.at_least_float32(logits),
                                     y).mean()

    loss_s, g_s = jax.value_and_grad(style_loss)(style)
    style, opt_state["style"] = base.apply_gradients(tx, g_s, style,
                                                     opt_state["style"])

    def adversary_loss(featurizer):
      logits = style_logits(with_head(featurizer), style, x,
                            jax.random.fold_in(rng, 3), alpha[2], partner[2])
      log_probs = jax.nn.log_softmax(losses.at_least_float32(logits))
      return -config.w_adv * log_probs.mean()

    loss_adv, g_f = jax.value_and_grad(adversary_loss)(featurizer)
    featurizer, opt_state["featurizer"] = base.apply_gradients(
        tx, g_f, featurizer, opt_state["featurizer"])
    params = {**featurizer, **classifier, STYLE: style}
    metrics = {"loss": loss_c, "nll": loss_c, "loss_s": loss_s,
               "loss_adv": loss_adv}
    return params, opt_state, state, metrics

  return base.Algorithm(name="sagnet", init_state=base.no_state, update=update,
                        init_optimizer=init_optimizer, init_params=init_params)


# The DomainBed vectors' layout (tests/test_domainbed_updates.py).


def load_domainbed_extras(params, alg_state, extras):
  """params with DomainBed's style network (torch layout)."""
  style = {"kernel": jnp.asarray(extras["network_s.weight"]).T,
           "bias": jnp.asarray(extras["network_s.bias"])}
  return {**params, STYLE: style}, alg_state


def domainbed_extras(params, alg_state):
  del alg_state
  return {"network_s.weight": params[STYLE]["kernel"].T,
          "network_s.bias": params[STYLE]["bias"]}
