"""Fishr (Rame et al., ICML 2022): match the domains' gradient variances.

config.fishr:
  lambda_     penalty weight once annealing is over.
  ema         moving-average decay of the per-domain variances (0: none).
  reduction   "mean" (DomainBed) or "sum" (IRM-setup Colored MNIST script).
  centered    centered variance (True) or raw second moment (ablation).
  covariance  "diagonal" (the method) or "full" (off-diagonal ablation).
  params      which parameters' gradients: "head" (the paper), "all", or a
              regular expression searched in names like "hidden_0/kernel".
  grad_path   "closed_form": exact variances of Dense and Conv layers from
              their inputs and backpropagated signals (layer_signals.py);
              "vmap": jax.vmap(jax.grad) over the chosen parameters (any
              layer; needed for covariance="full").
  vmap_chunk_size  examples per vmap chunk (None: all); speed/memory only.
  domain_blocks  True: batches come as the loaders give them, E equal blocks
              of examples in domain order, and the closed form's per-domain
              sums use that layout alone (less memory; any other layout gives
              NaN variances, penalty and gradients). False: any layout.
"""

import jax
import jax.numpy as jnp

from fishr_jax import layer_signals
from fishr_jax import losses
from fishr_jax import models
from fishr_jax import penalties
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

GRAD_PATHS = ("closed_form", "vmap")
COVARIANCES = ("diagonal", "full")


DOMAINBED = registry.DomainBedSpec(
    name="Fishr",
    hparams={
        "lambda": (1000.0, lambda r: 10**r.uniform(1.0, 4.0)),
        "penalty_anneal_iters": (1500, lambda r: int(r.uniform(0.0, 5000.0))),
        "ema": (0.95, lambda r: r.uniform(0.90, 0.99)),
    },
    to_config=lambda h: {
        "fishr": {"lambda_": h["lambda"], "ema": h["ema"], "reduction": "mean",
                  "centered": True, "covariance": "diagonal",
                  "grad_path": "closed_form"},
        "penalty_anneal_iters": h["penalty_anneal_iters"],
        "penalty_warmup_weight": 0.0,
        "reset_optimizer_at_anneal": True,
    })


@registry.register("fishr", DOMAINBED)
def make(network, num_domains, config) -> base.Algorithm:
  cfg = config.fishr
  which = cfg.get("params", "head")
  domain_blocks = cfg.get("domain_blocks", False)
  if cfg.grad_path not in GRAD_PATHS:
    raise ValueError(f"fishr.grad_path must be one of {GRAD_PATHS}, "
                     f"got {cfg.grad_path!r}.")
  if cfg.covariance not in COVARIANCES:
    raise ValueError(f"fishr.covariance must be one of {COVARIANCES}, "
                     f"got {cfg.covariance!r}.")
  if cfg.covariance == "full" and cfg.grad_path != "vmap":
    raise ValueError("fishr.covariance='full' needs the per-example gradients:"
                     " set fishr.grad_path='vmap'.")
  closed_form = cfg.grad_path == "closed_form"
  head_names = [f"{models.HEAD}/kernel", f"{models.HEAD}/bias"]

  def chosen(params):  # static: names only
    return layer_signals.select_params(params, which)

  def only_head(params):
    return sorted(chosen(params)) == sorted(head_names)

  def closed_form_layers(params):
    return layer_signals.group_by_layer(chosen(params))

  def forward_fn(params, batch, rng):
    """The training forward pass; for the closed form beyond the head it
    also gives the chosen Dense and Conv layers' inputs and signals."""
    if not closed_form or only_head(params):
      return (*network.forward(params, batch["x"], rng), None)
    return layer_signals.forward_with_signals(
        network.forward, params, batch["x"], rng, batch["y"],
        list(closed_form_layers(params)))

  def reduce(grads, domain):
    if cfg.covariance == "full":
      return penalties.domain_grad_covariance(grads, domain, num_domains,
                                              centered=cfg.centered)
    return penalties.domain_grad_variance(grads, domain, num_domains,
                                          centered=cfg.centered)

  def head_grads(params, batch, features):
    """vmap(grad) of each example's loss w.r.t. the head, from its features."""
    def example_loss(head, z, y):
      logits = network.classify({**params, models.HEAD: head}, z[None])
      return losses.per_example_loss(logits, y[None])[0]
    return penalties.per_example_grads(
        example_loss, params[models.HEAD], features, batch["y"],
        chunk_size=cfg.get("vmap_chunk_size"))

  def network_grads(params, batch, rng):
    """vmap(grad) of each example's loss w.r.t. the chosen parameters, one
    forward pass per example (each with its own dropout key)."""
    def example_loss(chosen_params, x, y, key=None):
      full = layer_signals.with_subtree(params, chosen_params)
      _, logits = network.forward(full, x[None], key)
      return losses.per_example_loss(logits, y[None])[0]
    examples = (batch["x"], batch["y"])
    if rng is not None:
      examples += (jax.random.split(rng, batch["x"].shape[0]),)
    return penalties.per_example_grads(
        example_loss, layer_signals.subtree(params, chosen(params)),
        *examples, chunk_size=cfg.get("vmap_chunk_size"))

  def variances(params, batch, forward, rng):
    domain = batch["domain"]
    if only_head(params):
      if closed_form:
        return penalties.linear_head_grad_variance(
            forward.features, forward.logits, batch["y"], domain, num_domains,
            centered=cfg.centered, domain_blocks=domain_blocks)
      return reduce(head_grads(params, batch, forward.features), domain)
    if not closed_form:
      return reduce(network_grads(params, batch, rng), domain)
    out = {}
    for layer, leaves in closed_form_layers(params).items():
      variance = layer_signals.layer_grad_variance(
          forward.extras[layer], domain, num_domains, cfg.centered,
          domain_blocks)
      out[layer] = {leaf: variance[leaf] for leaf in leaves}
    return out

  def init_state(params, batch):
    if not cfg.ema:
      return ()

    def initial(params):
      forward, _ = base.domain_losses(network, params, batch, num_domains,
                                      None, forward_fn)
      return variances(params, batch, forward, None)

    shapes = jax.eval_shape(initial, params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def penalty_fn(params, state, batch, forward, rng):
    v = variances(params, batch, forward, rng)
    if cfg.ema:
      v, state = penalties.ema_update(state, v, cfg.ema)
    return penalties.fishr_penalty(v, cfg.reduction), state

  return base.penalized("fishr", network, num_domains, config,
                        lambda_=cfg.lambda_, penalty_fn=penalty_fn,
                        init_state=init_state, forward_fn=forward_fn)
