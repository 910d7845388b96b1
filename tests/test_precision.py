"""bfloat16 compute mode: the network runs in bfloat16, while parameters,
losses, Fishr's moments, its moving average and its penalty stay float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import algorithms
from fishr_jax.algorithms import fishr
from fishr_jax import models
from fishr_jax import penalties
from fishr_jax import train
from fishr_jax import optimizers


def test_dense_grad_variance_takes_bfloat16_moments_in_float32():
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.normal(3.0, 1.0, (64, 5)), jnp.bfloat16)
  signals = jnp.asarray(rng.normal(0.0, 0.1, (64, 4)), jnp.bfloat16)
  domain = jnp.asarray(np.repeat([0, 1], 32), jnp.int32)
  got = penalties.dense_grad_variance(inputs, signals, domain, 2)
  want = penalties.dense_grad_variance(inputs.astype(jnp.float32),
                                       signals.astype(jnp.float32), domain, 2)
  for leaf in ("kernel", "bias"):
    assert got[leaf].dtype == jnp.float32
    np.testing.assert_array_equal(got[leaf], want[leaf])
    assert np.all(np.asarray(got[leaf]) >= 0)


def _config(params):
  return fishr.Config(lambda_=100.0, ema=0.9, params=params)


@pytest.mark.parametrize("params", ["head", "all"])
def test_bfloat16_train_step_keeps_state_and_penalty_float32(params):
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(96, 12)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, 96), jnp.int32),
           "domain": jnp.asarray(np.repeat([0, 1, 2], 32), jnp.int32)}
  config = _config(params)
  results = {}
  for name in ("float32", "bfloat16"):
    module = models.MLP(hidden_dims=(32, 32), num_outputs=3,
                        dtype=models.compute_dtype(name))
    network = algorithms.Network.from_module(module)
    algorithm = algorithms.make_algorithm("fishr", network, 3, config)
    tx = optimizers.make(optimizers.ADAM, 1e-3)
    params0 = module.init(jax.random.key(0), batch["x"][:1])["params"]
    state = train.create_train_state(jax.random.key(1), params0, algorithm,
                                     tx, batch)
    step = jax.jit(train.make_train_step(algorithm, tx,
                                          algorithms.Schedule()))
    state, metrics = step(state, batch)
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state,
                                                state.alg_state))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, (name, dtypes)
    assert metrics["penalty"].dtype == jnp.float32
    assert np.isfinite(metrics["loss"]) and metrics["penalty"] > 0
    results[name] = metrics
  # bfloat16 really computes in bfloat16 (the numbers move), and stays close.
  assert results["bfloat16"]["penalty"] != results["float32"]["penalty"]
  np.testing.assert_allclose(results["bfloat16"]["penalty"],
                             results["float32"]["penalty"], rtol=0.1)
  np.testing.assert_allclose(results["bfloat16"]["nll"],
                             results["float32"]["nll"], rtol=0.02)


def test_unknown_compute_dtype_is_explained():
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    models.compute_dtype("float16")
