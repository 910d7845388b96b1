"""Domain-level loss landscapes: Hessian diagonals, gradient variances and
the empirical Fisher per domain, and how they differ between domains.

The Fishr paper claims that matching the domains' gradient variances aligns
their loss landscapes around the final weights, and shows it on Colored
MNIST by tracking the distance between two domains' gradient variances and
between their Hessian diagonals over training. This module measures those
quantities for any network, at given parameters:

  hessian_e = mean_{i in e} diag(d^2 loss_i / d theta^2)
  variance_e = mean_{i in e} (g_i - mean_{i in e} g_i)^2   (Fishr's, centered)
  fisher_e   = mean_{i in e} g_i^2                          (empirical Fisher)

with g_i = d loss_i / d theta, loss_i the cross-entropy of example i alone.

The Hessian diagonal is exact. Per example, the Hessian of the loss is
J^T H J + sum_k (d loss / d z_k) d^2 z_k / d theta^2 with z the logits,
J = dz/dtheta and H = d^2 loss / dz^2 (the generalized Gauss-Newton plus a
curvature term). For a network that is piecewise linear in each single
parameter (linear layers, convolutions, ReLU, pooling; not normalization)
every d^2 z_k / d theta_j^2 is 0 almost everywhere, so the diagonal of the
Hessian is the diagonal of J^T H J. With H = S S^T (`logit_hessian_factor`),
that diagonal is sum_c (J^T s_c)^2: one backward pass per column of S. For
the linear head (z = features @ kernel + bias) it is exact for any
featurizer and has a closed form: features_d^2 * H_cc for kernel[d, c] and
H_cc for bias[c].

Quantities are pytrees like the parameters with a leading domain axis (E,
...); `compare` flattens each domain's pytree into one vector.
"""

import itertools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fishr_jax import losses
from fishr_jax import penalties

PyTree = Any


class DomainCurvature(NamedTuple):
  """Per-domain quantities, each a pytree with a leading domain axis (E, ...)."""
  hessian: PyTree
  variance: PyTree
  fisher: PyTree


# ------------------------------------------------------------ per example


def logit_hessian_factor(logits: jax.Array) -> jax.Array:
  """S (C, K) with S S^T = d^2 loss / d logits^2 for one example's logits
  (C,): cross-entropy's Hessian, which does not depend on the label.

  Softmax (C > 1): H = diag(p) - p p^T = S S^T with column c of S
  sqrt(p_c) (e_c - p), since sum_c p_c = 1. Binary (C = 1, sigmoid):
  H = sigma (1 - sigma), S its square root.
  """
  logits = losses.at_least_float32(logits)
  if losses.is_binary(logits):
    p = jax.nn.sigmoid(logits)
    return jnp.sqrt(p * (1 - p))[:, None]
  p = jax.nn.softmax(logits)
  return jnp.sqrt(p)[None, :] * (jnp.eye(p.shape[0], dtype=p.dtype)
                                 - p[:, None])


def logit_hessian_diagonal(logits: jax.Array) -> jax.Array:
  """diag(d^2 loss / d logits^2), per example: logits (..., C) -> (..., C).
  p (1 - p) for softmax and for sigmoid alike."""
  logits = losses.at_least_float32(logits)
  p = (jax.nn.sigmoid(logits) if losses.is_binary(logits)
       else jax.nn.softmax(logits))
  return p * (1 - p)


def hessian_diagonals(logits_fn: Callable[[PyTree, jax.Array], jax.Array],
                      params: PyTree, x: jax.Array) -> PyTree:
  """Each example's exact loss-Hessian diagonal w.r.t. `params`, for a
  network piecewise linear in each parameter (see the module docstring):
  leaves (N, ...).

  logits_fn(params, x_i) -> (C,): the network on ONE example.
  """
  def one(x_i):
    logits, pullback = jax.vjp(lambda p: logits_fn(p, x_i), params)
    factor = logit_hessian_factor(logits).astype(logits.dtype)
    columns, = jax.vmap(pullback, in_axes=1)(factor)  # J^T s_c, leaves (K, ...)
    return jax.tree.map(lambda g: jnp.sum(g * g, axis=0), columns)

  return jax.vmap(one)(x)


# -------------------------------------------------------------- per domain


def head_curvature(features: jax.Array, logits: jax.Array, labels: jax.Array,
                   domain_ids: jax.Array, num_domains: int) -> DomainCurvature:
  """The quantities w.r.t. a linear head (logits = features @ kernel + bias),
  in closed form: {"kernel": (E, D, C), "bias": (E, C)} each.

  The featurizer is held fixed (its parameters are not differentiated), as
  the paper's head-only measurement does.
  """
  features = losses.at_least_float32(features)
  h = logit_hessian_diagonal(logits).astype(features.dtype)
  mean = lambda v: penalties.domain_mean(v, domain_ids, num_domains)
  hessian = {"kernel": mean(features[:, :, None] ** 2 * h[:, None, :]),
             "bias": mean(h)}
  residual = losses.loss_residual(losses.at_least_float32(logits), labels)
  residual = residual.astype(features.dtype)
  moment = lambda centered: penalties.dense_grad_variance(
      features, residual, domain_ids, num_domains, centered=centered)
  return DomainCurvature(hessian=hessian, variance=moment(True),
                         fisher=moment(False))


def network_curvature(logits_fn: Callable[[PyTree, jax.Array], jax.Array],
                      params: PyTree, x: jax.Array, labels: jax.Array,
                      domain_ids: jax.Array, num_domains: int,
                      hessian_examples: jax.Array | None = None
                      ) -> DomainCurvature:
  """The quantities w.r.t. every leaf of `params` (all layers, or any
  subtree with `logits_fn` closing over the rest).

  logits_fn(params, x_i) -> (C,): the network on ONE example, piecewise
  linear in each parameter for the Hessian diagonal to be exact.
  hessian_examples: an (N,) boolean mask of the examples the Hessian
  averages over (it costs C backward passes per example); None: all.
  """
  loss = lambda p, x_i, y_i: losses.per_example_loss(logits_fn(p, x_i), y_i)
  grads = penalties.per_example_grads(loss, params, x, labels)
  variance = penalties.domain_grad_variance(grads, domain_ids, num_domains)
  fisher = penalties.domain_grad_variance(grads, domain_ids, num_domains,
                                          centered=False)
  per_example = hessian_diagonals(logits_fn, params, x)
  # The examples left out go to an extra domain, then dropped.
  hessian_ids = (domain_ids if hessian_examples is None
                 else jnp.where(hessian_examples, domain_ids, num_domains))
  hessian = jax.tree.map(
      lambda h: penalties.domain_mean(h, hessian_ids,
                                      num_domains + 1)[:num_domains],
      per_example)
  return DomainCurvature(hessian=hessian, variance=variance, fisher=fisher)


# --------------------------------------------------------- between domains


def flatten_domains(quantity: PyTree) -> jax.Array:
  """A pytree of (E, ...) leaves -> (E, P): each domain's values as one
  vector, leaves in tree order."""
  leaves = jax.tree.leaves(quantity)
  return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves],
                         axis=1)


def compare(quantity: PyTree) -> dict[str, jax.Array]:
  """How the domains' values of one quantity differ.

  Over the pairs (a, b) of domains (one pair for two domains):
    distance = ||a - b||^2, cosine = cos(a, b),
    norm_gap = (||a||^2 - ||b||^2)^2,
  each as its mean over pairs, and as the worst pair: distance_max,
  norm_gap_max, cosine_min. Over all domains:
    to_mean  = sum_e ||v_e - mean_e v_e||^2 (Fishr's penalty is this over E,
               with the mean over coordinates instead of the sum: "mean"),
    meannorm = mean_e ||v_e||^2.
  """
  v = flatten_domains(quantity)
  num_domains = v.shape[0]
  if num_domains < 2:
    raise ValueError(f"Comparing domains needs two or more, got {num_domains}.")
  sq_norms = jnp.sum(v * v, axis=1)
  pairs = list(itertools.combinations(range(num_domains), 2))
  a, b = (jnp.asarray(side) for side in zip(*pairs))
  distance = jnp.sum((v[a] - v[b]) ** 2, axis=1)
  cosine = jnp.sum(v[a] * v[b], axis=1) / jnp.sqrt(sq_norms[a] * sq_norms[b])
  norm_gap = (sq_norms[a] - sq_norms[b]) ** 2
  return {
      "distance": distance.mean(), "distance_max": distance.max(),
      "cosine": cosine.mean(), "cosine_min": cosine.min(),
      "norm_gap": norm_gap.mean(), "norm_gap_max": norm_gap.max(),
      "to_mean": jnp.sum((v - v.mean(axis=0)) ** 2),
      "meannorm": sq_norms.mean(),
  }


def inconsistency(risks: jax.Array, hessians: PyTree, eps: float
                  ) -> jax.Array:
  """The paper's inconsistency score with diagonal Hessians,

    I(eps) = max_{(A, B), A != B} R_B - R_A + eps * max_j h_B,j / h_A,j,

  from the domains' mean risks (E,) and Hessian diagonals (E, ...).

  Derivation. I(eps) = max_{A,B} max {R_B(theta') - R_A(theta) :
  R_A(theta') - R_A(theta) <= eps}. Around a local minimum theta, with
  d = theta' - theta, R_e(theta') ~ R_e + d^T diag(h_e) d / 2 for each e.
  Substituting u_j = sqrt(h_A,j) d_j, the constraint is ||u||^2 / 2 <= eps
  and the objective R_B - R_A + sum_j (h_B,j / h_A,j) u_j^2 / 2, a weighted
  sum of u_j^2 maximized by putting the whole budget ||u||^2 = 2 eps on the
  coordinate of the largest ratio: eps * max_j h_B,j / h_A,j.

  A coordinate flat in A (h_A,j = 0) but curved in B makes the score +inf
  (the quadratic model of R_B grows without bound inside A's level set);
  one flat in both is left out.
  """
  h = flatten_domains(hessians)
  num_domains = h.shape[0]
  scores = []
  for a, b in itertools.permutations(range(num_domains), 2):
    ratio = jnp.where(h[a] > 0, h[b] / jnp.where(h[a] > 0, h[a], 1),
                      jnp.where(h[b] > 0, jnp.inf, 0.0))
    scores.append(risks[b] - risks[a] + eps * ratio.max())
  return jnp.max(jnp.stack(scores))
