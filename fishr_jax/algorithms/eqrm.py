"""EQRM (Eastwood et al., 2022), as DomainBed: after `burnin_iters` steps
of ERM with the run's optimizer, minimize the `quantile`-quantile of the
domains' risks, estimated by a Gaussian kernel density over them, with an
Adam of its own (learning rate `lr`, DomainBed's eqrm_lr; fresh at the
burn-in step, as DomainBed builds it there).

DomainBed builds that Adam when its step count equals eqrm_burnin_iters,
which its random search draws as a float (10**uniform(2.5, 3.5)): a drawn
value is never reached, so such a run switches to the quantile at the first
step past it and keeps the run's optimizer. `switch_optimizer` says which
(True for an integer burn-in, e.g. the default 2500).

The quantile is found as DomainBed's `continuous_bisect_fun_left` finds it:
32 halvings of [lo, hi] on the density's CDF, stopping when the midpoint no
longer moves; the result is a mix of lo and hi, through which its gradient
flows to the risks (the comparisons choose the mix).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy import special

from fishr_jax import optimizers
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

BISECTION_STEPS = 32  # DomainBed's


@dataclasses.dataclass(frozen=True)
class Config:
  quantile: float = ranges.field(0.75, ranges.Range(0.0, 1.0, low_open=True,
                                                    high_open=True),
                                 "a probability")
  burnin_iters: int = ranges.field(2500, ranges.COUNT, "a step")
  # Whether the Adam below takes over at burnin_iters (module docstring).
  switch_optimizer: bool = True
  # The Adam after burn-in: DomainBed's eqrm_lr and its weight_decay hparam.
  lr: float = ranges.field(1e-6, ranges.POSITIVE, "a learning rate")
  weight_decay: float = ranges.field(0.0, ranges.NON_NEGATIVE, "a decay")

  def __post_init__(self):
    ranges.check_fields("eqrm", self)


DOMAINBED = registry.DomainBedSpec(
    name="EQRM",
    hparams={
        "eqrm_quantile": (0.75, lambda r: r.uniform(0.5, 0.99)),
        "eqrm_burnin_iters": (2500, lambda r: 10**r.uniform(2.5, 3.5)),
        "eqrm_lr": (1e-6, lambda r: 10**r.uniform(-7, -5)),
    },
    to_config=lambda h: {
        "quantile": h["eqrm_quantile"],
        "burnin_iters": math.ceil(h["eqrm_burnin_iters"]),
        "switch_optimizer": float(h["eqrm_burnin_iters"]).is_integer(),
        "lr": h["eqrm_lr"],
        # The run's weight decay (DomainBed's default 0 when absent).
        "weight_decay": h.get("weight_decay", 0.0)})


def kde_quantile(risks: jax.Array, q: float | jax.Array) -> jax.Array:
  """The q-quantile of a Gaussian kernel density over `risks` (E,), with
  DomainBed's Gauss-optimal bandwidth 1.06 std n^-0.2, by bisection."""
  data = jnp.sort(risks)
  n = data.shape[0]
  bandwidth = 1.06 * jnp.std(data, ddof=1) * n**-0.2
  z = special.ndtri(q)
  lo, hi = data[0] + bandwidth * z, data[-1] + bandwidth * z

  def cdf(x):
    return special.ndtr((x - data) / bandwidth).mean()

  def halve(_, carry):
    lo, hi, k, done = carry
    above = jax.lax.stop_gradient(cdf(k) > q)
    new_lo, new_hi = jnp.where(above, lo, k), jnp.where(above, k, hi)
    next_k = 0.5 * (new_lo + new_hi)
    stop = done | (next_k == k)
    keep = lambda old, new: jnp.where(done, old, new)
    return (keep(lo, new_lo), keep(hi, new_hi), jnp.where(stop, k, next_k),
            stop)

  _, _, k, _ = jax.lax.fori_loop(0, BISECTION_STEPS, halve,
                                 (lo, hi, 0.5 * (lo + hi), False))
  return k


@registry.register("eqrm", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del schedule, mesh
  adam = optimizers.torch_adam(config.lr, config.weight_decay)

  def loss_fn(params, state, batch, step, rng):
    forward, metrics = base.domain_losses(network, params, batch, num_domains,
                                          rng)
    # cond, not where: the quantile's bandwidth may be 0 during burn-in (a
    # NaN gradient even with a zero weight).
    loss = jax.lax.cond(step < config.burnin_iters, jnp.mean,
                        lambda risks: kde_quantile(risks, config.quantile),
                        forward.domain_nll)
    metrics["loss"] = loss
    return loss, (state, metrics)

  if not config.switch_optimizer:
    return base.Algorithm(name="eqrm", init_state=base.no_state,
                          loss_fn=loss_fn)

  def init_optimizer(tx, params):
    return {"burn_in": tx.init(params), "eqrm": adam.init(params)}

  def update(tx, params, opt_state, state, batch, step, rng):
    grads, (state, metrics) = jax.grad(loss_fn, has_aux=True)(
        params, state, batch, step, rng)
    burn_in = step < config.burnin_iters
    # Both optimizers' steps, the one whose phase it is kept; the other's
    # state stays as it was (the eqrm Adam is fresh at the burn-in step).
    pick = lambda during, after: jax.tree.map(
        lambda a, b: jnp.where(burn_in, a, b), during, after)
    erm_params, erm_opt = base.apply_gradients(tx, grads, params,
                                               opt_state["burn_in"])
    eqrm_params, eqrm_opt = base.apply_gradients(adam, grads, params,
                                                 opt_state["eqrm"])
    opt_state = {"burn_in": pick(erm_opt, opt_state["burn_in"]),
                 "eqrm": pick(opt_state["eqrm"], eqrm_opt)}
    return pick(erm_params, eqrm_params), opt_state, state, metrics

  return base.Algorithm(name="eqrm", init_state=base.no_state, update=update,
                        init_optimizer=init_optimizer)
