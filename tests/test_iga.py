"""IGA's update (Hessian-vector products) equals one optimizer step along
the plain loss, mean risk + weight * gradient_spread differentiated
through the per-domain gradients, with the IRM script's schedule (warm-up
weight, rescaling, L2) on both sides of the anneal step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import algorithms
from fishr_jax import models
from fishr_jax import optimizers
from fishr_jax import train
from fishr_jax.algorithms import base
from fishr_jax.algorithms import iga


@pytest.mark.parametrize("step", [0, 3])
def test_iga_update_equals_the_plain_loss_step(x64, step):
  del x64
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(18, 5))),
           "y": jnp.asarray(rng.integers(0, 3, 18)),
           "domain": jnp.asarray(np.repeat(np.arange(3), 6))}
  module = models.MLP(hidden_dims=(4,), num_outputs=3)
  params = module.init(jax.random.key(0), batch["x"][:1])["params"]
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  schedule = base.Schedule(penalty_anneal_iters=2, penalty_warmup_weight=1.0,
                           rescale_loss=True, l2_regularizer_weight=1e-3)
  config = iga.Config(lambda_=50.0)
  algorithm = algorithms.make_algorithm("iga", module, 3, config, schedule)
  network = base.Network.from_module(module)

  def penalty_fn(p, state, batch, forward, rng):
    del forward
    grads, _, _ = base.domain_gradients(network, p, batch, 3, schedule, rng)
    return iga.gradient_spread(grads), state

  plain = base.penalized("iga_plain", network, 3, schedule, config.lambda_,
                         penalty_fn)
  tx = optimizers.make(optimizers.ADAM, 1e-2, 1e-4)
  got, expected = (
      train.make_train_step(a, tx, schedule)(
          train.create_train_state(jax.random.key(1), params, a, tx,
                                   batch).replace(step=jnp.asarray(step)),
          batch)
      for a in (algorithm, plain))
  for a, b in zip(jax.tree.leaves(got[0].params),
                  jax.tree.leaves(expected[0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
  for key in ("loss", "penalty", "penalty_weight", "nll"):
    np.testing.assert_allclose(got[1][key], expected[1][key], rtol=1e-10)
