"""MLDG (Li et al., 2018), first-order, as DomainBed: the domains are split
at random into meta-train and `n_meta_test` meta-test domains and paired
(each meta-train domain i with a meta-test domain j, cycling); for each
pair a copy of the network takes one step of a fresh run's optimizer on i,
and the update steps along sum over pairs of (G_i + beta * G_j) / E, G_j
the gradient on j at the copy's weights. DomainBed hparams: mldg_beta,
n_meta_test.

The split is `draw_domain_order`'s; the batch comes in domain blocks.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import parallel
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  beta: float = ranges.field(1.0, ranges.NON_NEGATIVE,
                             "the meta-test gradient's weight")
  n_meta_test: int = ranges.field(2, ranges.POSITIVE_COUNT, "a domain count")

  def __post_init__(self):
    ranges.check_fields("mldg", self)


DOMAINBED = registry.DomainBedSpec(
    name="MLDG",
    hparams={"mldg_beta": (1., lambda r: 10**r.uniform(-1, 1)),
             "n_meta_test": (2, lambda r: int(r.choice([1, 2])))},
    to_config=lambda h: {"beta": h["mldg_beta"],
                         "n_meta_test": int(h["n_meta_test"])})


def draw_domain_order(rng: jax.Array, num_domains: int) -> jax.Array:
  """A random order of the domains: the last n_meta_test are meta-test."""
  return jax.random.permutation(rng, num_domains)


@registry.register("mldg", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  shards = parallel.data_shards(mesh)
  n_test = config.n_meta_test
  n_train = max(num_domains - n_test, 0)
  if not n_train:
    # DomainBed's random search draws n_meta_test 2 on ColoredMNIST's two
    # training domains too; its update then steps along zero gradients.
    print(f"Warning: mldg.n_meta_test={n_test} leaves no meta-train domain "
          f"among {num_domains}: as in DomainBed, each update changes the "
          "weights by weight decay alone.", flush=True)
  risk_and_grad = jax.value_and_grad(base.mean_risk, argnums=1)

  def update(tx, params, opt_state, state, batch, step, rng):
    del step
    split_rng, rng = jax.random.split(rng)
    order = draw_domain_order(split_rng, num_domains)
    block = lambda d: base.domain_block(batch, d, num_domains, shards)
    grads = jax.tree.map(jnp.zeros_like, params)
    objective = meta_train = 0.0
    for pair in range(n_train):
      i, j = order[pair], order[n_train + pair % n_test]
      pair_rng = jax.random.fold_in(rng, pair)
      risk_i, grads_i = risk_and_grad(network, params, block(i), schedule,
                                      pair_rng)
      inner, _ = base.apply_gradients(tx, grads_i, params, tx.init(params))
      risk_j, grads_j = risk_and_grad(network, inner, block(j), schedule,
                                      jax.random.fold_in(pair_rng, 1))
      grads = jax.tree.map(
          lambda g, gi, gj: g + (gi + config.beta * gj) / num_domains,
          grads, grads_i, grads_j)
      objective = objective + risk_i + config.beta * risk_j
      meta_train = meta_train + risk_i
    if n_train:
      nll = meta_train / n_train
    else:  # no pair: nothing measured on the way
      nll = base.mean_risk(network, params, batch, schedule, rng)
    params, opt_state = base.apply_gradients(tx, grads, params, opt_state)
    # loss: DomainBed's objective; nll: the meta-train domains' mean risk.
    return params, opt_state, state, {"loss": objective / num_domains,
                                      "nll": nll}

  return base.Algorithm(name="mldg", init_state=base.no_state, update=update,
                        needs_domain_blocks=True)
