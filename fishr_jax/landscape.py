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

import functools
import itertools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fishr_jax import layer_signals
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
                      hessian_examples: jax.Array | None = None,
                      chunk_size: int | None = None) -> DomainCurvature:
  """The quantities w.r.t. every leaf of `params` (all layers, or any
  subtree with `logits_fn` closing over the rest).

  logits_fn(params, x_i) -> (C,): the network on ONE example, piecewise
  linear in each parameter for the Hessian diagonal to be exact.
  hessian_examples: an (N,) boolean mask of the examples the Hessian
  averages over (it costs C backward passes per example); None: all.
  chunk_size: None holds every example's gradient at once (the plain
  version); k accumulates per-domain sums k examples at a time, in two
  passes (the means, then the centered moments): memory O(k * params), the
  same values.
  """
  loss = lambda p, x_i, y_i: losses.per_example_loss(logits_fn(p, x_i), y_i)
  # The examples the Hessian leaves out go to an extra domain, then dropped.
  hessian_ids = (domain_ids if hessian_examples is None
                 else jnp.where(hessian_examples, domain_ids, num_domains))
  hessian_mean = lambda h: penalties.domain_mean(
      h, hessian_ids, num_domains + 1)[:num_domains]
  if chunk_size is not None:
    return _chunked_network_curvature(loss, logits_fn, params, x, labels,
                                      domain_ids, hessian_ids, num_domains,
                                      chunk_size)
  grads = penalties.per_example_grads(loss, params, x, labels)
  return DomainCurvature(
      hessian=jax.tree.map(hessian_mean,
                           hessian_diagonals(logits_fn, params, x)),
      variance=penalties.domain_grad_variance(grads, domain_ids, num_domains),
      fisher=penalties.domain_grad_variance(grads, domain_ids, num_domains,
                                            centered=False))


def _chunked_network_curvature(loss, logits_fn, params, x, labels,
                               domain_ids, hessian_ids, num_domains,
                               chunk_size) -> DomainCurvature:
  """network_curvature, `chunk_size` examples at a time."""
  grad = jax.grad(loss)
  pad = -x.shape[0] % chunk_size
  chunks = lambda a, fill: jnp.concatenate(
      [a, jnp.full((pad,) + a.shape[1:], fill, a.dtype)]).reshape(
          (-1, chunk_size) + a.shape[1:])
  x_c, y_c = chunks(x, 0), chunks(labels, 0)
  # Padding examples belong to the extra domain, whose sums are dropped.
  ids_c, hess_ids_c = chunks(domain_ids, num_domains), chunks(hessian_ids,
                                                                num_domains)

  def domain_sums(values, ids):  # leaves (k, ...) -> (E + 1, ...)
    one_hot = jax.nn.one_hot(ids, num_domains + 1, dtype=x.dtype)
    return jax.tree.map(
        lambda v: jnp.tensordot(one_hot.T, v, axes=1,
                                precision=jax.lax.Precision.HIGHEST), values)

  def accumulate(per_chunk):
    def body(total, chunk):
      return jax.tree.map(jnp.add, total, per_chunk(*chunk)), None
    zero = jax.eval_shape(per_chunk, x_c[0], y_c[0], ids_c[0], hess_ids_c[0])
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
    total, _ = jax.lax.scan(body, zero, (x_c, y_c, ids_c, hess_ids_c))
    return jax.tree.map(lambda t: t[:num_domains], total)

  grads_of = lambda xs, ys: jax.vmap(grad, in_axes=(None, 0, 0))(params, xs,
                                                                  ys)
  counts = jnp.zeros(num_domains, x.dtype).at[domain_ids].add(1)
  hessian_counts = jnp.zeros(num_domains + 1, x.dtype).at[hessian_ids].add(
      1)[:num_domains]
  per_count = lambda total, n: jax.tree.map(
      lambda t: t / n.reshape((-1,) + (1,) * (t.ndim - 1)), total)

  means = per_count(accumulate(
      lambda xs, ys, ids, _: domain_sums(grads_of(xs, ys), ids)), counts)

  def moments(xs, ys, ids, hess_ids):
    g = grads_of(xs, ys)
    mean_padded = jax.tree.map(
        lambda m: jnp.concatenate([m, jnp.zeros_like(m[:1])]), means)
    centered = jax.tree.map(lambda g_, m: g_ - m[ids], g, mean_padded)
    return (domain_sums(jax.tree.map(jnp.square, centered), ids),
            domain_sums(jax.tree.map(jnp.square, g), ids),
            domain_sums(hessian_diagonals(logits_fn, params, xs), hess_ids))

  variance, fisher, hessian = accumulate(moments)
  return DomainCurvature(hessian=per_count(hessian, hessian_counts),
                         variance=per_count(variance, counts),
                         fisher=per_count(fisher, counts))


def closed_form_layers(params: PyTree) -> list[str]:
  """The layers whose parameters are a kernel and perhaps a bias (flax's
  Dense and Conv; layer_signals checks that they are), by path."""
  leaves: dict[str, list[str]] = {}
  for name in layer_signals.param_names(params):
    layer, _, leaf = name.rpartition("/")
    leaves.setdefault(layer, []).append(leaf)
  return [layer for layer, names in leaves.items()
          if "kernel" in names and set(names) <= {"kernel", "bias"}]


def _layer_moments(forward, params, x, labels, domain_ids, num_domains,
                   layers) -> DomainCurvature:
  """The quantities of `layers` (Dense or Conv) in closed form, as flat
  {"<layer>/<leaf>": (E, ...)} dicts."""

  def cotangents(logits):
    factors = jax.vmap(logit_hessian_factor)(logits).astype(logits.dtype)
    return ([losses.loss_residual(losses.at_least_float32(logits), labels)]
            + [factors[:, :, k] for k in range(factors.shape[2])])

  _, _, (residual, *columns) = layer_signals.forward_with_backprops(
      lambda p, x_, rng: forward(p, x_), params, x, None, layers, cotangents)

  def moments(signals, centered):
    return {f"{layer}/{leaf}": value for layer in layers
            for leaf, value in layer_signals.layer_grad_variance(
                signals[layer], domain_ids, num_domains, centered).items()
            if f"{layer}/{leaf}" in names}

  names = set(layer_signals.param_names(params))
  hessian = functools.reduce(
      lambda a, b: jax.tree.map(jnp.add, a, b),
      [moments(signals, False) for signals in columns])
  return DomainCurvature(hessian=hessian, variance=moments(residual, True),
                         fisher=moments(residual, False))


def all_layers_curvature(forward: Callable[[PyTree, jax.Array],
                                          tuple[jax.Array, jax.Array]],
                         params: PyTree, x: jax.Array, labels: jax.Array,
                         domain_ids: jax.Array, num_domains: int,
                         chunk_size: int | None = None) -> DomainCurvature:
  """`network_curvature` of every parameter of a flax network (all
  examples), the same values, faster: Dense and Conv layers in closed form
  from their inputs and backpropagated signals (layer_signals.py: one
  forward pass and 1 + K backward passes over the whole batch), any other
  parameter (a norm's scale and bias) per example, `chunk_size` at a time.

  The variance and Fisher are the centered and uncentered second moments of
  the per-example gradients, whose signal is the loss residual. For the
  Hessian, column c of S (`logit_hessian_factor`) backpropagated instead of
  the residual gives J^T s_c for each example, so each parameter's
  diagonal sum_c (J^T s_c)^2 is the sum over c of the uncentered second
  moments under those signals. This needs each example's loss to depend on
  that example only (not BatchNorm in train mode).

  forward(params, x) -> (features, logits), applying flax modules.
  """
  layers = closed_form_layers(params)
  names = layer_signals.param_names(params)
  rest = [n for n in names if n.rpartition("/")[0] not in layers]
  parts = []
  if layers:
    parts.append(_layer_moments(forward, params, x, labels, domain_ids,
                                num_domains, layers))
  if rest:
    logits_fn = lambda chosen, x_i: forward(
        layer_signals.with_subtree(params, chosen), x_i[None])[1][0]
    parts.append(network_curvature(
        logits_fn, layer_signals.subtree(params, rest), x, labels,
        domain_ids, num_domains, chunk_size=chunk_size))
  merged = [{k: v for part in parts for k, v in getattr(part, field).items()}
            for field in DomainCurvature._fields]
  return DomainCurvature(*(layer_signals.with_subtree(params, flat)
                           for flat in merged))


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
  each as its mean over pairs, and with three or more domains also as the
  worst pair: distance_max, norm_gap_max, cosine_min. Over all domains:
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
  compared = {"distance": distance.mean(), "cosine": cosine.mean(),
              "norm_gap": norm_gap.mean(),
              "to_mean": jnp.sum((v - v.mean(axis=0)) ** 2),
              "meannorm": sq_norms.mean()}
  if len(pairs) > 1:
    compared.update(distance_max=distance.max(), cosine_min=cosine.min(),
                    norm_gap_max=norm_gap.max())
  return compared


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


# ------------------------------------------------------------ in training

LAYERS = ("head", "all")
QUANTITIES = {"hessian": "hessian", "fishr": "variance", "fisher": "fisher"}


def record_fields(forward: Callable[[PyTree, jax.Array],
                                    tuple[jax.Array, jax.Array]],
                  params: PyTree, batch: dict[str, jax.Array],
                  num_domains: int, layers: str = "head",
                  chunk_size: int | None = None) -> dict[str, jax.Array]:
  """What a record holds of the domains' landscapes at `params`:
  "landscape/<part>/<quantity>_<statistic>" with part "head" (and "all"
  when `layers` is "all"), quantity hessian, fishr (the gradient variance)
  or fisher, and statistic one of `compare`'s.

  forward(params, x) -> (features, logits), deterministic; the head is
  params[models.HEAD]'s linear layer on the features. batch: {"x", "y",
  "domain"}, the training domains' examples. "all" measures every
  parameter (`all_layers_curvature`; `chunk_size` as there): its Hessian is
  the generalized Gauss-Newton diagonal, the Hessian's own for networks
  piecewise linear in each parameter (`network_curvature`).
  """
  if layers not in LAYERS:
    raise ValueError(f"layers must be one of {LAYERS}, got {layers!r}.")
  features, logits = forward(params, batch["x"])
  parts = {"head": head_curvature(features, logits, batch["y"],
                                  batch["domain"], num_domains)}
  if layers == "all":
    parts["all"] = all_layers_curvature(
        forward, params, batch["x"], batch["y"], batch["domain"], num_domains,
        chunk_size=chunk_size)
  return {f"landscape/{part}/{name}_{stat}": value
          for part, curvature in parts.items()
          for name, field in QUANTITIES.items()
          for stat, value in compare(getattr(curvature, field)).items()}


def recorder(forward: Callable[[PyTree, jax.Array],
                               tuple[jax.Array, jax.Array]],
             num_domains: int, layers: str = "head",
             chunk_size: int | None = 256
             ) -> Callable[[PyTree, dict[str, jax.Array]], dict[str, float]]:
  """(params, batch) -> record_fields as floats, jitted once for every run
  that shares it."""
  fields = jax.jit(functools.partial(record_fields, forward,
                                     num_domains=num_domains, layers=layers,
                                     chunk_size=chunk_size))
  return lambda params, batch: {
      key: float(value)
      for key, value in jax.device_get(fields(params, batch)).items()}
