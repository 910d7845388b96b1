"""CausIRL_CORAL and CausIRL_MMD (Chevalley et al., 2022), as DomainBed:
ERM plus a distance between two halves of the batch's features, cut at a
random point inside each domain. Each domain's first `cut_e` examples (in
batch order) go to one half, the rest to the other; CORAL's distance (means
and unbiased covariances) or MMD's (a sum of Gaussian kernels) between the
halves is the penalty, weighted by `mmd_gamma`; 0 when a half has fewer
than 2 examples.

The halves are masks over the batch, so their sizes may change from step
to step inside one compiled program.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import penalties
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(1.0, ranges.NON_NEGATIVE, "a penalty weight")

  def __post_init__(self):
    ranges.check_fields("causirl", self)


def _domainbed(name: str) -> registry.DomainBedSpec:
  return registry.DomainBedSpec(
      name=name,
      hparams={"mmd_gamma": (1.0, lambda r: 10**r.uniform(-1, 1))},
      to_config=lambda h: {"lambda_": h["mmd_gamma"]})


def draw_cuts(rng: jax.Array, counts: jax.Array) -> jax.Array:
  """Each domain's cut, uniform in [0, count_e) (DomainBed's
  np.random.randint(0, len(features[e])))."""
  return jax.random.randint(rng, counts.shape, 0, counts)


def _first_half(batch: base.Batch, num_domains: int,
                rng: jax.Array) -> jax.Array:
  """(N,) True for the examples before their domain's cut."""
  counts = jnp.bincount(batch["domain"], length=num_domains)
  cuts = draw_cuts(rng, counts)
  return (penalties.rank_in_domain(batch["domain"], num_domains)
          < cuts[batch["domain"]])


def _halves(first: jax.Array, dtype) -> jax.Array:
  """(2, N): each half's membership weights."""
  return jnp.stack([first, ~first]).astype(dtype)


def coral_distance(features: jax.Array, first: jax.Array) -> jax.Array:
  """Mean squared difference of the two halves' means plus that of their
  unbiased covariances; `first` (N,) is True for half 1's examples."""
  halves = _halves(first, features.dtype)
  counts = halves.sum(axis=1)
  means = jnp.matmul(halves, features, precision=_EXACT) / jnp.maximum(
      counts, 1.0)[:, None]
  centered = features[None] - means[:, None]  # (2, N, D)
  covs = jnp.einsum("hn,hnd,hne->hde", halves, centered, centered,
                    precision=_EXACT)
  covs = covs / jnp.maximum(counts - 1.0, 1.0)[:, None, None]
  return ((means[0] - means[1])**2).mean() + ((covs[0] - covs[1])**2).mean()


def mmd_distance(features: jax.Array, first: jax.Array) -> jax.Array:
  """K_11 + K_22 - 2 K_12 with K MMD's sum of Gaussian kernels
  (penalties.gaussian_kernels) averaged over each pair of halves."""
  halves = _halves(first, features.dtype)
  counts = jnp.maximum(halves.sum(axis=1), 1.0)
  kernel = penalties.gaussian_kernels(features)
  mean_kernel = jnp.matmul(jnp.matmul(halves, kernel, precision=_EXACT),
                           halves.T, precision=_EXACT)
  mean_kernel = mean_kernel / (counts[:, None] * counts[None])
  return mean_kernel[0, 0] + mean_kernel[1, 1] - 2.0 * mean_kernel[0, 1]


def _make(name: str, distance):
  def make(network: base.Network, num_domains: int, config: Config,
           schedule: base.Schedule, mesh=None) -> base.Algorithm:
    del mesh

    def penalty_fn(params, state, batch, forward, rng):
      del params
      # The step's rng also drives the network's dropout: a key of its own.
      first = _first_half(batch, num_domains, jax.random.fold_in(rng, 1))
      sizes = first.sum(), (~first).sum()
      penalty = jnp.where((sizes[0] > 1) & (sizes[1] > 1),
                          jnp.nan_to_num(distance(forward.features, first)),
                          0.0)
      return penalty, state

    return base.penalized(name, network, num_domains, schedule,
                          lambda_=config.lambda_, penalty_fn=penalty_fn)
  return make


registry.register("causirl_coral", Config, _domainbed("CausIRL_CORAL"))(
    _make("causirl_coral", coral_distance))
registry.register("causirl_mmd", Config, _domainbed("CausIRL_MMD"))(
    _make("causirl_mmd", mmd_distance))
