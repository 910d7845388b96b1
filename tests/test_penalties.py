"""The Fishr math against direct computations on small random problems."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import losses
from fishr_jax import penalties

# Every test here compares float32 computations of one quantity.
pytestmark = pytest.mark.usefixtures("float32_matmuls")

# Unequal domain sizes everywhere, and domains interleaved in the batch.
DOMAIN_SIZES = (5, 9, 3)
NUM_DOMAINS = len(DOMAIN_SIZES)


def _domains(seed=0):
  ids = np.repeat(np.arange(NUM_DOMAINS), DOMAIN_SIZES)
  return jnp.asarray(np.random.default_rng(seed).permutation(ids), jnp.int32)


def _head_problem(num_classes, seed=0, dim=6):
  domain = _domains(seed)
  n = domain.shape[0]
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  features = jax.random.normal(k1, (n, dim))
  head = {"kernel": jax.random.normal(k2, (dim, num_classes)),
          "bias": jax.random.normal(k3, (num_classes,))}
  if num_classes == 1:
    labels = jax.random.bernoulli(k4, 0.5, (n,)).astype(jnp.float32)
  else:
    labels = jax.random.randint(k4, (n,), 0, num_classes)
  return features, head, labels, domain


def _head_loss(head, z, y):
  return losses.per_example_loss(z @ head["kernel"] + head["bias"], y)


def test_per_example_grads_equals_loop_of_grad():
  features, head, labels, _ = _head_problem(num_classes=4)
  batched = penalties.per_example_grads(_head_loss, head, features, labels)
  for i in range(features.shape[0]):
    single = jax.grad(_head_loss)(head, features[i], labels[i])
    for name in head:
      np.testing.assert_allclose(batched[name][i], single[name], rtol=1e-5,
                                 atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 17, 64])
def test_chunking_never_changes_per_example_grads(chunk_size):
  features, head, labels, _ = _head_problem(num_classes=3)  # N = 17
  def grads(size):  # both jitted: chunking alone differs
    return jax.jit(lambda h, z, y: penalties.per_example_grads(
        _head_loss, h, z, y, chunk_size=size))(head, features, labels)
  whole, chunked = grads(None), grads(chunk_size)
  for name in head:
    # Entries are sums of O(1) terms: a few float32 ulps of 1 apart at most.
    np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-6, atol=1e-6)


def test_per_example_grads_of_any_subtree():
  """A two-layer model, gradients w.r.t. every parameter."""
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  params = {"w1": jax.random.normal(k1, (3, 4)), "w2": jax.random.normal(k2, (4,))}
  x = jax.random.normal(k3, (6, 3))
  loss = lambda p, xi: jnp.tanh(xi @ p["w1"]) @ p["w2"]
  batched = penalties.per_example_grads(loss, params, x)
  assert batched["w1"].shape == (6, 3, 4) and batched["w2"].shape == (6, 4)
  for i in range(6):
    single = jax.grad(loss)(params, x[i])
    np.testing.assert_allclose(batched["w1"][i], single["w1"], rtol=1e-5, atol=1e-6)


def _numpy_variance(g, domain, centered=True):
  g, domain = np.asarray(g, np.float64), np.asarray(domain)
  out = []
  for e in range(NUM_DOMAINS):
    ge = g[domain == e]
    if centered:
      ge = ge - ge.mean(0)
    out.append((ge**2).mean(0))
  return np.stack(out)


@pytest.mark.parametrize("centered", [True, False])
def test_domain_grad_variance_matches_numpy(centered):
  features, head, labels, domain = _head_problem(num_classes=3)
  grads = penalties.per_example_grads(_head_loss, head, features, labels)
  variances = penalties.domain_grad_variance(grads, domain, NUM_DOMAINS,
                                             centered=centered)
  for name in head:
    assert variances[name].shape == (NUM_DOMAINS,) + head[name].shape
    np.testing.assert_allclose(variances[name],
                               _numpy_variance(grads[name], domain, centered),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_classes", [1, 2, 7])
@pytest.mark.parametrize("centered", [True, False])
def test_closed_form_equals_vmap_grad(num_classes, centered):
  features, head, labels, domain = _head_problem(num_classes, seed=num_classes)
  logits = features @ head["kernel"] + head["bias"]
  closed = penalties.linear_head_grad_variance(
      features, logits, labels, domain, NUM_DOMAINS, centered=centered)
  grads = penalties.per_example_grads(_head_loss, head, features, labels)
  generic = penalties.domain_grad_variance(grads, domain, NUM_DOMAINS,
                                           centered=centered)
  for name in head:
    np.testing.assert_allclose(closed[name], generic[name], rtol=1e-4, atol=1e-6)


def test_closed_form_penalty_gradient_equals_vmap_path():
  """Same penalty gradient w.r.t. the head AND the features (featurizer)."""
  features, head, labels, domain = _head_problem(num_classes=4, seed=3)

  def penalty(head, features, closed_form):
    if closed_form:
      logits = features @ head["kernel"] + head["bias"]
      v = penalties.linear_head_grad_variance(features, logits, labels, domain,
                                              NUM_DOMAINS)
    else:
      g = penalties.per_example_grads(_head_loss, head, features, labels)
      v = penalties.domain_grad_variance(g, domain, NUM_DOMAINS)
    return penalties.fishr_penalty(v)

  closed = jax.grad(penalty, argnums=(0, 1))(head, features, True)
  generic = jax.grad(penalty, argnums=(0, 1))(head, features, False)
  assert float(jnp.abs(closed[1]).max()) > 0  # the featurizer is reached
  for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(generic)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("centered", [True, False])
def test_domain_grad_covariance_matches_the_official_formula(centered):
  """einsum('na,nb->ab', g, g) / (n_e * k) per domain, g centered on its
  domain's mean unless not centered (the official fishr_offdiagonal centers)."""
  features, head, labels, domain = _head_problem(num_classes=2)
  grads = penalties.per_example_grads(_head_loss, head, features, labels)
  cov = jax.jit(penalties.domain_grad_covariance, static_argnums=(2, 3))(
      grads, domain, NUM_DOMAINS, centered)
  g = np.asarray(grads["kernel"]).reshape(len(domain), -1)
  k = g.shape[1]
  for e in range(NUM_DOMAINS):
    ge = g[np.asarray(domain) == e]
    if centered:
      ge = ge - ge.mean(axis=0)
    np.testing.assert_allclose(cov["kernel"][e], ge.T @ ge / (len(ge) * k),
                               rtol=1e-4, atol=1e-6)


def _loop_penalty(features, head, labels, domain, centered, covariance):
  """The penalty from a Python loop of jax.grad over single examples."""
  grads = [jax.grad(_head_loss)(head, features[i], labels[i])
           for i in range(len(labels))]
  grads = jax.tree.map(lambda *g: jnp.stack(g), *grads)
  reduce = (penalties.domain_grad_covariance if covariance
            else penalties.domain_grad_variance)
  return penalties.fishr_penalty(reduce(grads, domain, NUM_DOMAINS, centered))


@pytest.mark.parametrize("path", ["closed_form", "vmap", "vmap_covariance"])
@pytest.mark.parametrize("centered", [True, False])
def test_every_variant_jitted_equals_a_loop_of_grad(path, centered):
  """The penalty and its gradient w.r.t. the features, jitted, against a
  Python loop of jax.grad on single examples."""
  features, head, labels, domain = _head_problem(num_classes=3, seed=5)

  def penalty(features):
    if path == "closed_form":
      logits = features @ head["kernel"] + head["bias"]
      v = penalties.linear_head_grad_variance(features, logits, labels, domain,
                                              NUM_DOMAINS, centered)
    else:
      g = penalties.per_example_grads(_head_loss, head, features, labels)
      reduce = (penalties.domain_grad_covariance if path == "vmap_covariance"
                else penalties.domain_grad_variance)
      v = reduce(g, domain, NUM_DOMAINS, centered)
    return penalties.fishr_penalty(v)

  loop = lambda f: _loop_penalty(f, head, labels, domain, centered,
                                 path == "vmap_covariance")
  value, grad = jax.jit(jax.value_and_grad(penalty))(features)
  want_value, want_grad = jax.value_and_grad(loop)(features)
  assert float(want_value) > 0 and float(jnp.abs(want_grad).max()) > 0
  np.testing.assert_allclose(value, want_value, rtol=1e-4)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-3,
                             atol=1e-6 * float(jnp.abs(want_grad).max()))


def test_penalty_is_zero_for_equal_variances():
  v = jax.random.uniform(jax.random.key(0), (7, 4))
  same = {"w": jnp.stack([v] * NUM_DOMAINS), "b": jnp.ones((NUM_DOMAINS, 3))}
  # Zero up to the rounding of the mean over domains.
  assert float(penalties.fishr_penalty(same)) < 1e-14
  assert float(penalties.fishr_penalty(same, "sum")) < 1e-12
  different = {"w": same["w"].at[1].add(0.1), "b": same["b"]}
  assert float(penalties.fishr_penalty(different)) > 1e-4


def test_penalty_reductions():
  variances = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]]), "b": jnp.array([[0.0], [2.0]])}
  # Means over domains: w (2, 4), b (1); squared deviations per domain:
  # w [1, 4], b [1] for each of the 2 domains -> 3 coordinates x 2 domains.
  assert float(penalties.fishr_penalty(variances, "sum")) == pytest.approx(12.0)
  assert float(penalties.fishr_penalty(variances, "mean")) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="reduction"):
    penalties.fishr_penalty(variances, "max")


def test_variance_invariant_to_example_order():
  features, head, labels, domain = _head_problem(num_classes=3, seed=5)
  logits = features @ head["kernel"] + head["bias"]
  perm = jax.random.permutation(jax.random.key(9), len(domain))
  before = penalties.linear_head_grad_variance(features, logits, labels, domain,
                                               NUM_DOMAINS)
  after = penalties.linear_head_grad_variance(features[perm], logits[perm],
                                              labels[perm], domain[perm],
                                              NUM_DOMAINS)
  for name in before:
    np.testing.assert_allclose(before[name], after[name], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(penalties.fishr_penalty(before),
                             penalties.fishr_penalty(after), rtol=1e-5)


def test_ema_first_value_is_raw_variance_then_scaled_history():
  v0 = {"w": jnp.array([[1.0, 2.0]]), "b": jnp.array([[3.0]])}
  v1 = {"w": jnp.array([[5.0, 4.0]]), "b": jnp.array([[1.0]])}
  state = jax.tree.map(jnp.zeros_like, v0)
  smoothed, state = penalties.ema_update(state, v0, 0.95)
  np.testing.assert_allclose(smoothed["w"], v0["w"])
  np.testing.assert_allclose(state["w"], 0.05 * v0["w"], rtol=1e-6)
  smoothed, state = penalties.ema_update(state, v1, 0.95)
  # m / (1 - gamma) with m = 0.95 * 0.05 * v0 + 0.05 * v1.
  np.testing.assert_allclose(smoothed["w"], 0.95 * v0["w"] + v1["w"], rtol=1e-6)
  # Only the current variance carries gradient.
  grad = jax.grad(lambda s, v: penalties.ema_update(s, v, 0.9)[0]["w"].sum(),
                  argnums=(0, 1))(state, v1)
  assert float(jnp.abs(grad[0]["w"]).max()) == 0.0
  np.testing.assert_allclose(grad[1]["w"], jnp.ones_like(v1["w"]))
  with pytest.raises(ValueError, match="decay"):
    penalties.ema_update(state, v1, 1.0)


def test_irm_penalty_matches_per_domain_dummy_gradient():
  features, head, labels, domain = _head_problem(num_classes=1, seed=2)
  logits = features @ head["kernel"] + head["bias"]
  expected = []
  for e in range(NUM_DOMAINS):
    mask = domain == e
    nll = lambda s: losses.per_example_loss(logits[mask] * s, labels[mask]).mean()
    expected.append(jax.grad(nll)(1.0)**2)
  np.testing.assert_allclose(
      penalties.irm_penalty(logits, labels, domain, NUM_DOMAINS),
      np.mean(expected), rtol=1e-5)


def test_vrex_penalty():
  risks = jnp.array([0.3, 0.7])
  assert float(penalties.vrex_penalty(risks, "pairwise")) == pytest.approx(0.16)
  assert float(penalties.vrex_penalty(risks, "variance")) == pytest.approx(0.04)
  three = jnp.array([1.0, 2.0, 4.0])
  # pairs: 1, 9, 4 -> mean 14 / 3
  assert float(penalties.vrex_penalty(three, "pairwise")) == pytest.approx(14 / 3)


def test_domain_mean_unequal_sizes_and_empty_domain_is_nan():
  values = jnp.array([1.0, 2.0, 3.0, 10.0])
  domain = jnp.array([0, 0, 0, 1])
  np.testing.assert_allclose(penalties.domain_mean(values, domain, 2), [2.0, 10.0])
  assert bool(jnp.isnan(penalties.domain_mean(values, domain, 3)[2]))


def test_jit_and_shape_checks():
  features, head, labels, domain = _head_problem(num_classes=3)
  logits = features @ head["kernel"] + head["bias"]
  fn = jax.jit(penalties.linear_head_grad_variance, static_argnums=4)
  out = fn(features, logits, labels, domain, NUM_DOMAINS)
  assert out["kernel"].shape == (NUM_DOMAINS, 6, 3) and out["bias"].shape == (NUM_DOMAINS, 3)
  with pytest.raises(AssertionError):
    penalties.linear_head_grad_variance(features, logits[:-1], labels, domain,
                                        NUM_DOMAINS)


def test_public_functions_refuse_domain_ids_and_labels_out_of_range():
  from fishr_jax import losses  # pylint: disable=g-import-not-at-top
  values = jnp.ones((4, 2))
  with pytest.raises(ValueError, match=r"domain_ids must be integers in "
                     r"\[0, 2\), got int32 values in \[0, 2\]"):
    penalties.domain_mean(values, jnp.array([0, 1, 2, 1]), 2)
  with pytest.raises(ValueError, match="No examples"):
    penalties.domain_mean(jnp.ones((0, 2)), jnp.zeros(0, jnp.int32), 2)
  with pytest.raises(ValueError, match=r"integers in \[0, 3\) for 3 outputs"):
    losses.per_example_loss(jnp.zeros((2, 3)), jnp.array([0, 3]))
  with pytest.raises(ValueError, match="binary head's labels must be 0 or 1"):
    losses.loss_residual(jnp.zeros((2, 1)), jnp.array([0.0, 2.0]))
  # Under jit the values are not known: nothing is checked (the loaders
  # check the data before it gets there).
  jax.jit(penalties.domain_mean, static_argnums=2)(
      values, jnp.array([0, 1, 2, 1]), 2)
