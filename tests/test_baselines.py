"""CORAL, MMD, GroupDRO, Mixup and DomainBed's IRM estimate against direct
per-domain computations (DomainBed's formulas, written out in numpy)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import algorithms
from fishr_jax import losses
from fishr_jax import models
from fishr_jax import penalties

SIZES = (4, 6, 5)


def _features(seed=0, dim=3):
  rng = np.random.default_rng(seed)
  domain = rng.permutation(np.repeat(np.arange(len(SIZES)), SIZES))
  return rng.normal(size=(len(domain), dim)), domain


def _pairs(values):
  return list(itertools.combinations(range(len(values)), 2))


def test_coral_penalty_matches_numpy():
  z, domain = _features()
  per = [z[domain == e] for e in range(len(SIZES))]
  expected = np.mean([
      np.mean((per[i].mean(0) - per[j].mean(0))**2)
      + np.mean((np.cov(per[i].T) - np.cov(per[j].T))**2)  # unbiased, as torch
      for i, j in _pairs(per)])
  got = penalties.coral_penalty(jnp.asarray(z, jnp.float32), jnp.asarray(domain),
                                len(SIZES))
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_mmd_penalty_matches_numpy():
  z, domain = _features(1)
  per = [z[domain == e] for e in range(len(SIZES))]

  def k(a, b):
    d = ((a[:, None, :] - b[None, :, :])**2).sum(-1)
    return sum(np.exp(-g * d) for g in penalties.MMD_GAMMAS).mean()

  expected = np.mean([k(per[i], per[i]) + k(per[j], per[j]) - 2 * k(per[i], per[j])
                      for i, j in _pairs(per)])
  got = penalties.mmd_penalty(jnp.asarray(z, jnp.float32), jnp.asarray(domain),
                              len(SIZES))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_irm_split_halves_is_domainbed_estimate():
  rng = np.random.default_rng(2)
  domain = np.repeat(np.arange(2), 6)
  logits = jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, 12))
  expected = []
  for e in range(2):
    lg, lb = logits[domain == e], labels[domain == e]
    grad = lambda sl: jax.grad(
        lambda s: losses.per_example_loss(lg[sl] * s, lb[sl]).mean())(1.0)
    expected.append(grad(slice(0, None, 2)) * grad(slice(1, None, 2)))
  got = penalties.irm_penalty(logits, labels, jnp.asarray(domain), 2,
                              split_halves=True)
  np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)


def _setup(name, **block):
  config = algorithms.get(name).config_class(**block)
  model = models.MLP(hidden_dims=(8,), num_outputs=3)
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, 12)),
           "domain": jnp.asarray(np.repeat(np.arange(3), 4))}
  params = model.init(jax.random.key(0), batch["x"])["params"]
  algorithm = algorithms.make_algorithm(name, model, 3, config)
  return model, algorithm, params, batch


def test_groupdro_weights_follow_the_losses():
  model, algorithm, params, batch = _setup("groupdro", eta=0.5)
  q = algorithm.init_state(params, batch)
  np.testing.assert_array_equal(q, np.ones(3))
  loss, (q_new, _) = algorithm.loss_fn(params, q, batch, jnp.asarray(0), None)
  _, logits = model.apply({"params": params}, batch["x"])
  nll = np.array([losses.per_example_loss(logits[4 * e:4 * e + 4],
                                          batch["y"][4 * e:4 * e + 4]).mean()
                  for e in range(3)])
  expected_q = np.exp(0.5 * nll) / np.exp(0.5 * nll).sum()
  np.testing.assert_allclose(q_new, expected_q, rtol=1e-5)
  np.testing.assert_allclose(loss, nll @ expected_q, rtol=1e-5)


def test_mixup_is_a_lam_weighted_loss_over_a_random_cycle():
  model, algorithm, params, batch = _setup("mixup", alpha=0.2)
  rng = jax.random.key(3)
  loss, _ = algorithm.loss_fn(params, (), batch, jnp.asarray(0), rng)
  perm_rng, lam_rng, _ = jax.random.split(rng, 3)
  first = np.asarray(jax.random.permutation(perm_rng, 3))
  lam = np.asarray(jax.random.beta(lam_rng, 0.2, 0.2, (3,)))
  x = np.asarray(batch["x"]).reshape(3, 4, -1)
  y = np.asarray(batch["y"]).reshape(3, 4)
  total = 0.0
  for i in range(3):
    a, b = first[i], first[(i + 1) % 3]
    _, logits = model.apply({"params": params}, lam[i] * x[a] + (1 - lam[i]) * x[b])
    total += (lam[i] * losses.per_example_loss(logits, y[a]).mean()
              + (1 - lam[i]) * losses.per_example_loss(logits, y[b]).mean())
  np.testing.assert_allclose(loss, total / 3, rtol=1e-5)
  with pytest.raises(ValueError, match="rng"):
    algorithm.loss_fn(params, (), batch, jnp.asarray(0), None)


@pytest.mark.parametrize("name,block", [("coral", {"lambda_": 1.0}),
                                        ("mmd", {"lambda_": 1.0})])
def test_feature_alignment_algorithms_add_their_penalty(name, block):
  _, algorithm, params, batch = _setup(name, **block)
  loss, (_, m) = algorithm.loss_fn(params, (), batch, jnp.asarray(1), None)
  assert float(m["penalty"]) > 0
  np.testing.assert_allclose(loss, m["nll"] + m["penalty"], rtol=1e-5)
