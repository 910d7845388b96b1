"""DANN and CDANN (Ganin et al., 2016; Li et al., 2018), as DomainBed: a
discriminator (DomainBed's MLP, its mlp_* hparams) learns each example's
domain from its features (CDANN: features + a learned embedding of the
class, its loss weighted to balance the classes), with a gradient penalty
on its inputs; the featurizer and classifier learn the labels while
fooling it. Steps alternate: `d_steps_per_g_step` discriminator steps, then
one generator step (both are computed each update and the one whose turn
it is kept). Each side has its own Adam, DomainBed's
(lr_d / lr_g, weight_decay_d / weight_decay_g, betas (beta1, 0.9)); the
run's optimizer, lr and weight_decay are not used.

Parameters: the network's, plus params["discriminator"] and (CDANN)
params["class_embeddings"] (num_classes, D); opt_state holds the two Adams.
(DomainBed's DANN builds class embeddings too, and never trains them.)
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import losses
from fishr_jax import models
from fishr_jax import optimizers
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

OWN = ("discriminator", "class_embeddings")  # the discriminator side's keys


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(1.0, ranges.NON_NEGATIVE, "a penalty weight")
  lr_d: float = ranges.field(1e-3, ranges.POSITIVE, "a learning rate")
  lr_g: float = ranges.field(1e-3, ranges.POSITIVE, "a learning rate")
  weight_decay_d: float = ranges.field(0.0, ranges.NON_NEGATIVE, "a decay")
  weight_decay_g: float = ranges.field(0.0, ranges.NON_NEGATIVE, "a decay")
  beta1: float = ranges.field(0.5, ranges.DECAY, "Adam's first beta")
  d_steps_per_g_step: int = ranges.field(1, ranges.POSITIVE_COUNT, "a count")
  grad_penalty: float = ranges.field(0.0, ranges.NON_NEGATIVE,
                                     "a penalty weight")
  mlp_width: int = ranges.field(256, ranges.POSITIVE_COUNT, "a width")
  mlp_depth: int = ranges.field(3, ranges.Range(2, integer=True), "a depth")
  mlp_dropout: float = ranges.field(0.0, ranges.DECAY, "a dropout rate")

  def __post_init__(self):
    ranges.check_fields("dann", self)


def _by_image_size(small_images: bool) -> dict:
  if small_images:
    lr = (1e-3, lambda r: 10**r.uniform(-4.5, -2.5))
    return {"lr_g": lr, "lr_d": lr, "weight_decay_g": (0., lambda r: 0.)}
  lr = (5e-5, lambda r: 10**r.uniform(-5, -3.5))
  return {"lr_g": lr, "lr_d": lr,
          "weight_decay_g": (0., lambda r: 10**r.uniform(-6, -2))}


def _domainbed(name: str) -> registry.DomainBedSpec:
  return registry.DomainBedSpec(
      name=name,
      hparams={
          "lambda": (1.0, lambda r: 10**r.uniform(-2, 2)),
          "weight_decay_d": (0., lambda r: 10**r.uniform(-6, -2)),
          "d_steps_per_g_step": (1, lambda r: int(2**r.uniform(0, 3))),
          "grad_penalty": (0., lambda r: 10**r.uniform(-2, 1)),
          "beta1": (0.5, lambda r: float(r.choice([0., 0.5]))),
          "mlp_width": (256, lambda r: int(2**r.uniform(6, 10))),
          "mlp_depth": (3, lambda r: int(r.choice([3, 4, 5]))),
          "mlp_dropout": (0., lambda r: float(r.choice([0., 0.1, 0.5]))),
      },
      by_image_size=_by_image_size,
      to_config=lambda h: {
          "lambda_": float(h["lambda"]), "lr_d": h["lr_d"], "lr_g": h["lr_g"],
          "weight_decay_d": float(h["weight_decay_d"]),
          "weight_decay_g": float(h["weight_decay_g"]),
          "beta1": float(h["beta1"]),
          "d_steps_per_g_step": int(h["d_steps_per_g_step"]),
          "grad_penalty": float(h["grad_penalty"]),
          "mlp_width": int(h["mlp_width"]), "mlp_depth": int(h["mlp_depth"]),
          "mlp_dropout": float(h["mlp_dropout"])})


def split(params):
  """(the discriminator side's params, the network's)."""
  return ({k: params[k] for k in OWN if k in params},
          {k: v for k, v in params.items() if k not in OWN})


def class_weights(labels: jax.Array) -> jax.Array:
  """CDANN's per-example weights 1 / (count of its class * K), K the largest
  label + 1 (DomainBed's F.one_hot(all_y) infers it), in float32 as
  DomainBed's `.float()`."""
  num = jnp.max(labels) + 1
  counts = jnp.sum(labels[:, None] == jnp.arange(labels.shape[0]), axis=0)
  return 1.0 / (counts[labels] * num).astype(jnp.float32)


def _make(name: str, conditional: bool, network: base.Network,
          num_domains: int, config: Config, schedule: base.Schedule
          ) -> base.Algorithm:
  discriminator = models.DomainBedMLP(config.mlp_width, config.mlp_depth,
                                      num_domains, config.mlp_dropout)
  adam_d = optimizers.torch_adam(config.lr_d, config.weight_decay_d,
                                 config.beta1, 0.9)
  adam_g = optimizers.torch_adam(config.lr_g, config.weight_decay_g,
                                 config.beta1, 0.9)

  def init_params(rng, params, batch):
    features, logits = network.forward(params, batch["x"][:1], None)
    dim, num_classes = features.shape[-1], max(logits.shape[-1], 2)
    disc_rng, embed_rng = jax.random.split(rng)
    params = {**params, "discriminator": discriminator.init(
        disc_rng, jnp.zeros((1, dim), features.dtype))["params"]}
    if conditional:  # torch's nn.Embedding starts at N(0, 1)
      params["class_embeddings"] = jax.random.normal(
          embed_rng, (num_classes, dim), features.dtype)
    return params

  def init_optimizer(tx, params):
    del tx  # DANN's own Adams
    own, net = split(params)
    return {"discriminator": adam_d.init(own), "generator": adam_g.init(net)}

  def losses_of(params, batch, rng):
    """(disc_loss, gen_loss, metrics): both sides' objectives."""
    forward_rng, disc_rng = jax.random.split(rng)
    features, logits = network.forward(params, batch["x"], forward_rng)
    labels = batch["y"].astype(jnp.int32)
    domains = batch["domain"]

    def domain_nll(disc_input, reduce):
      out = discriminator.apply(
          {"params": params["discriminator"]}, disc_input,
          deterministic=False, rngs={"dropout": disc_rng})
      return reduce(losses.per_example_loss(losses.at_least_float32(out),
                                            domains))

    disc_input = features
    if conditional:
      disc_input = features + params["class_embeddings"][labels]
      weights = class_weights(labels)
      disc_loss = domain_nll(disc_input, lambda l: jnp.sum(weights * l))
    else:
      disc_loss = domain_nll(disc_input, jnp.mean)
    if not base.is_zero(config.grad_penalty):
      input_grad = jax.grad(domain_nll)(disc_input, jnp.sum)
      disc_loss += config.grad_penalty * jnp.mean(jnp.sum(input_grad**2, -1))
    nll = losses.per_example_loss(losses.at_least_float32(logits),
                                  batch["y"]).mean()
    gen_loss = nll + base.l2_term(split(params)[1], schedule) - (
        config.lambda_ * disc_loss)
    batch_acc = losses.correct(losses.at_least_float32(logits),
                               batch["y"]).mean()
    return disc_loss, gen_loss, {"nll": nll, "batch_acc": batch_acc}

  def side_step(params, opt_state, batch, rng, side):
    """One step of `side`'s Adam along its objective; with the params, its
    opt_state and `losses_of` before the step."""
    disc = side == "discriminator"
    own, net = split(params)
    adam, trained = (adam_d, own) if disc else (adam_g, net)

    def objective(part):
      out = losses_of({**params, **part}, batch, rng)
      return out[0 if disc else 1], out

    grads, out = jax.grad(objective, has_aux=True)(trained)
    trained, opt_state[side] = base.apply_gradients(adam, grads, trained,
                                                    opt_state[side])
    return {**params, **trained}, opt_state, out

  def update(tx, params, opt_state, state, batch, step, rng):
    del tx
    # DomainBed counts updates from 1: `d` discriminator steps, then one
    # generator step.
    d = config.d_steps_per_g_step
    disc_turn = (step + 1) % (1 + d) < d
    # Both sides' steps, then the one whose turn it is: XLA:CPU runs a conv
    # network's backward pass inside a lax.cond branch far slower.
    *disc_side, (disc_loss, gen_loss, metrics) = side_step(
        params, dict(opt_state), batch, rng, "discriminator")
    *gen_side, _ = side_step(params, dict(opt_state), batch, rng, "generator")
    params, opt_state = jax.tree.map(lambda d, g: jnp.where(disc_turn, d, g),
                                     tuple(disc_side), tuple(gen_side))
    metrics.update(disc_loss=disc_loss, gen_loss=gen_loss,
                   loss=jnp.where(disc_turn, disc_loss, gen_loss))
    return params, opt_state, state, metrics

  return base.Algorithm(name=name, init_state=base.no_state, update=update,
                        init_optimizer=init_optimizer, init_params=init_params)


@registry.register("dann", Config, _domainbed("DANN"))
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh
  return _make("dann", False, network, num_domains, config, schedule)


@registry.register("cdann", Config, _domainbed("CDANN"))
def make_conditional(network: base.Network, num_domains: int, config: Config,
                     schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh
  return _make("cdann", True, network, num_domains, config, schedule)


# The DomainBed vectors' layout (tests/test_domainbed_updates.py).


def _torch_names(params) -> dict[str, str]:
  return {"discriminator.input": ("discriminator", "input"),
          **{f"discriminator.hiddens.{i}": ("discriminator", f"hidden_{i}")
             for i in range(len(params["discriminator"]) - 2)},
          "discriminator.output": ("discriminator", "output")}


def load_domainbed_extras(params, alg_state, extras):
  """params with DomainBed's discriminator and class embeddings (torch
  layout, by DomainBed's names)."""
  params = dict(params)
  disc = {k: dict(v) for k, v in params["discriminator"].items()}
  for torch_name, (_, layer) in _torch_names(params).items():
    disc[layer] = {"kernel": jnp.asarray(extras[f"{torch_name}.weight"]).T,
                   "bias": jnp.asarray(extras[f"{torch_name}.bias"])}
  params["discriminator"] = disc
  if "class_embeddings" in params:
    params["class_embeddings"] = jnp.asarray(extras["class_embeddings.weight"])
  return params, alg_state


def domainbed_extras(params, alg_state):
  """The discriminator side's params by DomainBed's names, torch layout."""
  del alg_state
  out = {}
  if "class_embeddings" in params:
    out["class_embeddings.weight"] = params["class_embeddings"]
  for torch_name, (_, layer) in _torch_names(params).items():
    out[f"{torch_name}.weight"] = params["discriminator"][layer]["kernel"].T
    out[f"{torch_name}.bias"] = params["discriminator"][layer]["bias"]
  return out
