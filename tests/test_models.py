"""The models' building blocks."""

import chex
import jax
import jax.numpy as jnp

from fishr_jax import models


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

