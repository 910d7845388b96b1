"""The Fishr math and the invariance penalties it is compared with.

Everything here is a pure, jit-able function, differentiable w.r.t. its
array inputs (so the penalty's gradient reaches the featurizer through the
features). Domains are given as integer `domain_ids` (N,) in
[0, num_domains) beside a batch of N examples; `num_domains` is static.
Results indexed by domain have the domain as their leading axis.

The semantics (reductions, the moving average's scaling) are those of the
official code, as stated in docs/official_semantics.md ("Per-domain
variances", "The moving average", "The penalty"):

  v_e   = mean_{i in e} (g_i - mean_{i in e} g_i)^2     per coordinate
  u_e   = v_e + gamma / (1 - gamma) * stop_gradient(m_e)  (optional EMA)
  pen   = mean_e mean_j (u_e,j - mean_e u_e,j)^2          ("mean", DomainBed)
        | sum_e sum_j  (v_e,j - mean_e v_e,j)^2           ("sum", IRM script)
"""

from typing import Any, Callable, Literal, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fishr_jax import errors
from fishr_jax import losses

PyTree = Any
Reduction = Literal["mean", "sum"]

# The closed-form variance is E[x^2] - E[x]^2: a difference that cancels, so
# its matmuls must not run in reduced precision (TPU/GPU default to bf16/tf32).
_EXACT = jax.lax.Precision.HIGHEST


def check_domain_ids(domain_ids: jax.Array, num_domains: int) -> None:
  """ValueError if concrete `domain_ids` (not traced: under jit nothing
  can be checked) are empty or outside [0, num_domains): one-hot
  membership would drop such examples silently."""
  if isinstance(domain_ids, jax.core.Tracer):
    return
  ids = np.asarray(domain_ids)
  if ids.size == 0:
    raise ValueError("No examples: domain_ids is empty.")
  if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or (
      ids.max() >= num_domains):
    raise ValueError(f"domain_ids must be integers in [0, {num_domains}), "
                     f"got {ids.dtype} values in [{ids.min()}, {ids.max()}].")


def _domain_one_hot(domain_ids: jax.Array, num_domains: int,
                    dtype: Any) -> tuple[jax.Array, jax.Array]:
  """One-hot membership (N, E) and per-domain counts (E,)."""
  chex.assert_rank(domain_ids, 1)
  check_domain_ids(domain_ids, num_domains)
  one_hot = jax.nn.one_hot(domain_ids, num_domains, dtype=dtype)
  return one_hot, one_hot.sum(axis=0)


def domain_mean(values: jax.Array, domain_ids: jax.Array,
                num_domains: int) -> jax.Array:
  """Mean of `values` (N, ...) over each domain's examples: (E, ...).

  A domain with no example gives NaN, never a silent zero.
  """
  chex.assert_equal_shape_prefix([values, domain_ids], 1)
  one_hot, counts = _domain_one_hot(domain_ids, num_domains, values.dtype)
  flat = values.reshape(values.shape[0], -1)
  sums = jnp.matmul(one_hot.T, flat, precision=_EXACT)
  return (sums / counts[:, None]).reshape((num_domains,) + values.shape[1:])


def per_example_grads(loss_fn: Callable[..., jax.Array], params: PyTree,
                      *batch: jax.Array, chunk_size: int | None = None) -> PyTree:
  """Gradient of each example's own loss w.r.t. `params`.

  Args:
    loss_fn: `loss_fn(params, *example) -> scalar`, called on ONE example
      (the leading batch axis removed from every array of `batch`).
    params: any pytree of parameters, e.g. only the classifier head.
    *batch: arrays with a shared leading batch axis N.
    chunk_size: None vectorizes over all N at once (jax.vmap); k computes k
      examples at a time (jax.lax.map with batch_size=k), bounding the
      memory of the intermediate activations. A pure performance knob: the
      result is the same.

  Returns:
    A pytree like `params` whose leaves have a leading axis N.
  """
  chex.assert_equal_shape_prefix(batch, 1)
  grad_fn = jax.grad(loss_fn)
  if chunk_size is None:
    return jax.vmap(grad_fn, in_axes=(None,) + (0,) * len(batch))(params, *batch)
  return jax.lax.map(lambda example: grad_fn(params, *example), batch,
                     batch_size=chunk_size)


def domain_grad_variance(grads: PyTree, domain_ids: jax.Array,
                         num_domains: int, centered: bool = True) -> PyTree:
  """Per-domain, per-coordinate variance of per-example gradients.

  Args:
    grads: pytree of per-example gradients, leaves (N, ...).
    domain_ids: (N,) integer domain of each example; sizes may differ.
    num_domains: static number of domains E.
    centered: biased variance (divide by n_e) if True, else the raw second
      moment mean_i g_i^2 (the paper's "not centered" ablation).

  Returns:
    A pytree like `grads` whose leaves are (E, ...).
  """
  def leaf_variance(g):
    if centered:
      g = g - domain_mean(g, domain_ids, num_domains)[domain_ids]
    return domain_mean(g * g, domain_ids, num_domains)

  return jax.tree.map(leaf_variance, grads)


def domain_grad_covariance(grads: PyTree, domain_ids: jax.Array,
                           num_domains: int, centered: bool = True) -> PyTree:
  """Per-domain full covariance of each parameter tensor (off-diagonal Fishr).

  Leaves (N, ...) become (E, k, k) with k the tensor's size, normalised as the
  official ablation: g_e^T g_e / (n_e * k), with g centered on its domain's
  mean (the official `fishr_offdiagonal` centers; only `fishr_notcentered`
  skips it). Per domain it is one (k, n_e) @ (n_e, k) product; the (N, k, k)
  per-example outer products are never formed.
  """
  def leaf_covariance(g):
    g = g.reshape(g.shape[0], -1)
    if centered:
      g = g - domain_mean(g, domain_ids, num_domains)[domain_ids]
    one_hot, counts = _domain_one_hot(domain_ids, num_domains, g.dtype)
    sums = jnp.einsum("ne,na,nb->eab", one_hot, g, g, precision=_EXACT)
    return sums / (counts[:, None, None] * g.shape[1])

  return jax.tree.map(leaf_covariance, grads)


def dense_grad_variance(inputs: jax.Array, signals: jax.Array,
                        domain_ids: jax.Array, num_domains: int,
                        centered: bool = True) -> dict[str, jax.Array]:
  """Exact per-domain gradient variance of a Dense layer, in closed form.

  For y = inputs @ kernel + bias and delta_i = d loss_i / d y_i (the signal
  backpropagated to example i's output), the per-example gradients are
  g^kernel_i = a_i (outer) delta_i and g^bias_i = delta_i, so per domain

    Var[g^kernel] = (a*a)^T (delta*delta) / n - (a^T delta / n)^2,
    Var[g^bias]   = mean(delta^2) - mean(delta)^2,

  at O(N * D * E * K) cost and without the (N, D, K) per-example gradients.
  Any batch layout. (fast_paths.py has faster forms, proven equal to this.)

  Args:
    inputs: (N, D) the layer's inputs a.
    signals: (N, K) d loss_i / d y_i.
    domain_ids: (N,) integer domain of each example.
    num_domains: static number of domains E.
    centered: as in `domain_grad_variance`.

  Returns:
    {"kernel": (E, D, K), "bias": (E, K)}: flax Dense's layout, domain first.
  """
  chex.assert_rank([inputs, signals], 2)
  chex.assert_equal_shape_prefix([inputs, signals, domain_ids], 1)
  # E[x^2] - E[x]^2 cancels: never in bfloat16, whatever the compute dtype.
  a = losses.at_least_float32(inputs)
  d = losses.at_least_float32(signals)
  one_hot, counts = _domain_one_hot(domain_ids, num_domains, a.dtype)
  per_domain = lambda sums: sums / counts.reshape(
      (num_domains,) + (1,) * (sums.ndim - 1))
  kernel_sq = per_domain(jnp.einsum("ne,nd,nk->edk", one_hot, a * a, d * d,
                                    precision=_EXACT))
  bias_sq = per_domain(jnp.einsum("ne,nk->ek", one_hot, d * d,
                                  precision=_EXACT))
  if not centered:
    return {"kernel": kernel_sq, "bias": bias_sq}
  kernel_mean = per_domain(jnp.einsum("ne,nd,nk->edk", one_hot, a, d,
                                      precision=_EXACT))
  bias_mean = per_domain(jnp.einsum("ne,nk->ek", one_hot, d, precision=_EXACT))
  return {"kernel": kernel_sq - kernel_mean**2,
          "bias": bias_sq - bias_mean**2}


def linear_head_grad_variance(features: jax.Array, logits: jax.Array,
                              labels: jax.Array, domain_ids: jax.Array,
                              num_domains: int, centered: bool = True
                              ) -> dict[str, jax.Array]:
  """Exact per-domain gradient variance of a linear head, in closed form.

  The head's backpropagated signal is the loss residual r_i = d loss_i /
  d logits_i (softmax - onehot, or sigmoid - label for one output unit), so
  this is `dense_grad_variance(features, r)`. Equals
  `domain_grad_variance(per_example_grads(...))` of a flax Dense head.

  Args:
    features: (N, D) inputs of the head.
    logits: (N, C) outputs of the head; C == 1 means a binary head.
    labels: (N,) integer labels (C > 1) or {0, 1} labels (C == 1).
    domain_ids, num_domains, centered: as in `dense_grad_variance`.

  Returns:
    {"kernel": (E, D, C), "bias": (E, C)}: flax Dense's layout, domain first.
  """
  chex.assert_rank([features, logits], 2)
  chex.assert_equal_shape_prefix([features, logits, labels, domain_ids], 1)
  return dense_grad_variance(features, losses.loss_residual(logits, labels),
                             domain_ids, num_domains, centered)


def conv_patches(inputs: jax.Array, kernel_size: tuple[int, int],
                 strides: tuple[int, int],
                 padding: str | Sequence[tuple[int, int]],
                 out_size: tuple[int, int]) -> jax.Array:
  """(N, H', W', kh, kw, C): the input window behind each output position of
  a 2-D convolution over NHWC `inputs`, by strided slices."""
  (kh, kw), (sh, sw) = kernel_size, strides
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(inputs.shape[1:3], (kh, kw), (sh, sw),
                                      padding)
  padded = jnp.pad(inputs, ((0, 0), *padding, (0, 0)))
  rows, cols = out_size
  windows = [[padded[:, i:i + sh * (rows - 1) + 1:sh,
                     j:j + sw * (cols - 1) + 1:sw]
              for j in range(kw)] for i in range(kh)]
  return jnp.stack([jnp.stack(row, axis=3) for row in windows], axis=3)


def conv_grad_variance(patches: jax.Array, signals: jax.Array,
                       domain_ids: jax.Array, num_domains: int,
                       centered: bool = True) -> dict[str, jax.Array]:
  """Per-domain gradient variance of a 2-D convolution's kernel and bias.

  Example i's kernel gradient is the sum over output positions of its input
  patch times its signal there, which does not factor as a Dense layer's
  does: it is built for this layer alone (N x the layer's parameters), never
  by a per-example backward pass.

  Args:
    patches: (N, H', W', kh, kw, C_in) from `conv_patches`.
    signals: (N, H', W', C_out) d loss_i / d output_i.
    domain_ids, num_domains, centered: as in `dense_grad_variance`.

  Returns:
    {"kernel": (E, kh, kw, C_in, C_out), "bias": (E, C_out)}.
  """
  patches = losses.at_least_float32(patches)
  signals = losses.at_least_float32(signals)
  grads = {"kernel": jnp.einsum("nhwijc,nhwo->nijco", patches, signals,
                                precision=_EXACT),
           "bias": signals.sum(axis=(1, 2))}
  return domain_grad_variance(grads, domain_ids, num_domains, centered)


def ema_update(ema_state: PyTree, variance: PyTree,
               decay: float) -> tuple[PyTree, PyTree]:
  """DomainBed's moving average of the per-domain variances.

  Returns `(smoothed, new_state)` with
    smoothed  = variance + decay / (1 - decay) * stop_gradient(ema_state)
    new_state = stop_gradient(decay * ema_state + (1 - decay) * variance)
  i.e. the official `MovingAverage(oneminusema_correction=True)`: `smoothed` is
  new_state / (1 - decay), about 1/(1 - decay) times a textbook EMA, and only
  the current step's variance carries gradient. Start `ema_state` as zeros
  shaped like `variance`: the first `smoothed` is then the raw variance.
  """
  if isinstance(decay, (int, float)) and not 0.0 <= decay < 1.0:
    raise errors.ConfigError(f"EMA decay must be in [0, 1), got {decay}.")
  chex.assert_trees_all_equal_shapes(ema_state, variance)
  history = jax.lax.stop_gradient(ema_state)
  smoothed = jax.tree.map(lambda v, m: v + decay / (1.0 - decay) * m, variance,
                          history)
  new_state = jax.tree.map(
      lambda v, m: jax.lax.stop_gradient(decay * m + (1.0 - decay) * v),
      variance, history)
  return smoothed, new_state


def fishr_penalty(variances: PyTree, reduction: Reduction = "mean") -> jax.Array:
  """Spread of the per-domain gradient variances around their mean.

  Args:
    variances: pytree whose leaves have the domain as leading axis (E, ...),
      e.g. from `linear_head_grad_variance`, `domain_grad_variance` or
      `domain_grad_covariance` (possibly smoothed by `ema_update`).
    reduction: "mean": mean over domains and coordinates (DomainBed);
      "sum": sum over both (the IRM-setup Colored MNIST script).
      Penalty weights do not transfer between the two.

  Returns:
    A scalar.
  """
  leaves = jax.tree.leaves(variances)
  if not leaves or any(jnp.ndim(v) == 0 for v in leaves):
    raise ValueError(
        "fishr_penalty needs a pytree of arrays with the domain as leading "
        f"axis (E, ...); got {'no arrays' if not leaves else 'a scalar'} "
        f"({type(variances).__name__}). Pass the variances of "
        "linear_head_grad_variance or domain_grad_variance.")
  num_domains = leaves[0].shape[0]
  chex.assert_equal_shape_prefix(leaves, 1)
  flat = jnp.concatenate([v.reshape(num_domains, -1) for v in leaves], axis=1)
  squared = (flat - flat.mean(axis=0, keepdims=True))**2
  if reduction == "mean":
    return squared.mean()
  if reduction == "sum":
    return squared.sum()
  raise errors.ConfigError(
      f"reduction must be 'mean' or 'sum', got {reduction!r}.")


def rank_in_domain(domain_ids: jax.Array, num_domains: int) -> jax.Array:
  """(N,) each example's position among its domain's examples, in batch
  order (0 for the first)."""
  one_hot = jax.nn.one_hot(domain_ids, num_domains, dtype=jnp.int32)
  return jnp.take_along_axis(jnp.cumsum(one_hot, axis=0),
                             domain_ids[:, None], axis=1)[:, 0] - 1


def irm_penalty(logits: jax.Array, labels: jax.Array, domain_ids: jax.Array,
                num_domains: int, split_halves: bool = False) -> jax.Array:
  """IRMv1: mean over domains of (d nll_e(logits * s) / ds at s = 1)^2.

  split_halves: DomainBed's unbiased estimate, the product of the gradients
  on the even and the odd examples of each domain (in batch order) instead of
  the square of the whole domain's gradient (the IRM-setup script).
  """
  groups, num_groups = domain_ids, num_domains
  if split_halves:
    rank = rank_in_domain(domain_ids, num_domains)
    groups, num_groups = 2 * domain_ids + rank % 2, 2 * num_domains

  def total_nll(scales):
    scaled = logits * scales[groups][:, None]
    per_example = losses.per_example_loss(scaled, labels)
    return domain_mean(per_example, groups, num_groups).sum()

  # One backward pass gives every group's dummy-scale gradient at once.
  scale_grads = jax.grad(total_nll)(jnp.ones(num_groups, logits.dtype))
  if split_halves:
    return jnp.mean(scale_grads[0::2] * scale_grads[1::2])
  return jnp.mean(scale_grads**2)


def _domain_pairs(num_domains: int) -> tuple[np.ndarray, np.ndarray]:
  return np.triu_indices(num_domains, k=1)


def coral_penalty(features: jax.Array, domain_ids: jax.Array,
                  num_domains: int) -> jax.Array:
  """Deep CORAL, as DomainBed: mean over domain pairs of
  mean((mu_e - mu_f)^2) + mean((cov_e - cov_f)^2), unbiased covariances."""
  one_hot, counts = _domain_one_hot(domain_ids, num_domains, features.dtype)
  means = domain_mean(features, domain_ids, num_domains)  # (E, D)
  centered = features - means[domain_ids]
  covs = jnp.einsum("ne,nd,nf->edf", one_hot, centered, centered,
                    precision=_EXACT) / (counts - 1)[:, None, None]
  e, f = _domain_pairs(num_domains)
  mean_diff = ((means[e] - means[f])**2).mean(axis=1)
  cov_diff = ((covs[e] - covs[f])**2).mean(axis=(1, 2))
  return (mean_diff + cov_diff).mean()


def ib_penalty(features: jax.Array, domain_ids: jax.Array,
               num_domains: int) -> jax.Array:
  """The information bottleneck of IB_ERM, as DomainBed: mean over domains
  of the mean over feature dimensions of each feature's unbiased variance
  within the domain.

  Written as a weighted sum over examples of their squared distance to
  their domain's mean: the same number, and a gradient in which XLA:CPU's
  dot fusion finds no dot of a broadcast (fast_paths.jit), so the step
  keeps the fusion."""
  _, counts = _domain_one_hot(domain_ids, num_domains, features.dtype)
  means = domain_mean(features, domain_ids, num_domains)  # (E, D)
  squares = ((features - means[domain_ids])**2).sum(axis=1)  # (N,)
  weights = 1.0 / ((counts - 1.0) * num_domains * features.shape[1])
  return jnp.sum(weights[domain_ids] * squares)


MMD_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def gaussian_kernels(features: jax.Array,
                     gammas: tuple[float, ...] = MMD_GAMMAS) -> jax.Array:
  """(N, N) sum over gammas of exp(-gamma ||x_i - x_j||^2), the squared
  distances from the norms and one matmul, clamped at 1e-30 (DomainBed's
  my_cdist)."""
  sq_norms = (features**2).sum(axis=1)
  sq_dists = jnp.maximum(
      sq_norms[:, None] + sq_norms[None, :]
      - 2.0 * jnp.matmul(features, features.T, precision=_EXACT), 1e-30)
  return sum(jnp.exp(-g * sq_dists) for g in gammas)


def mmd_penalty(features: jax.Array, domain_ids: jax.Array, num_domains: int,
                gammas: tuple[float, ...] = MMD_GAMMAS) -> jax.Array:
  """Gaussian-kernel MMD^2 (a sum of RBF kernels, as DomainBed's MMD), mean
  over domain pairs of K_ee + K_ff - 2 K_ef with K averaged over examples."""
  one_hot, counts = _domain_one_hot(domain_ids, num_domains, features.dtype)
  kernel = gaussian_kernels(features, gammas)
  mean_kernel = (jnp.matmul(one_hot.T, jnp.matmul(kernel, one_hot), precision=_EXACT)
                 / (counts[:, None] * counts[None, :]))  # (E, E)
  e, f = _domain_pairs(num_domains)
  return (mean_kernel[e, e] + mean_kernel[f, f] - 2.0 * mean_kernel[e, f]).mean()


def vrex_penalty(domain_losses: jax.Array,
                 reduction: Literal["variance", "pairwise"] = "variance"
                 ) -> jax.Array:
  """V-REx: the spread of the per-domain risks (E,).

  "variance": their population variance (DomainBed's VREx);
  "pairwise": mean over domain pairs of (risk_e - risk_f)^2, which for two
  domains is the IRM-setup script's (nll_0 - nll_1)^2.
  """
  chex.assert_rank(domain_losses, 1)
  if reduction == "variance":
    return jnp.var(domain_losses)
  if reduction == "pairwise":
    num_domains = domain_losses.shape[0]
    diffs = domain_losses[:, None] - domain_losses[None, :]
    # The full matrix counts each unordered pair twice; the diagonal is zero.
    return (diffs**2).sum() / (num_domains * (num_domains - 1))
  raise ValueError(
      f"reduction must be 'variance' or 'pairwise', got {reduction!r}.")
