"""The models' building blocks."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np

from configs import colored_mnist as cmnist_config
from fishr_jax import algorithms
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import train


def test_relu_equals_jax_relu_with_its_derivatives():
  x = jnp.array([-2.0, -0.5, 0.0, 0.5, 3.0])
  upstream = jnp.array([1.5, -2.0, 3.0, -4.0, 0.25])
  chex.assert_trees_all_equal(models.relu(x), jax.nn.relu(x))
  vjp = lambda relu: jax.vjp(relu, x)[1](upstream)[0]
  # The derivative at 0 is 0, as jax.nn.relu's.
  chex.assert_trees_all_equal(vjp(models.relu), vjp(jax.nn.relu))
  jvp = lambda relu: jax.jvp(relu, (x,), (upstream,))[1]
  chex.assert_trees_all_equal(jvp(models.relu), jvp(jax.nn.relu))
  # Second order (Fishr over every layer differentiates the backward pass).
  hvp = lambda relu: jax.grad(lambda v: jnp.sum(jax.grad(
      lambda u: jnp.sum(relu(u) * v))(x) ** 2))(upstream)
  chex.assert_trees_all_equal(hvp(models.relu), hvp(jax.nn.relu))


def test_relu_backward_is_fused_into_the_next_layers_matmul():
  """The reason `models.relu` exists: on CPU, the hidden layers' backward
  matmul and relu's mask are one YNNPACK fusion (with jax.nn.relu the mask
  is a separate select over the (N, H) activations)."""
  config = cmnist_config.get_config()
  config.xla_cpu_dot_fusion = True
  rng = np.random.default_rng(0)
  batch = {"x": rng.random((512, 392), np.float32),
           "y": rng.integers(0, 2, 512).astype(np.float32),
           "domain": np.repeat(np.arange(2, dtype=np.int32), 256)}
  model = models.MLP(hidden_dims=(390, 390), num_outputs=1)
  algorithm = algorithms.make_algorithm("erm", model, 2, config)
  tx = train.make_optimizer(config)
  params = model.init(jax.random.key(1), batch["x"][:1])["params"]
  step = train.jit_train_step(train.make_train_step(algorithm, tx, config),
                              parallel.make_mesh(1), config, donate=False)
  state = train.create_train_state(jax.random.key(0), params, algorithm, tx,
                                   batch)
  text = step.lower(state, batch).compile().as_text()
  ynn_computations = re.findall(
      r"fusion\([^)]*\), kind=kCustom, calls=%([\w.]+)", text)
  fused_bodies = [
      re.search(rf"\n%{re.escape(name)} \(.*?\n}}", text, re.S).group(0)
      for name in ynn_computations]
  assert any(" dot(" in body and " sign(" in body for body in fused_bodies)
