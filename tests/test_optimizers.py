"""The optimizer named in the config (fishr_jax/optimizers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import colored_mnist as cmnist_config
from fishr_jax import config_checks
from fishr_jax import errors
from fishr_jax import optimizers
from fishr_jax import train
from fishr_jax import vectorized
from fishr_jax.algorithms import base
from fishr_jax.algorithms import fishr


def _updates(tx, steps=5):
  params = {"w": jnp.linspace(-1.0, 1.0, 6)}
  state = tx.init(params)
  for step in range(steps):
    grads = {"w": jnp.sin(params["w"] * (step + 1))}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params["w"])


def test_the_default_is_torch_adam_with_coupled_weight_decay():
  # torch.optim.Adam(lr, weight_decay): decay added to the gradient, then
  # Adam's moments (not AdamW's decoupled decay).
  torch_adam = optax.chain(optax.add_decayed_weights(0.1),
                           optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                           optax.scale(-1e-2))
  np.testing.assert_array_equal(
      _updates(optimizers.make(optimizers.ADAM, 1e-2, 0.1)),
      _updates(torch_adam))


def test_sgd_with_momentum_is_one_string():
  ours = _updates(optimizers.make("sgd(momentum=0.9)", 0.1))
  np.testing.assert_allclose(ours, _updates(optax.sgd(0.1, momentum=0.9)),
                             rtol=1e-6)
  assert optimizers.parse("sgd") == ("sgd", {})


@pytest.mark.parametrize("spec, message", [
    ("adam(", "not a call"),
    ("adam(0.9)", "give every argument by name"),
    ("adamm(b1=0.9)", "no optimizer 'adamm'"),
    ("sgd(momentun=0.9)", "takes no momentun"),
    ("sgd(learning_rate=0.1)", "takes no learning_rate"),
    ("sgd(momentum=x)", "must be a Python literal"),
    ("optax.sgd()", "not NAME"),
])
def test_a_bad_optimizer_is_a_config_error(spec, message):
  with pytest.raises(errors.ConfigError, match=message):
    optimizers.parse(spec)
  config = cmnist_config.get_config()
  config.optimizer = spec
  with pytest.raises(errors.ConfigError, match="config.optimizer="):
    config_checks.check(config)


def test_runs_with_another_optimizer_do_not_share_a_program():
  spec = train.StepSpec(fishr.Config(), base.Schedule(), 1e-3)
  sgd = train.StepSpec(fishr.Config(), base.Schedule(), 1e-2,
                       optimizer="sgd(momentum=0.9)")
  other_lr = train.StepSpec(fishr.Config(), base.Schedule(), 1e-2)
  assert vectorized.group_key(spec) == vectorized.group_key(other_lr)
  assert vectorized.group_key(spec) != vectorized.group_key(sgd)
  with pytest.raises(ValueError, match="cannot train as one program"):
    vectorized.split_hparams([spec, sgd])


def test_a_traced_learning_rate_gives_the_same_update():
  tx = lambda lr: optimizers.make("sgd(momentum=0.9)", lr, 1e-3)
  params = {"w": jnp.arange(3.0)}
  grads = {"w": jnp.ones(3)}

  def update(lr):
    updates, _ = tx(lr).update(grads, tx(lr).init(params), params)
    return updates["w"]

  np.testing.assert_allclose(jax.jit(update)(0.1), update(0.1), rtol=1e-7)
