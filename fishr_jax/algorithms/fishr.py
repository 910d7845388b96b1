"""Fishr (Rame et al., ICML 2022): match the domains' gradient variances.

loss = mean_e risk_e + weight(step) * mean_e ||v_e - mean_e v_e||^2, with v_e
the variance over domain e's examples of their loss gradients (the head's,
in the paper), optionally smoothed by DomainBed's moving average.

`make` picks, once, how the variances are computed, among four functions a
reader can open one by one: the head in closed form (the default), the head
by vmap(grad), chosen layers in closed form, chosen layers by vmap(grad).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fishr_jax import fast_paths
from fishr_jax import layer_signals
from fishr_jax import losses
from fishr_jax import models
from fishr_jax import penalties
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

GRAD_PATHS = ("closed_form", "vmap")
COVARIANCES = ("diagonal", "full")
REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class Config:
  """Fishr's options; the defaults are DomainBed's."""
  lambda_: float = 1000.0  # penalty weight once annealing is over
  ema: float = 0.95  # moving-average decay of the variances (0: none)
  reduction: str = "mean"  # "mean" (DomainBed) or "sum" (IRM-setup script)
  centered: bool = True  # False: raw second moment (the paper's ablation)
  covariance: str = "diagonal"  # or "full" (off-diagonal ablation)
  # Whose gradients: "head" (the paper), "all", or a regular expression
  # searched in names such as "hidden_0/kernel".
  params: str = "head"
  # "closed_form": exact variances of Dense and Conv layers from their inputs
  # and backpropagated signals; "vmap": jax.vmap(jax.grad), any parameter.
  grad_path: str = "closed_form"
  vmap_chunk_size: int | None = None  # examples per vmap chunk (memory only)
  # How a Dense layer's moments are summed (fast_paths.py); the experiment
  # configs default to "auto".
  moment_sums: str = "reference"

  def __post_init__(self):
    for field, allowed in (("grad_path", GRAD_PATHS),
                           ("covariance", COVARIANCES),
                           ("reduction", REDUCTIONS),
                           ("moment_sums", fast_paths.MOMENT_SUMS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"fishr.{field} must be one of {allowed}, got "
                         f"{getattr(self, field)!r}.")
    if self.covariance == "full" and self.grad_path != "vmap":
      raise ValueError("fishr.covariance='full' needs the per-example "
                       "gradients: set fishr.grad_path='vmap'.")
    if not 0.0 <= self.ema < 1.0:
      raise ValueError(f"fishr.ema must be in [0, 1), got {self.ema}.")


DOMAINBED = registry.DomainBedSpec(
    name="Fishr",
    hparams={
        "lambda": (1000.0, lambda r: 10**r.uniform(1.0, 4.0)),
        "penalty_anneal_iters": (1500, lambda r: int(r.uniform(0.0, 5000.0))),
        "ema": (0.95, lambda r: r.uniform(0.90, 0.99)),
    },
    to_config=lambda h: {"lambda_": h["lambda"], "ema": h["ema"]},
    to_schedule=lambda h: {
        "penalty_anneal_iters": h["penalty_anneal_iters"],
        "reset_optimizer_at_anneal": True})


def reduce_grads(grads, domain, num_domains, config: Config):
  """Per-domain variances (or covariances) of per-example gradients."""
  if config.covariance == "full":
    return penalties.domain_grad_covariance(grads, domain, num_domains,
                                            config.centered)
  return penalties.domain_grad_variance(grads, domain, num_domains,
                                        config.centered)


def head_closed_form(network, params, batch, forward, rng, *, num_domains,
                     config, dense_variance):
  """The head's exact variances from its features and loss residuals."""
  del network, params, rng
  residual = losses.loss_residual(forward.logits, batch["y"])
  return dense_variance(forward.features, residual, batch["domain"],
                        num_domains, config.centered)


def head_vmap(network, params, batch, forward, rng, *, num_domains, config,
              dense_variance):
  """vmap(grad) of each example's loss w.r.t. the head, from its features."""
  del rng, dense_variance

  def example_loss(head, z, y):
    logits = network.classify({**params, models.HEAD: head}, z[None])
    return losses.per_example_loss(logits, y[None])[0]

  grads = penalties.per_example_grads(example_loss, params[models.HEAD],
                                      forward.features, batch["y"],
                                      chunk_size=config.vmap_chunk_size)
  return reduce_grads(grads, batch["domain"], num_domains, config)


def layers_closed_form(network, params, batch, forward, rng, *, num_domains,
                       config, dense_variance):
  """Chosen Dense/Conv layers' exact variances from the signals that
  `forward_with_layer_signals` recorded."""
  del network, rng
  chosen = layer_signals.select_params(params, config.params)
  out = {}
  for layer, leaves in layer_signals.group_by_layer(chosen).items():
    variance = layer_signals.layer_grad_variance(
        forward.extras[layer], batch["domain"], num_domains, config.centered,
        dense_variance)
    out[layer] = {leaf: variance[leaf] for leaf in leaves}
  return out


def layers_vmap(network, params, batch, forward, rng, *, num_domains, config,
                dense_variance):
  """vmap(grad) of each example's loss w.r.t. the chosen parameters, one
  forward pass per example (each with its own dropout key)."""
  del forward, dense_variance

  def example_loss(chosen, x, y, key=None):
    _, logits = network.forward(layer_signals.with_subtree(params, chosen),
                                x[None], key)
    return losses.per_example_loss(logits, y[None])[0]

  examples = (batch["x"], batch["y"])
  if rng is not None:
    examples += (jax.random.split(rng, batch["x"].shape[0]),)
  chosen = layer_signals.subtree(
      params, layer_signals.select_params(params, config.params))
  grads = penalties.per_example_grads(example_loss, chosen, *examples,
                                      chunk_size=config.vmap_chunk_size)
  return reduce_grads(grads, batch["domain"], num_domains, config)


def forward_with_layer_signals(network, params, batch, rng, *, config):
  """The training forward pass, plus the chosen layers' inputs and signals."""
  layers = layer_signals.group_by_layer(
      layer_signals.select_params(params, config.params))
  return layer_signals.forward_with_signals(network.forward, params,
                                            batch["x"], rng, batch["y"],
                                            list(layers))


@registry.register("fishr", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh: Any = None) -> base.Algorithm:
  head = config.params == "head"
  closed_form = config.grad_path == "closed_form"
  variance_fn = {(True, True): head_closed_form, (True, False): head_vmap,
                 (False, True): layers_closed_form,
                 (False, False): layers_vmap}[head, closed_form]
  platform = (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform
  dense_variance = fast_paths.dense_grad_variance_fn(
      config.moment_sums, platform, 1 if mesh is None else mesh.size)
  forward_fn = None
  if closed_form and not head:
    forward_fn = lambda p, b, r: forward_with_layer_signals(network, p, b, r,
                                                            config=config)

  def variances(params, batch, forward, rng):
    return variance_fn(network, params, batch, forward, rng,
                       num_domains=num_domains, config=config,
                       dense_variance=dense_variance)

  def init_state(params, batch):
    if not config.ema:
      return ()

    def initial(params):
      forward, _ = base.domain_losses(network, params, batch, num_domains,
                                      None, forward_fn)
      return variances(params, batch, forward, None)

    shapes = jax.eval_shape(initial, params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def penalty_fn(params, state, batch, forward, rng):
    v = variances(params, batch, forward, rng)
    if config.ema:
      v, state = penalties.ema_update(state, v, config.ema)
    return penalties.fishr_penalty(v, config.reduction), state

  return base.penalized(
      "fishr", network, num_domains, schedule, lambda_=config.lambda_,
      penalty_fn=penalty_fn, init_state=init_state, forward_fn=forward_fn,
      needs_domain_blocks=(closed_form and fast_paths.needs_domain_blocks(
          config.moment_sums)))
