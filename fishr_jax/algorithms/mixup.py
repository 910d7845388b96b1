"""Inter-domain Mixup (Xu et al., 2020; Yan et al., 2020), as DomainBed: the
domains are put in a random cycle, each consecutive pair's inputs mixed with
lam ~ Beta(alpha, alpha), and the loss is the lam-weighted cross-entropy to
both label sets. DomainBed hparam: mixup_alpha.

Needs equal-sized domains (what every DomainBed sampler gives); their order
in the batch does not matter (a sharded batch interleaves them).
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import losses
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry


@dataclasses.dataclass(frozen=True)
class Config:
  alpha: float = ranges.field(0.2, ranges.POSITIVE,
                              "the parameter of Beta(alpha, alpha)")

  def __post_init__(self):
    ranges.check_fields("mixup", self)


DOMAINBED = registry.DomainBedSpec(
    name="Mixup",
    hparams={"mixup_alpha": (0.2, lambda r: 10**r.uniform(-1, 1))},
    to_config=lambda h: {"alpha": h["mixup_alpha"]})


def draw_pairs(rng: jax.Array, num_domains: int, alpha: float
               ) -> tuple[jax.Array, jax.Array]:
  """Mixup's random draws: (first (E,) int, lam (E,)). Pair i mixes domain
  first[i] (weight lam[i]) with first[(i + 1) % E], as DomainBed's
  random_pairs_of_minibatches cycle with one np.random.beta per pair.

  Uses the first two of jax.random.split(rng, 3); the third is the step's
  dropout key. The one function the draws come from, so a test can pin them
  (tests/test_domainbed_updates.py replaces it by DomainBed's recorded draws).
  """
  perm_rng, lam_rng, _ = jax.random.split(rng, 3)
  first = jax.random.permutation(perm_rng, num_domains)
  lam = jax.random.beta(lam_rng, alpha, alpha, (num_domains,))
  return first, lam


@registry.register("mixup", Config, DOMAINBED)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh=None) -> base.Algorithm:
  del schedule, mesh  # Mixup has no penalty to schedule
  alpha = config.alpha

  def loss_fn(params, state, batch, step, rng):
    del step
    # Stable: each domain's examples keep their order, as DomainBed's cycle.
    by_domain = jnp.argsort(batch["domain"], stable=True)
    x, y = batch["x"][by_domain], batch["y"][by_domain]
    if x.shape[0] % num_domains:
      raise ValueError(f"Mixup needs equal domain batches; got {x.shape[0]} "
                       f"examples for {num_domains} domains.")
    if rng is None:
      raise ValueError("Mixup draws random pairs and weights: it needs an rng.")
    per_domain = lambda a: a.reshape((num_domains, -1) + a.shape[1:])
    x, y = per_domain(x), per_domain(y)
    first, lam = draw_pairs(rng, num_domains, alpha)
    dropout_rng = jax.random.split(rng, 3)[2]
    second = jnp.roll(first, -1)
    lam_x = lam.reshape((num_domains,) + (1,) * (x.ndim - 1))
    mixed = lam_x * x[first] + (1.0 - lam_x) * x[second]
    _, logits = network.forward(params, mixed.reshape((-1,) + x.shape[2:]),
                                dropout_rng)
    logits = per_domain(logits)
    nll = lambda labels: losses.per_example_loss(logits, labels).mean(axis=1)
    loss = jnp.mean(lam * nll(y[first]) + (1.0 - lam) * nll(y[second]))
    return loss, (state, {"loss": loss, "nll": loss})

  return base.Algorithm(name="mixup", init_state=base.no_state, loss_fn=loss_fn)
