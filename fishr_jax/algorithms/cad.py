"""CAD and CondCAD (Ruan et al., 2022), as DomainBed: the mean risk plus
`lmbda` times a contrastive domain bottleneck on the
features (SupCon-style, temperature `temperature`).

For each example i, p_i(j) is the softmax over the other examples j of
z_i.z_j / temperature. CAD's bottleneck is -(temperature / 0.07) log sum
p_i(j) over the j from other domains; CondCAD's takes p_i over the j with
i's label, and sums over those from other domains. It is averaged over
the examples that have such a j (CAD: any j with i's label), leaving out
non-finite terms, as DomainBed's `finite_mean` does.

DomainBed's random search only ever samples is_flipped=True and
is_project=False (its projection head names an undefined variable), so
those are the only values taken here.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fishr_jax import errors
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

BASE_TEMPERATURE = 0.07  # DomainBed's


@dataclasses.dataclass(frozen=True)
class Config:
  lambda_: float = ranges.field(1e-1, ranges.NON_NEGATIVE, "a penalty weight")
  temperature: float = ranges.field(0.1, ranges.POSITIVE, "a temperature")
  # L2-normalize the features before their dot products.
  normalize: bool = False

  def __post_init__(self):
    ranges.check_fields("cad", self)


def _to_config(h):
  for name, only in (("is_flipped", True), ("is_project", False)):
    if bool(h[name]) != only:
      raise errors.ConfigError(
          f"CAD's hparam {name}={h[name]!r} is not supported: DomainBed's "
          f"search only samples {name}={only}.")
  return {"lambda_": h["lmbda"], "temperature": h["temperature"],
          "normalize": bool(h["is_normalized"])}


def _domainbed(name: str) -> registry.DomainBedSpec:
  return registry.DomainBedSpec(
      name=name,
      hparams={
          "lmbda": (1e-1, lambda r: r.choice(
              [1e-4, 1e-3, 1e-2, 1e-1, 1, 1e1, 1e2])),
          "temperature": (0.1, lambda r: r.choice([0.05, 0.1])),
          "is_normalized": (False, lambda r: False),
          "is_project": (False, lambda r: False),
          "is_flipped": (True, lambda r: True),
      },
      to_config=_to_config)


def _masked_logsumexp(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Each row's logsumexp over its `mask`ed entries; -inf for a row with
  none, with a zero (not NaN) gradient there."""
  some = mask.any(axis=1)
  safe = jnp.where(some[:, None], jnp.where(mask, values, -jnp.inf), 0.0)
  return jnp.where(some, jax.nn.logsumexp(safe, axis=1), -jnp.inf)


def bottleneck(features: jax.Array, labels: jax.Array, domains: jax.Array,
               temperature: float, conditional: bool,
               normalize: bool = False) -> jax.Array:
  """The contrastive domain bottleneck of the module docstring."""
  n = features.shape[0]
  if normalize:  # torch's F.normalize: x / max(||x||, 1e-12)
    norms = jnp.linalg.norm(features, axis=1, keepdims=True)
    features = features / jnp.maximum(norms, 1e-12)
  others = ~jnp.eye(n, dtype=bool)
  same_label = (labels[:, None] == labels[None, :]) & others
  same_domain = domains[:, None] == domains[None, :]
  label_other_domain = same_label & ~same_domain
  logits = jnp.matmul(features, features.T,
                      precision=jax.lax.Precision.HIGHEST) / temperature
  logits = logits * others  # DomainBed zeroes the diagonal, then subtracts
  logits = logits - jax.lax.stop_gradient(logits.max(axis=1, keepdims=True))
  scale = temperature / BASE_TEMPERATURE
  if conditional:
    valid = label_other_domain.any(axis=1)
    log_prob = logits - _masked_logsumexp(logits, same_label)[:, None]
    terms = -scale * _masked_logsumexp(log_prob, label_other_domain)
  else:
    valid = same_label.any(axis=1)
    log_prob = logits - _masked_logsumexp(logits, others)[:, None]
    terms = -scale * _masked_logsumexp(log_prob, ~same_domain)
  keep = valid & jnp.isfinite(terms)
  total = jnp.where(keep, terms, 0.0).sum()
  return total / jnp.maximum(keep.sum(), 1).astype(total.dtype)


def _make(name: str, conditional: bool):
  def make(network: base.Network, num_domains: int, config: Config,
           schedule: base.Schedule, mesh=None) -> base.Algorithm:
    del mesh

    def penalty_fn(params, state, batch, forward, rng):
      del params, rng
      return bottleneck(forward.features, batch["y"], batch["domain"],
                        config.temperature, conditional,
                        config.normalize), state

    return base.penalized(name, network, num_domains, schedule,
                          lambda_=config.lambda_, penalty_fn=penalty_fn)
  return make


registry.register("cad", Config, _domainbed("CAD"))(_make("cad", False))
registry.register("condcad", Config, _domainbed("CondCAD"))(
    _make("condcad", True))
