"""Fishr (Rame et al., ICML 2022): match the domains' gradient variances.

loss = mean_e risk_e + weight(step) * mean_e ||v_e - mean_e v_e||^2, v_e the
variance of domain e's per-example loss gradients (the head's in the paper),
optionally smoothed by DomainBed's moving average. `make` picks, once, one of
four variance functions: head or chosen layers, closed form or vmap(grad).
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax

from fishr_jax import errors
from fishr_jax import fast_paths
from fishr_jax import layer_signals
from fishr_jax import losses
from fishr_jax import parallel
from fishr_jax import penalties
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

GRAD_PATHS = ("closed_form", "vmap")
COVARIANCES = ("diagonal", "full")
REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class Config:
  """Fishr's options; the defaults are DomainBed's."""
  # penalty weight once annealing is over
  lambda_: float = ranges.field(1000.0, ranges.NON_NEGATIVE, "a penalty weight")
  # moving-average decay of the variances (0: none)
  ema: float = ranges.field(0.95, ranges.DECAY, "a moving-average decay")
  reduction: str = "mean"  # "mean" (DomainBed) or "sum" (IRM-setup script)
  centered: bool = True  # False: raw second moment (the paper's ablation)
  covariance: str = "diagonal"  # or "full" (off-diagonal ablation)
  params: str = "head"  # "head" (the paper), "all", or a regex over names
  grad_path: str = "closed_form"  # exact, from layer signals; or "vmap"
  # examples per vmap chunk (memory only)
  vmap_chunk_size: int | None = ranges.field(
      None, dataclasses.replace(ranges.POSITIVE_COUNT, optional=True))
  moment_sums: str = "reference"  # fast_paths.py; the experiment configs: auto

  def __post_init__(self):
    base.check_choices("fishr", grad_path=(self.grad_path, GRAD_PATHS),
                       covariance=(self.covariance, COVARIANCES),
                       reduction=(self.reduction, REDUCTIONS),
                       moment_sums=(self.moment_sums, fast_paths.MOMENT_SUMS))
    if self.covariance == "full" and self.grad_path != "vmap":
      raise errors.ConfigError("fishr.covariance='full' needs the per-example "
                               "gradients: set fishr.grad_path='vmap'.")
    ranges.check_fields("fishr", self)


DOMAINBED = registry.DomainBedSpec(
    name="Fishr",
    hparams={"lambda": (1000.0, lambda r: 10**r.uniform(1.0, 4.0)),
             "penalty_anneal_iters": (1500, lambda r: int(r.uniform(0, 5000))),
             "ema": (0.95, lambda r: r.uniform(0.90, 0.99))},
    to_config=lambda h: {"lambda_": h["lambda"], "ema": h["ema"]},
    to_schedule=lambda h: {"penalty_anneal_iters": h["penalty_anneal_iters"],
                           "reset_optimizer_at_anneal": True})


class Setup(NamedTuple):
  """What the variance functions read besides the step's inputs."""
  network: base.Network
  num_domains: int
  config: Config
  dense_variance: fast_paths.DenseGradVariance


def reduce_grads(setup: Setup, grads, domain):
  """Per-domain variances (or covariances) of per-example gradients."""
  full = setup.config.covariance == "full"
  return (penalties.domain_grad_covariance if full else
          penalties.domain_grad_variance)(grads, domain, setup.num_domains,
                                          setup.config.centered)


def head_closed_form(setup: Setup, params, batch, forward, rng):
  """The head's exact variances from its features and loss residuals."""
  del params, rng
  residual = losses.loss_residual(forward.logits, batch["y"])
  return setup.dense_variance(forward.features, residual, batch["domain"],
                              setup.num_domains, setup.config.centered)


def head_vmap(setup: Setup, params, batch, forward, rng):
  """vmap(grad) of each example's loss w.r.t. the head, from its features."""
  del rng
  grads = layer_signals.head_per_example_grads(
      setup.network.classify, params, forward.features, batch["y"],
      setup.config.vmap_chunk_size)
  return reduce_grads(setup, grads, batch["domain"])


def layers_closed_form(setup: Setup, params, batch, forward, rng):
  """The chosen Dense/Conv layers' exact variances, from the inputs and
  signals the forward pass recorded (layer_signals.py)."""
  del rng
  return layer_signals.chosen_layer_variances(
      forward.extras, params, setup.config.params, batch["domain"],
      setup.num_domains, setup.config.centered, setup.dense_variance)


def layers_vmap(setup: Setup, params, batch, forward, rng):
  """vmap(grad) w.r.t. the chosen parameters, one forward pass per example."""
  del forward
  grads = layer_signals.chosen_per_example_grads(
      setup.network.forward, params, setup.config.params, batch["x"],
      batch["y"], rng, setup.config.vmap_chunk_size)
  return reduce_grads(setup, grads, batch["domain"])


@registry.register("fishr", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh: Any = None) -> base.Algorithm:
  head, closed_form = config.params == "head", config.grad_path == "closed_form"
  variance_fn = {(True, True): head_closed_form, (True, False): head_vmap,
                 (False, True): layers_closed_form, (False, False): layers_vmap
                 }[head, closed_form]
  device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
  setup = Setup(network, num_domains, config, fast_paths.dense_grad_variance_fn(
      config.moment_sums, device.platform, parallel.data_shards(mesh)))
  forward_fn = None
  if closed_form and not head:
    forward_fn = lambda p, b, r: layer_signals.forward_with_chosen_signals(
        network.forward, config.params, p, b["x"], r, b["y"])

  variances = functools.partial(variance_fn, setup)

  def init_state(params, batch):  # the moving averages start at zero
    if base.is_zero(config.ema):
      return ()
    forward = lambda p: base.domain_losses(network, p, batch, num_domains, None,
                                           forward_fn)[0]
    return base.zeros_like_output(
        lambda p: variances(p, batch, forward(p), None), params)

  def penalty_fn(params, state, batch, forward, rng):
    v = variances(params, batch, forward, rng)
    if not base.is_zero(config.ema):
      v, state = penalties.ema_update(state, v, config.ema)
    return penalties.fishr_penalty(v, config.reduction), state

  return base.penalized(
      "fishr", network, num_domains, schedule, lambda_=config.lambda_,
      penalty_fn=penalty_fn, init_state=init_state, forward_fn=forward_fn,
      needs_domain_blocks=(closed_form and fast_paths.needs_domain_blocks(
          config.moment_sums)))
