"""The Fishr math and the invariance penalties it is compared with.

Everything here is a pure, jit-able function, differentiable w.r.t. its
array inputs (so the penalty's gradient reaches the featurizer through the
features). Domains are given as integer `domain_ids` (N,) in
[0, num_domains) beside a batch of N examples; `num_domains` is static.
Results indexed by domain have the domain as their leading axis.

The semantics (reductions, the moving average's scaling) are those of the
official code, as stated in SPEC.md:

  v_e   = mean_{i in e} (g_i - mean_{i in e} g_i)^2     per coordinate
  u_e   = v_e + gamma / (1 - gamma) * stop_gradient(m_e)  (optional EMA)
  pen   = mean_e mean_j (u_e,j - mean_e u_e,j)^2          ("mean", DomainBed)
        | sum_e sum_j  (v_e,j - mean_e v_e,j)^2           ("sum", IRM script)
"""

from typing import Any, Callable, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fishr_jax import losses

PyTree = Any
Reduction = Literal["mean", "sum"]

# The closed-form variance is E[x^2] - E[x]^2: a difference that cancels, so
# its matmuls must not run in reduced precision (TPU/GPU default to bf16/tf32).
_EXACT = jax.lax.Precision.HIGHEST


def _domain_one_hot(domain_ids: jax.Array, num_domains: int,
                    dtype: Any) -> tuple[jax.Array, jax.Array]:
  """One-hot membership (N, E) and per-domain counts (E,)."""
  chex.assert_rank(domain_ids, 1)
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
                           num_domains: int, centered: bool = False) -> PyTree:
  """Per-domain full covariance of each parameter tensor (off-diagonal Fishr).

  Leaves (N, ...) become (E, k, k) with k the tensor's size, normalised as the
  official ablation does: einsum('na,nb->ab', g, g) / (n_e * k). SPEC.md
  states the official numbers are not centered, hence the default.
  """
  def leaf_covariance(g):
    g = g.reshape(g.shape[0], -1)
    if centered:
      g = g - domain_mean(g, domain_ids, num_domains)[domain_ids]
    outer = jnp.einsum("na,nb->nab", g, g, precision=_EXACT)
    return domain_mean(outer, domain_ids, num_domains) / g.shape[1]

  return jax.tree.map(leaf_covariance, grads)


def dense_grad_variance(inputs: jax.Array, signals: jax.Array,
                        domain_ids: jax.Array, num_domains: int,
                        centered: bool = True,
                        domain_blocks: bool = False) -> dict[str, jax.Array]:
  """Exact per-domain gradient variance of a Dense layer, in closed form.

  For y = inputs @ kernel + bias and delta_i = d loss_i / d y_i (the signal
  backpropagated to example i's output), the per-example gradients are
  g^kernel_i = a_i (outer) delta_i and g^bias_i = delta_i, so per domain

    Var[g^kernel] = (a*a)^T (delta*delta) / n - (a^T delta / n)^2,
    Var[g^bias]   = mean(delta^2) - mean(delta)^2,

  at O(N * D * E * K) cost and without the (N, D, K) per-example gradients.

  Args:
    inputs: (N, D) the layer's inputs a.
    signals: (N, K) d loss_i / d y_i.
    domain_ids: (N,) integer domain of each example.
    num_domains: static number of domains E.
    centered: as in `domain_grad_variance`.
    domain_blocks: True promises the loaders' layout, domain_ids = [0] * B +
      [1] * B + ... (E equal blocks in order; sharded over a mesh by
      parallel.shard_batch, the same on every device's slice), so each
      domain's sums skip the other domains' rows; a batch that breaks the
      promise gets NaN variances (and so a NaN penalty and gradients), never
      wrong ones. False accepts any layout: a run-time test still takes the
      blocks when they hold, but the compiled step then keeps both paths'
      buffers (2.3x the memory of the blocks alone for Fishr over every layer
      of the Colored MNIST MLP at its full batch).

  Returns:
    {"kernel": (E, D, K), "bias": (E, K)}: flax Dense's layout, domain first.
  """
  chex.assert_rank([inputs, signals], 2)
  chex.assert_equal_shape_prefix([inputs, signals, domain_ids], 1)
  # E[x^2] - E[x]^2 cancels: never in bfloat16, whatever the compute dtype.
  inputs = losses.at_least_float32(inputs)
  signals = losses.at_least_float32(signals)
  num_examples, num_columns = signals.shape
  counts = _domain_one_hot(domain_ids, num_domains, inputs.dtype)[1]
  moments = lambda f: f(inputs, signals, domain_ids, num_domains)
  shards = _data_shards()
  if (num_domains * num_columns <= _ELEMENTWISE_MAX_COLUMNS
      or num_examples % (num_domains * shards)):
    sums, sq_sums, bias_sums, bias_sq_sums = moments(_routed_moment_sums)
  else:
    # The batch layout every loader here gives (domain by domain, equal
    # sizes) lets each domain's sums skip the other domains' rows; any other
    # layout takes the routed path, which is exact for all. Sharded over
    # devices (parallel.shard_batch), each device's slice is laid out domain
    # by domain: the sums reduce on every device, then all-reduce.
    block = jnp.tile(jnp.repeat(jnp.arange(num_domains),
                                num_examples // (num_domains * shards)),
                     shards)
    if domain_blocks:
      # A row out of place makes its domain's sums NaN, and with them the
      # penalty and (added, not selected) the gradients. Checked row by
      # row inside a sum the step takes anyway: a test of the whole batch
      # would make the devices wait on each other mid-step.
      misplaced = jnp.where(domain_ids == block, 0.0, jnp.nan)
      sums, sq_sums, bias_sums, bias_sq_sums = _block_moment_sums(
          inputs, signals, domain_ids, num_domains,
          misplaced.astype(signals.dtype))
    else:
      sums, sq_sums, bias_sums, bias_sq_sums = jax.lax.cond(
          jnp.all(domain_ids == block), lambda: moments(_block_moment_sums),
          lambda: moments(_routed_moment_sums))

  per_domain = lambda sums: sums / counts.reshape(
      (num_domains,) + (1,) * (sums.ndim - 1))
  kernel_sq = jnp.swapaxes(per_domain(sq_sums), 1, 2)  # flax layout (E, D, K)
  bias_sq = per_domain(bias_sq_sums)
  if not centered:
    return {"kernel": kernel_sq, "bias": bias_sq}
  kernel_mean = jnp.swapaxes(per_domain(sums), 1, 2)
  bias_mean = per_domain(bias_sums)
  return {
      "kernel": kernel_sq - kernel_mean**2,
      "bias": bias_sq - bias_mean**2,
  }


def _data_shards() -> int:
  """The number of devices the batch is split over while a step is traced
  under `jax.set_mesh` (as the trainers do for data parallelism,
  fishr_jax/parallel.py); 1 outside a mesh."""
  return max(jax.sharding.get_abstract_mesh().size, 1)


def _routed_moment_sums(inputs, signals, domain_ids, num_domains):
  """Per-domain sums of signals (outer) inputs, their squares' and the
  signals': (E, K, D), (E, K, D), (E, K), (E, K). Any batch layout: each
  example's signal is routed to its domain's column block (N, E * K)."""
  one_hot = _domain_one_hot(domain_ids, num_domains, inputs.dtype)[0]
  num_columns = signals.shape[1]
  routed = (one_hot[:, :, None] * signals[:, None, :]).reshape(
      -1, num_domains * num_columns)
  routed_sq = routed * jnp.tile(signals, (1, num_domains))
  sums, sq_sums = feature_moment_sums(inputs, routed, routed_sq)
  by_domain = lambda x: x.reshape((num_domains, num_columns) + x.shape[1:])
  return (by_domain(sums), by_domain(sq_sums), by_domain(routed.sum(axis=0)),
          by_domain(routed_sq.sum(axis=0)))


def _block_moment_sums(inputs, signals, domain_ids, num_domains,
                       misplaced=None):
  """As `_routed_moment_sums`, for domain_ids = [0]*B + [1]*B + ... on each
  of the batch's device shards: one batched matmul per moment, no wasted
  rows. `misplaced` (N,), if given, is 0 or NaN per row: a NaN row makes
  its domain's sums NaN."""
  del domain_ids
  # Sharded: (devices, E, B, ...), each device's blocks summed there, then
  # over the devices (an all-reduce).
  shards = _data_shards()
  lead = (num_domains,) if shards == 1 else (shards, num_domains)
  blocks = lambda x: x.reshape(lead + (-1,) + x.shape[1:])
  over_shards = lambda x: x if shards == 1 else x.sum(axis=0)
  a, d = blocks(inputs), blocks(signals)
  sums = jnp.einsum("...bk,...bd->...kd", d, a, precision=_EXACT)
  sq_sums = jnp.einsum("...bk,...bd->...kd", d * d, a * a, precision=_EXACT)
  bias = d if misplaced is None else d + blocks(misplaced)[..., None]
  sums, sq_sums, bias_sums, bias_sq_sums = (over_shards(x) for x in (
      sums, sq_sums, bias.sum(axis=-2), (d * d).sum(axis=-2)))
  if misplaced is not None:
    poison = 0.0 * bias_sums[..., None]  # NaN in a broken domain, else 0
    sums, sq_sums = sums + poison, sq_sums + poison
  return sums, sq_sums, bias_sums, bias_sq_sums


def linear_head_grad_variance(features: jax.Array, logits: jax.Array,
                              labels: jax.Array, domain_ids: jax.Array,
                              num_domains: int, centered: bool = True,
                              domain_blocks: bool = False
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
    domain_ids, num_domains, centered, domain_blocks: as in
      `dense_grad_variance`.

  Returns:
    {"kernel": (E, D, C), "bias": (E, C)}: flax Dense's layout, domain first.
  """
  chex.assert_rank([features, logits], 2)
  chex.assert_equal_shape_prefix([features, logits, labels, domain_ids], 1)
  return dense_grad_variance(features, losses.loss_residual(logits, labels),
                             domain_ids, num_domains, centered, domain_blocks)


# Why `feature_moment_sums` is hand-written: on XLA:CPU every (N, D) temporary
# (features**2, each dot's (N, D) cotangent) is a fresh allocation the step
# pays for; with N = 50,000 and D = 390 the plain einsums made the Colored
# MNIST Fishr step 17 % slower than ERM (and with the dot fusion and
# models.relu, 67-76 ms slower against this form's 26-34 ms, on 2 Xeon
# cores). Squares are taken chunk by chunk
# (cache-sized temporaries: 8192 x 390 floats are 12 MiB, reused from the heap
# rather than freshly mapped at every step), and for a few weight columns the
# features' cotangent is one elementwise expression that XLA fuses into its
# consumer; with many columns a matmul is cheaper.
_ROW_CHUNK = 8192
_ELEMENTWISE_MAX_COLUMNS = 8


def _row_chunks(num_rows: int):
  return [(start, min(start + _ROW_CHUNK, num_rows))
          for start in range(0, num_rows, _ROW_CHUNK)]


def _chunked_square_sums(features, weights):
  """weights^T @ features**2 without materialising features**2."""
  return sum(jnp.einsum("nk,nd->kd", weights[a:b], features[a:b]**2,
                        precision=_EXACT)
             for a, b in _row_chunks(features.shape[0]))


@jax.custom_vjp
def feature_moment_sums(features: jax.Array, weights: jax.Array,
                        sq_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(weights^T @ features, sq_weights^T @ features**2), each (K, D).

  features (N, D); weights and sq_weights (N, K). The closed form's only
  heavy operation.
  """
  return (jnp.einsum("nk,nd->kd", weights, features, precision=_EXACT),
          _chunked_square_sums(features, sq_weights))


def _feature_moment_sums_fwd(features, weights, sq_weights):
  return (feature_moment_sums(features, weights, sq_weights),
          (features, weights, sq_weights))


def _feature_moment_sums_bwd(residuals, cotangents):
  features, weights, sq_weights = residuals
  g, g_sq = cotangents
  num_columns = weights.shape[1]
  if num_columns <= _ELEMENTWISE_MAX_COLUMNS:
    d_features = sum(weights[:, k, None] * g[k]
                     + 2.0 * features * sq_weights[:, k, None] * g_sq[k]
                     for k in range(num_columns))
  else:
    d_features = (jnp.einsum("nk,kd->nd", weights, g, precision=_EXACT)
                  + 2.0 * features * jnp.einsum("nk,kd->nd", sq_weights, g_sq,
                                                precision=_EXACT))
  d_weights = jnp.einsum("kd,nd->nk", g, features, precision=_EXACT)
  d_sq_weights = _chunked_row_dots(features, g_sq)
  return d_features, d_weights, d_sq_weights


def _chunked_row_dots(features, g_sq):
  """features**2 @ g_sq^T, (N, K), without materialising features**2."""
  return jnp.concatenate([
      jnp.einsum("kd,nd->nk", g_sq, features[a:b]**2, precision=_EXACT)
      for a, b in _row_chunks(features.shape[0])])


feature_moment_sums.defvjp(_feature_moment_sums_fwd, _feature_moment_sums_bwd)


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
    raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
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
  num_domains = leaves[0].shape[0]
  chex.assert_equal_shape_prefix(leaves, 1)
  flat = jnp.concatenate([v.reshape(num_domains, -1) for v in leaves], axis=1)
  squared = (flat - flat.mean(axis=0, keepdims=True))**2
  if reduction == "mean":
    return squared.mean()
  if reduction == "sum":
    return squared.sum()
  raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")


def irm_penalty(logits: jax.Array, labels: jax.Array, domain_ids: jax.Array,
                num_domains: int, split_halves: bool = False) -> jax.Array:
  """IRMv1: mean over domains of (d nll_e(logits * s) / ds at s = 1)^2.

  split_halves: DomainBed's unbiased estimate, the product of the gradients
  on the even and the odd examples of each domain (in batch order) instead of
  the square of the whole domain's gradient (the IRM-setup script).
  """
  groups, num_groups = domain_ids, num_domains
  if split_halves:
    one_hot = jax.nn.one_hot(domain_ids, num_domains, dtype=jnp.int32)
    rank = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0),
                               domain_ids[:, None], axis=1)[:, 0] - 1
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


MMD_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def mmd_penalty(features: jax.Array, domain_ids: jax.Array, num_domains: int,
                gammas: tuple[float, ...] = MMD_GAMMAS) -> jax.Array:
  """Gaussian-kernel MMD^2 (a sum of RBF kernels, as DomainBed's MMD), mean
  over domain pairs of K_ee + K_ff - 2 K_ef with K averaged over examples."""
  one_hot, counts = _domain_one_hot(domain_ids, num_domains, features.dtype)
  sq_norms = (features**2).sum(axis=1)
  sq_dists = jnp.maximum(
      sq_norms[:, None] + sq_norms[None, :]
      - 2.0 * jnp.matmul(features, features.T, precision=_EXACT), 1e-30)
  kernel = sum(jnp.exp(-g * sq_dists) for g in gammas)
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
