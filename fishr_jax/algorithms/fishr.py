"""Fishr (Rame et al., ICML 2022): match the domains' gradient variances.

config.fishr:
  lambda_     penalty weight once annealing is over.
  ema         moving-average decay of the per-domain variances (0: none).
  reduction   "mean" (DomainBed) or "sum" (IRM-setup Colored MNIST script).
  centered    centered variance (True) or raw second moment (ablation).
  covariance  "diagonal" (the method) or "full" (off-diagonal ablation).
  grad_path   "closed_form": exact moments of the linear head from its inputs
              and residuals, O(N*D*C); "vmap": jax.vmap(jax.grad) over the
              head's parameters (any head; needed for covariance="full").
"""

import jax
import jax.numpy as jnp

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
  if cfg.grad_path not in GRAD_PATHS:
    raise ValueError(f"fishr.grad_path must be one of {GRAD_PATHS}, "
                     f"got {cfg.grad_path!r}.")
  if cfg.covariance not in COVARIANCES:
    raise ValueError(f"fishr.covariance must be one of {COVARIANCES}, "
                     f"got {cfg.covariance!r}.")
  if cfg.covariance == "full" and cfg.grad_path != "vmap":
    raise ValueError("fishr.covariance='full' needs the per-example gradients:"
                     " set fishr.grad_path='vmap'.")

  def head_loss(head, features, label, params):
    logits = network.classify({**params, models.HEAD: head}, features)
    return losses.per_example_loss(logits, label)

  def head_variances(params, batch, features, logits):
    domain, labels = batch["domain"], batch["y"]
    if cfg.grad_path == "closed_form":
      return penalties.linear_head_grad_variance(
          features, logits, labels, domain, num_domains, centered=cfg.centered)
    grads = penalties.per_example_grads(
        lambda head, z, y: head_loss(head, z, y, params), params[models.HEAD],
        features, labels, chunk_size=cfg.get("vmap_chunk_size"))
    if cfg.covariance == "full":
      return penalties.domain_grad_covariance(grads, domain, num_domains,
                                              centered=cfg.centered)
    return penalties.domain_grad_variance(grads, domain, num_domains,
                                          centered=cfg.centered)

  def init_state(params, batch):
    if not cfg.ema:
      return ()

    def variances(params):
      features, logits = network.forward(params, batch["x"], None)
      return head_variances(params, batch, features, logits)

    shapes = jax.eval_shape(variances, params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def penalty_fn(params, state, batch, forward):
    variances = head_variances(params, batch, forward.features, forward.logits)
    if cfg.ema:
      variances, state = penalties.ema_update(state, variances, cfg.ema)
    return penalties.fishr_penalty(variances, cfg.reduction), state

  return base.penalized("fishr", network, num_domains, config,
                        lambda_=cfg.lambda_, penalty_fn=penalty_fn,
                        init_state=init_state)
