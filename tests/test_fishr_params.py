"""Fishr beyond the head: config.fishr.params = "all" or a pattern. The
closed form from Dense layers' inputs and signals, vmap(grad), and a Python
loop of jax.grad over single examples give the same variances, penalty and
gradients."""

import flax.linen as nn
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import algorithms
from fishr_jax.algorithms import fishr
from fishr_jax import layer_signals
from fishr_jax import losses
from fishr_jax import models
from fishr_jax import penalties



@pytest.fixture(autouse=True)
def _float64(x64):
  """The comparisons are exact: float64 in this module's tests only."""
  del x64
  yield

NUM_DOMAINS = 3


def _batch(num_outputs, n=(7, 5, 9), seed=0, image=False):
  rng = np.random.default_rng(seed)
  total = sum(n)
  shape = (total, 8, 8, 1) if image else (total, 6)
  y = (rng.integers(0, 2, total).astype(np.float64) if num_outputs == 1
       else rng.integers(0, num_outputs, total).astype(np.int32))
  return {"x": jnp.asarray(rng.normal(size=shape)),
          "y": jnp.asarray(y),
          "domain": jnp.asarray(np.repeat(np.arange(NUM_DOMAINS), n)
                                .astype(np.int32))}


def _mlp(num_outputs):
  module = models.MLP(hidden_dims=(5, 4), num_outputs=num_outputs)
  params = module.init(jax.random.key(0), jnp.zeros((1, 6), jnp.float64))
  # float64, and nonzero biases.
  params = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.1, params["params"])
  return module, params


def _loop_variances(module, params, batch, names):
  """Per-example gradients by a Python loop of jax.grad, then numpy."""
  def example_loss(chosen, x, y):
    full = layer_signals.with_subtree(params, chosen)
    _, logits = module.apply({"params": full}, x[None])
    return losses.per_example_loss(logits, y[None])[0]

  chosen = layer_signals.subtree(params, names)
  grad = jax.jit(jax.grad(example_loss))  # one compile, not one per op
  grads = [grad(chosen, batch["x"][i], batch["y"][i])
           for i in range(len(batch["y"]))]
  domain = np.asarray(batch["domain"])
  out = {}
  for name in names:
    g = np.stack([np.asarray(gi[name]) for gi in grads])
    out[name] = np.stack([g[domain == e].var(axis=0)
                          for e in range(NUM_DOMAINS)])
  return out


# Unequal domains, equal ones in the loaders' layout, and shuffled ones.
@pytest.mark.parametrize("sizes,shuffle", [
    ((7, 5, 9), False), pytest.param((6, 6, 6), False, marks=pytest.mark.slow),
    pytest.param((6, 6, 6), True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("num_outputs", [1, 3])
def test_dense_layer_closed_form_equals_loop_of_grad(num_outputs, sizes,
                                                     shuffle):
  module, params = _mlp(num_outputs)
  batch = _batch(num_outputs, n=sizes)
  if shuffle:
    order = np.random.default_rng(1).permutation(sum(sizes))
    batch = {k: v[order] for k, v in batch.items()}
  names = layer_signals.select_params(params, "all")
  layers = layer_signals.group_by_layer(names)
  assert set(layers) == {"hidden_0", "hidden_1", "classifier"}
  network = algorithms.Network.from_module(module)
  features, logits, captured = layer_signals.forward_with_signals(
      network.forward, params, batch["x"], None, batch["y"], list(layers))
  plain_features, plain_logits = module.apply({"params": params}, batch["x"])
  np.testing.assert_allclose(logits, plain_logits, rtol=1e-12)
  np.testing.assert_allclose(features, plain_features, rtol=1e-12)
  expected = _loop_variances(module, params, batch, names)
  for layer in layers:
    assert captured[layer].conv is None
    got = penalties.dense_grad_variance(captured[layer].inputs,
                                        captured[layer].signals,
                                        batch["domain"], NUM_DOMAINS)
    for leaf in ("kernel", "bias"):
      assert np.abs(expected[f"{layer}/{leaf}"]).max() > 1e-6
      np.testing.assert_allclose(got[leaf], expected[f"{layer}/{leaf}"],
                                 rtol=1e-9, atol=1e-14)


def _config(params, grad_path, chunk=None, ema=0.0, moment_sums="reference"):
  return fishr.Config(lambda_=10.0, ema=ema, params=params, grad_path=grad_path,
                      vmap_chunk_size=chunk, moment_sums=moment_sums)


def _penalty_and_grads(module, params, batch, config):
  network = algorithms.Network.from_module(module)
  algorithm = algorithms.make_algorithm("fishr", network, NUM_DOMAINS, config)
  state = algorithm.init_state(params, batch)

  def loss(p):
    value, (new_state, metrics) = algorithm.loss_fn(
        p, state, batch, jnp.asarray(1), jax.random.key(0))
    return value, (metrics["penalty"], new_state)

  (value, (penalty, new_state)), grads = jax.jit(
      jax.value_and_grad(loss, has_aux=True))(params)
  return penalty, grads, new_state


@pytest.mark.parametrize("sizes", [
    (7, 5, 9), pytest.param((6, 6, 6), marks=pytest.mark.slow)])
@pytest.mark.parametrize("which", ["all", "hidden_1|classifier", "head",
                                   "hidden_0/kernel"])
def test_closed_form_and_vmap_agree_on_penalty_and_its_gradient(which, sizes):
  module, params = _mlp(3)
  batch = _batch(3, n=sizes)
  closed = _penalty_and_grads(module, params, batch,
                              _config(which, "closed_form", ema=0.9))
  vmapped = _penalty_and_grads(module, params, batch,
                               _config(which, "vmap", ema=0.9))
  chunked = _penalty_and_grads(module, params, batch,
                               _config(which, "vmap", chunk=4, ema=0.9))
  assert closed[0] > 1e-6
  names = layer_signals.select_params(params, which)
  expected = _loop_variances(module, params, batch, names)
  # Penalty from the loop's variances ("mean": over domains and coordinates).
  flat = np.concatenate([v.reshape(NUM_DOMAINS, -1) for v in expected.values()],
                        axis=1)
  loop_penalty = ((flat - flat.mean(axis=0)) ** 2).mean()
  for penalty, grads, state in (closed, vmapped, chunked):
    np.testing.assert_allclose(penalty, loop_penalty, rtol=1e-9)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8,
                                                         atol=1e-12),
                 grads, closed[1])
    # The moving averages, by name ({layer: {leaf}} or {"layer/leaf"}).
    by_name = lambda t: dict(zip(layer_signals.param_names(t),
                                 jax.tree.leaves(t)))
    assert by_name(state).keys() == by_name(closed[2]).keys()
    for name, value in by_name(state).items():
      np.testing.assert_allclose(value, by_name(closed[2])[name], rtol=1e-9,
                                 atol=1e-15)


def test_full_network_penalty_differs_from_the_head_only_one():
  module, params = _mlp(3)
  batch = _batch(3)
  head = _penalty_and_grads(module, params, batch, _config("head", "closed_form"))
  full = _penalty_and_grads(module, params, batch, _config("all", "closed_form"))
  assert not np.isclose(head[0], full[0])
  # With the head only, the penalty still trains the featurizer (through the
  # features), and covering all layers changes that gradient.
  assert np.abs(head[1]["hidden_0"]["kernel"]).max() > 0
  assert not np.allclose(head[1]["hidden_0"]["kernel"],
                         full[1]["hidden_0"]["kernel"])


@pytest.mark.slow
@pytest.mark.parametrize("grad_path", ["closed_form", "vmap"])
def test_conv_layers_equal_loop_of_grad(grad_path):
  """MNIST_CNN's convolutions (3x3, stride 1 and 2, explicit padding)."""
  module = models.MNISTCNN(num_outputs=3)
  batch = _batch(3, n=(3, 2, 3), image=True)
  params = module.init(jax.random.key(0), batch["x"][:1])["params"]
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  which = "conv1|conv2|conv4|classifier"
  names = layer_signals.select_params(params, which)
  assert len(names) == 8
  penalty, grads, _ = _penalty_and_grads(module, params, batch,
                                         _config(which, grad_path))
  expected = _loop_variances(module, params, batch, names)
  flat = np.concatenate([v.reshape(NUM_DOMAINS, -1) for v in expected.values()],
                        axis=1)
  np.testing.assert_allclose(penalty, ((flat - flat.mean(0)) ** 2).mean(),
                             rtol=1e-9)
  if grad_path == "closed_form":  # and the penalty's gradient, against vmap
    vmapped = _penalty_and_grads(module, params, batch, _config(which, "vmap"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8,
                                                         atol=1e-12),
                 grads, vmapped[1])


def test_closed_form_says_which_layers_it_cannot_cover():
  module = models.MNISTCNN(num_outputs=3)
  batch = _batch(3, n=(3, 2, 3), image=True)
  params = module.init(jax.random.key(0), batch["x"][:1])["params"]
  with pytest.raises(ValueError, match="neither"):  # GroupNorm's scale
    _penalty_and_grads(module, params, batch, _config("norm0", "closed_form"))
  with pytest.raises(ValueError, match="matches no parameter"):
    _penalty_and_grads(module, params, batch, _config("conv9", "closed_form"))

  class GroupedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
      features = nn.Conv(4, (3, 3), feature_group_count=2, name="conv")(
          jnp.concatenate([x, x], axis=-1)).mean(axis=(1, 2))
      return features, nn.Dense(3, name=models.HEAD)(features)

  grouped = GroupedConv()
  params = grouped.init(jax.random.key(0), batch["x"][:1])["params"]
  with pytest.raises(ValueError, match="grouped, dilated or masked"):
    _penalty_and_grads(grouped, params, batch, _config("conv", "closed_form"))


def test_bad_patterns_are_explained():
  _, params = _mlp(3)
  with pytest.raises(ValueError, match="matches no parameter.*hidden_0/kernel"):
    layer_signals.select_params(params, "decoder")
  with pytest.raises(ValueError, match="not a valid pattern"):
    layer_signals.select_params(params, "(")


@pytest.mark.parametrize("moment_sums", ["domain_blocks", "chunked", "auto"])
def test_fast_moments_give_the_reference_penalty_and_gradient(moment_sums):
  """Fishr over every layer of an MLP on the loaders' layout: the fast
  moment sums give the reference's penalty, gradient and moving average."""
  module, params = _mlp(3)
  batch = _batch(3, n=(6, 6, 6))
  want = _penalty_and_grads(module, params, batch,
                            _config("all", "closed_form", ema=0.9))
  got = _penalty_and_grads(module, params, batch,
                           _config("all", "closed_form", ema=0.9,
                                   moment_sums=moment_sums))
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-7)


def test_block_sums_declare_the_layout_they_need():
  module, _ = _mlp(3)
  network = algorithms.Network.from_module(module)
  needs = {m: algorithms.make_algorithm(
      "fishr", network, NUM_DOMAINS, _config("all", "closed_form",
                                             moment_sums=m)).needs_domain_blocks
           for m in ("reference", "chunked", "domain_blocks", "auto")}
  assert needs == {"reference": False, "chunked": False,
                   "domain_blocks": True, "auto": True}
