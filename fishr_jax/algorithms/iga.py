"""IGA, Inter-environmental Gradient Alignment (Koyama & Yamaguchi, 2020):
penalise each domain's risk gradient's squared distance to the mean
gradient, sum over domains and parameters. As DomainBed, the mean gradient
is a constant of the penalty's own gradient (no create_graph there), each
domain's gradient is differentiated through (second order). DomainBed
hparam: penalty.

The plain version is that loss (`gradient_spread` of `domain_gradients`,
through `base.penalized`); the update below takes the same step with the
spread's gradient as Hessian-vector products, forward-over-reverse, which
XLA:CPU runs far faster than the reverse-over-reverse of that loss
(results/benchmark_all_algorithms_cpu.md; tests/test_iga.py: equal to 1e-10
in float64).
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(1e3, ranges.NON_NEGATIVE, "a penalty weight")

  def __post_init__(self):
    ranges.check_fields("iga", self)


DOMAINBED = registry.DomainBedSpec(
    name="IGA",
    hparams={"penalty": (1000, lambda r: 10**r.uniform(1, 5))},
    to_config=lambda h: {"lambda_": float(h["penalty"])})


def gradient_spread(domain_grads) -> jax.Array:
  """sum_e ||g_e - stop_gradient(mean_e g_e)||^2 over every parameter."""
  def spread(g):
    mean = jax.lax.stop_gradient(g.mean(axis=0))
    return jnp.sum((g - mean)**2)
  return sum(spread(g) for g in jax.tree.leaves(domain_grads))


def spread_gradient(risks, params, domain_grads):
  """d/dparams of `gradient_spread` (the mean gradient a constant):
  sum_e 2 H_e (g_e - mean g), each Hessian-vector product forward-over-
  reverse (much faster on XLA:CPU than differentiating the gradients).
  `risks(params)` is (E,), `domain_grads` its per-domain gradients."""
  mean = jax.tree.map(lambda g: g.mean(axis=0), domain_grads)
  total = jax.tree.map(jnp.zeros_like, params)
  for e in range(len(jax.tree.leaves(domain_grads)[0])):
    direction = jax.tree.map(lambda g, m: 2 * (g[e] - m), domain_grads, mean)
    _, hvp = jax.jvp(jax.grad(lambda p: risks(p)[e]), (params,), (direction,))
    total = jax.tree.map(jnp.add, total, hvp)
  return total


@registry.register("iga", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del mesh

  def update(tx, params, opt_state, state, batch, step, rng):
    """One step along mean risk + weight * spread, as the loss `penalized`
    builds (its rescaling too), with the spread's gradient by HVPs."""
    risks = lambda p: base.domain_losses(network, p, batch, num_domains,
                                         rng)[0].domain_nll
    grads, _, metrics = base.domain_gradients(network, params, batch,
                                              num_domains, schedule, rng)
    # Each domain's gradient includes the L2 term's: their mean is the mean
    # objective's gradient, and the L2 term cancels in the spread.
    objective_grad = jax.tree.map(lambda g: g.mean(axis=0), grads)
    penalty = gradient_spread(grads)
    weight = base.penalty_weight(step, config.lambda_, schedule)
    total = jax.tree.map(lambda g, h: g + weight * h, objective_grad,
                         spread_gradient(risks, params, grads))
    loss = metrics["nll"] + base.l2_term(params, schedule) + weight * penalty
    if schedule.rescale_loss:
      scale = jnp.where(weight > 1.0, weight, 1.0)
      total = jax.tree.map(lambda g: g / scale, total)
      loss = loss / scale
    params, opt_state = base.apply_gradients(tx, total, params, opt_state)
    metrics.update(penalty=penalty, penalty_weight=weight, loss=loss)
    return params, opt_state, state, metrics

  return base.Algorithm(name="iga", init_state=base.no_state, update=update)
