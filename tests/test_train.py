"""The train step: schedule, optimizer reset, rescaling, tracing, EMA state."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import colored_mnist as cmnist_config
from fishr_jax import algorithms
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import train
from fishr_jax import optimizers
from fishr_jax.algorithms import base
from fishr_jax.algorithms import settings

ANNEAL = 3


def _config(algorithm="fishr", **overrides):
  config = cmnist_config.get_config()
  config.algorithm = algorithm
  config.penalty_anneal_iters = ANNEAL
  config.fishr.lambda_ = 50.0
  for key, value in overrides.items():
    config[key] = value
  return config


def _batch(seed=0, n_per_domain=(6, 10), dim=5):
  rng = np.random.default_rng(seed)
  n = sum(n_per_domain)
  return {"x": jnp.asarray(rng.normal(size=(n, dim)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 2, n), jnp.float32),
          "domain": jnp.asarray(np.repeat(np.arange(len(n_per_domain)), n_per_domain),
                                jnp.int32)}


def _setup(config, batch):
  """(algorithm, optimizer, state, train step) as the trainer builds them."""
  model = models.MLP(hidden_dims=(8, 8), num_outputs=1)
  alg_config, schedule = settings.from_config_dict(config)
  algorithm = algorithms.make_algorithm(config.algorithm, model, 2, alg_config,
                                        schedule)
  tx = optimizers.make(config.optimizer, config.lr, config.weight_decay)
  params = model.init(jax.random.key(1), batch["x"][:1])["params"]
  state = train.create_train_state(jax.random.key(0), params, algorithm, tx, batch)
  return algorithm, tx, state, train.make_train_step(algorithm, tx, schedule)


def _adam_state(opt_state) -> optax.ScaleByAdamState:
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=is_adam)
              if is_adam(s))


def test_penalty_weight_switches_exactly_at_anneal():
  _, schedule = settings.from_config_dict(_config())
  weights = [float(base.penalty_weight(jnp.asarray(s), 50.0, schedule))
             for s in range(ANNEAL + 2)]
  assert weights == [1.0] * ANNEAL + [50.0, 50.0]
  domainbed = base.Schedule(penalty_anneal_iters=ANNEAL)  # warm-up weight 0
  assert float(base.penalty_weight(jnp.asarray(ANNEAL - 1), 50.0, domainbed)) == 0.0


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_reset_exactly_at_anneal(reset):
  config = _config(reset_optimizer_at_anneal=reset)
  batch = _batch()
  algorithm, tx, state, step = _setup(config, batch)
  step_fn = jax.jit(step)
  counts = []
  for _ in range(ANNEAL + 2):
    state, _ = step_fn(state, batch)
    counts.append(int(_adam_state(state.opt_state).count))
  if reset:
    assert counts == [1, 2, 3, 1, 2]
  else:
    assert counts == [1, 2, 3, 4, 5]


def test_first_moment_is_fresh_after_reset():
  """Right after the reset, Adam's first moment is (1 - b1) * that gradient."""
  config = _config(reset_optimizer_at_anneal=True)
  batch = _batch()
  algorithm, tx, state, step = _setup(config, batch)
  step_fn = jax.jit(step)
  for _ in range(ANNEAL):
    state, _ = step_fn(state, batch)
  grads, _ = jax.grad(algorithm.loss_fn, has_aux=True)(
      state.params, state.alg_state, batch, state.step,
      jax.random.fold_in(state.rng, state.step))
  state, _ = step_fn(state, batch)
  mu = _adam_state(state.opt_state).mu
  chex.assert_trees_all_close(mu, jax.tree.map(lambda g: 0.1 * g, grads),
                              rtol=1e-5, atol=1e-8)


def test_loss_is_rescaled_by_the_weight_after_anneal():
  config = _config()
  batch = _batch()
  algorithm, _, state, _ = _setup(config, batch)
  for step, weight in ((ANNEAL - 1, 1.0), (ANNEAL, 50.0)):
    loss, (_, m) = algorithm.loss_fn(state.params, state.alg_state, batch,
                                     jnp.asarray(step), None)
    unscaled = (m["nll"] + config.l2_regularizer_weight
                * base.squared_l2_norm(state.params) + weight * m["penalty"])
    np.testing.assert_allclose(loss, unscaled / weight, rtol=1e-5)
    assert float(m["penalty_weight"]) == weight


def test_erm_has_no_penalty_and_no_rescaling():
  config = _config("erm")
  batch = _batch()
  algorithm, _, state, _ = _setup(config, batch)
  loss, (_, m) = algorithm.loss_fn(state.params, (), batch, jnp.asarray(ANNEAL + 5),
                                   None)
  assert "penalty" not in m
  np.testing.assert_allclose(
      loss, m["nll"] + config.l2_regularizer_weight * base.squared_l2_norm(state.params),
      rtol=1e-6)


@pytest.mark.parametrize("name", ["erm", "irm", "vrex", "fishr"])
def test_train_step_traces_once_and_learns(name):
  chex.clear_trace_counter()
  config = _config(name, reset_optimizer_at_anneal=True)
  config.fishr.ema = 0.9
  batch = _batch()
  algorithm, tx, state, step = _setup(config, batch)
  step_fn = jax.jit(chex.assert_max_traces(step, n=1))
  first = None
  for _ in range(2 * ANNEAL):  # crosses the anneal step: still one trace
    state, metrics = step_fn(state, batch)
    first = metrics["nll"] if first is None else first
  assert int(state.step) == 2 * ANNEAL
  assert float(metrics["nll"]) < float(first)
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_fishr_ema_state_is_carried_by_the_train_state():
  config = _config()
  config.fishr.ema = 0.9
  batch = _batch()
  algorithm, tx, state, step = _setup(config, batch)
  assert jax.tree.map(jnp.shape, state.alg_state) == {"kernel": (2, 8, 1), "bias": (2, 1)}
  assert float(jnp.abs(state.alg_state["kernel"]).max()) == 0.0
  state, _ = jax.jit(step)(state, batch)
  assert float(jnp.abs(state.alg_state["kernel"]).max()) > 0.0


def test_fishr_grad_paths_give_the_same_step():
  batch = _batch()
  states = {}
  for path, chunk in (("closed_form", None), ("vmap", None), ("vmap_chunked", 5)):
    config = _config()
    config.fishr.grad_path = path.replace("_chunked", "")
    config.fishr.vmap_chunk_size = chunk
    algorithm, tx, state, step = _setup(config, batch)
    step_fn = jax.jit(step)
    for _ in range(ANNEAL + 2):
      state, metrics = step_fn(state, batch)
    states[path] = (state.params, metrics["penalty"])
  chex.assert_trees_all_close(states["closed_form"], states["vmap"], rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(states["vmap"], states["vmap_chunked"], rtol=1e-6, atol=1e-7)


def test_bad_algorithm_settings_raise_clear_errors():
  model = models.MLP(hidden_dims=(4,), num_outputs=1)
  with pytest.raises(ValueError, match="Unknown algorithm"):
    algorithms.make_algorithm("nope", model, 2)
  config = _config()
  config.fishr.covariance = "full"
  with pytest.raises(ValueError, match="grad_path='vmap'"):
    settings.from_config_dict(config)
  config = _config()
  config.fishr.moment_sums = "fastest"
  with pytest.raises(ValueError, match="moment_sums must be one of"):
    settings.from_config_dict(config)
  with pytest.raises(TypeError, match="takes a fishr_jax.algorithms.irm.Config"):
    algorithms.make_algorithm("irm", model, 2, settings.from_config_dict(
        _config())[0])
  assert set(algorithms.names()) >= {"erm", "irm", "vrex", "fishr"}


def _ynn_fusion_operands(compiled_text: str) -> list[int]:
  """Operand counts of the YNNPACK fusions in a compiled CPU program."""
  return [len(m.group(1).split(","))
          for m in re.finditer(r"= \S+ fusion\(([^)]*)\), kind=kCustom",
                               compiled_text)]


def _colored_mnist_mlp_step(config, algorithm_name="fishr"):
  """The Colored MNIST MLP's step (392-390-390-1) on one CPU device, its
  start state and a 2 x 256 batch."""
  batch = _batch(n_per_domain=(256, 256), dim=392)
  model = models.MLP(hidden_dims=(390, 390), num_outputs=1)
  config.algorithm = algorithm_name
  alg_config, schedule = settings.from_config_dict(config)
  algorithm = algorithms.make_algorithm(algorithm_name, model, 2, alg_config,
                                        schedule)
  tx = optimizers.make(config.optimizer, config.lr, config.weight_decay)
  params = model.init(jax.random.key(1), batch["x"][:1])["params"]
  step = train.jit_train_step(train.make_train_step(algorithm, tx, schedule),
                              parallel.make_mesh(1), config.xla_cpu_dot_fusion,
                              donate=False)
  state = train.create_train_state(jax.random.key(0), params, algorithm, tx,
                                   batch)
  return step, state, batch


@pytest.mark.slow
def test_cpu_dot_fusion_keeps_the_result():
  config = _config(penalty_anneal_iters=0)
  outputs = {}
  for fused in (True, False):
    config.xla_cpu_dot_fusion = fused
    step, state, batch = _colored_mnist_mlp_step(config)
    losses = []
    for _ in range(3):
      state, metrics = step(state, batch)
      losses.append(metrics["loss"])
    outputs[fused] = (state.params, jnp.stack(losses))
  chex.assert_trees_all_close(outputs[True], outputs[False], rtol=2e-5,
                              atol=1e-6)


@pytest.mark.perf
def test_cpu_dot_fusion_is_applied():
  """Fused, the hidden layers' dots take their bias (3 operands); unfused, a
  YNNPACK dot takes only its two matrices."""
  config = _config(penalty_anneal_iters=0)
  operands = {}
  for fused in (True, False):
    config.xla_cpu_dot_fusion = fused
    step, state, batch = _colored_mnist_mlp_step(config)
    operands[fused] = _ynn_fusion_operands(
        step.lower(state, batch).compile().as_text())
  assert max(operands[True]) >= 3 and max(operands[False]) == 2


@pytest.mark.perf
def test_relu_backward_is_fused_into_the_next_layers_matmul():
  """The reason `models.relu` exists: on CPU, the hidden layers' backward
  matmul and relu's mask are one YNNPACK fusion (with jax.nn.relu the mask
  is a separate select over the (N, H) activations)."""
  config = _config("erm", xla_cpu_dot_fusion=True)
  step, state, batch = _colored_mnist_mlp_step(config, "erm")
  text = step.lower(state, batch).compile().as_text()
  ynn_computations = re.findall(
      r"fusion\([^)]*\), kind=kCustom, calls=%([\w.]+)", text)
  fused_bodies = [
      re.search(rf"\n%{re.escape(name)} \(.*?\n}}", text, re.S).group(0)
      for name in ynn_computations]
  assert any(" dot(" in body and " sign(" in body for body in fused_bodies)
