"""fishr-jax against vectors computed by the official PyTorch code in float64.

tests/data/*_fishr_penalty.npz come from github alexrame/fishr (run in
float64, see the .json beside each file and tests/data/README.md).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import algorithms
from fishr_jax.algorithms import settings
from fishr_jax import losses
from fishr_jax import models
from fishr_jax import penalties
from tests.conftest import DATA_DIR

RTOL = 1e-10


def _load(name):
  with np.load(os.path.join(DATA_DIR, name)) as f:
    return {k: f[k] for k in f.files}


def assert_close(actual, expected):
  """max |actual - expected| <= RTOL * max |expected|."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = max(np.abs(expected).max(), 1e-300)
  assert np.abs(actual - expected).max() <= RTOL * scale, (actual, expected)


def _torch_params(ref):
  return {k[len("param."):]: jnp.asarray(v) for k, v in ref.items()
          if k.startswith("param.")}


def _forward(p, x):
  features = jax.nn.relu(x @ p["featurizer.0.weight"].T + p["featurizer.0.bias"])
  return features, features @ p["classifier.weight"].T + p["classifier.bias"]


def _to_torch_layout(head_tree):
  """{"kernel": (E, D, C), "bias": (E, C)} -> torch names and (E, C, D)."""
  return {"classifier.weight": jnp.swapaxes(head_tree["kernel"], 1, 2),
          "classifier.bias": head_tree["bias"]}


def _head_variances(p, x, y, domain, num_domains, grad_path):
  features, logits = _forward(p, x)
  if grad_path == "closed_form":
    return penalties.linear_head_grad_variance(features, logits, y, domain,
                                               num_domains)
  head = {"kernel": p["classifier.weight"].T, "bias": p["classifier.bias"]}
  head_loss = lambda h, z, t: losses.per_example_loss(z @ h["kernel"] + h["bias"], t)
  grads = penalties.per_example_grads(head_loss, head, features, y)
  return penalties.domain_grad_variance(grads, domain, num_domains)


@pytest.mark.parametrize("grad_path", ["closed_form", "vmap"])
def test_domainbed_penalty_ema_and_gradients(x64, grad_path):
  ref = _load("domainbed_fishr_penalty.npz")
  params = _torch_params(ref)
  sizes = ref["len_minibatches"]
  num_domains, ema = len(sizes), float(ref["hparams.ema"])
  domain = jnp.asarray(np.repeat(np.arange(num_domains), sizes))
  state = None
  for call in range(3):
    x = jnp.asarray(ref[f"call{call}.x"])
    y = jnp.asarray(ref[f"call{call}.y"])

    def penalty(p, state):
      variances = _head_variances(p, x, y, domain, num_domains, grad_path)
      if state is None:
        state = jax.tree.map(jnp.zeros_like, variances)
      smoothed, new_state = penalties.ema_update(state, variances, ema)
      return penalties.fishr_penalty(smoothed, "mean"), (variances, smoothed,
                                                         new_state)

    (value, (raw, smoothed, state)), grads = jax.value_and_grad(
        penalty, has_aux=True)(params, state)
    assert value.dtype == jnp.float64
    assert_close(value, ref[f"call{call}.penalty"])
    for tree, key in ((raw, "var_hat"), (smoothed, "ema_value"),
                      (state, "ema_state_after")):
      for name, array in _to_torch_layout(tree).items():
        for d in range(num_domains):
          assert_close(array[d], ref[f"call{call}.{key}.domain{d}.{name}"])
    for name, grad in grads.items():
      assert_close(grad, ref[f"call{call}.grad.{name}"])


@pytest.mark.parametrize("grad_path", ["closed_form", "vmap"])
def test_cmnist_penalty_and_gradients(x64, grad_path):
  ref = _load("cmnist_fishr_penalty.npz")
  params = _torch_params(ref)
  sizes = ref["env_sizes"]  # unequal: 9 and 13
  x = jnp.concatenate([ref["env0.x"], ref["env1.x"]])
  y = jnp.concatenate([ref["env0.y"], ref["env1.y"]])[:, 0]
  domain = jnp.asarray(np.repeat(np.arange(2), sizes))

  def penalty(p):
    variances = _head_variances(p, x, y, domain, 2, grad_path)
    return penalties.fishr_penalty(variances, "sum"), variances

  (value, variances), grads = jax.value_and_grad(penalty, has_aux=True)(params)
  assert_close(value, ref["penalty"])
  for name, array in _to_torch_layout(variances).items():
    for e in range(2):
      assert_close(array[e], ref[f"env{e}.var.{name}"])
  for name, grad in grads.items():
    assert_close(grad, ref[f"grad.{name}"])


def test_fishr_algorithm_reproduces_domainbed_penalties(x64):
  """The Fishr algorithm (library MLP, EMA carried in its state) gives the
  official penalty at each of the three calls."""
  ref = _load("domainbed_fishr_penalty.npz")
  p = _torch_params(ref)
  num_domains = len(ref["len_minibatches"])
  model = models.MLP(hidden_dims=(p["featurizer.0.weight"].shape[0],),
                     num_outputs=p["classifier.weight"].shape[0])
  params = {"hidden_0": {"kernel": p["featurizer.0.weight"].T,
                         "bias": p["featurizer.0.bias"]},
            models.HEAD: {"kernel": p["classifier.weight"].T,
                          "bias": p["classifier.bias"]}}
  config, schedule = settings.from_domainbed(
      "fishr", {"lambda": float(ref["hparams.lambda"]),
                "ema": float(ref["hparams.ema"]), "penalty_anneal_iters": 0})
  algorithm = algorithms.make_algorithm("fishr", model, num_domains, config,
                                        schedule)
  domain = jnp.asarray(np.repeat(np.arange(num_domains), ref["len_minibatches"]))
  batches = [{"x": jnp.asarray(ref[f"call{c}.x"]), "y": jnp.asarray(ref[f"call{c}.y"]),
              "domain": domain} for c in range(3)]
  state = algorithm.init_state(params, batches[0])
  for call, batch in enumerate(batches):
    _, (state, metrics) = algorithm.loss_fn(params, state, batch, jnp.asarray(call), None)
    assert_close(metrics["penalty"], ref[f"call{call}.penalty"])
    assert_close(metrics["nll"], ref[f"call{call}.nll"])
