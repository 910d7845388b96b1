"""The models' building blocks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import traverse_util

from fishr_jax import models
from fishr_jax import resnet


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


# --- Initialization: PyTorch's defaults on DomainBed's networks -------------
#
# torch is not needed: the expectations are torch's documented formulas.
# nn.Linear / nn.Conv2d: weight kaiming_uniform_(a=sqrt(5)) and bias both
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_features or
# in_channels * kh * kw; torchvision's ResNet convs kaiming_normal_(fan_out,
# relu), N(0, 2 / fan_out); norms weight 1, bias 0. Each layer's values are
# pooled over SEEDS initializations, so even a 10-class bias is a sample of
# a few hundred; the tolerances are several standard errors of that sample,
# and Flax's defaults (lecun-normal kernels, zero biases) fail them.

SEEDS = 24


def _uniform_check(values, bound: float, what: str) -> None:
  """`values` look like draws of U(-bound, bound)."""
  x = np.asarray(values, np.float64).ravel()
  n = x.size
  assert np.any(x != 0), f"{what}: all zero"
  assert np.abs(x).max() <= bound * (1 + 1e-6), (
      f"{what}: {np.abs(x).max()} outside +-{bound}")
  # U(-b, b) has std b/sqrt(3); the sample std's relative error has std
  # sqrt(0.2 / n) (kurtosis 9/5).
  ratio = x.std() / (bound / np.sqrt(3))
  assert abs(ratio - 1) < 6 * np.sqrt(0.2 / n), f"{what}: std ratio {ratio}"
  assert abs(x.mean()) < 6 * bound / np.sqrt(3 * n), f"{what}: mean {x.mean()}"
  # Standardized, not `args=`: scipy 1.18's kstest breaks on "norm" with args.
  p = scipy.stats.kstest((x + bound) / (2 * bound), "uniform").pvalue
  assert p > 1e-4, f"{what}: not uniform (KS p={p})"


def _normal_check(values, std: float, what: str) -> None:
  """`values` look like draws of N(0, std^2), untruncated."""
  x = np.asarray(values, np.float64).ravel()
  n = x.size
  ratio = x.std() / std
  assert abs(ratio - 1) < 6 * np.sqrt(0.5 / n), f"{what}: std ratio {ratio}"
  p = scipy.stats.kstest(x / std, "norm").pvalue
  assert p > 1e-4, f"{what}: not N(0, {std}^2) (KS p={p})"


def _pooled(init, seeds: int = SEEDS) -> dict:
  """{path: every seed's values, stacked} of `init(key)` (a params tree)."""
  init = jax.jit(init)  # compiled once: a loop, not a vmap, is the quick one
  draws = [traverse_util.flatten_dict(init(key))
           for key in jax.random.split(jax.random.key(0), seeds)]
  return {"/".join(k): np.stack([d[k] for d in draws]) for k in draws[0]}


@pytest.mark.parametrize("channels", [2, 1])  # ColoredMNIST, RotatedMNIST
def test_mnist_cnn_starts_as_torch(channels):
  module = models.MNISTCNN(num_outputs=10)
  x = jnp.zeros((1, 28, 28, channels))
  params = _pooled(lambda key: module.init(key, x)["params"])
  # DomainBed's MNIST_CNN: Conv2d(C, 64, 3), Conv2d(64, 128, 3, stride 2),
  # Conv2d(128, 128, 3) twice, GroupNorm(8, .) after each; Linear(128, 10).
  fan_ins = {"conv1": channels * 9, "conv2": 64 * 9, "conv3": 128 * 9,
             "conv4": 128 * 9, models.HEAD: 128}
  layers = {path.rsplit("/", 1)[0] for path in params}
  assert layers == set(fan_ins) | {f"norm{i}" for i in range(4)}
  for layer, fan_in in fan_ins.items():
    kernel = params[f"{layer}/kernel"]
    assert np.prod(kernel.shape[1:-1]) == fan_in, (layer, kernel.shape)
    for leaf in ("kernel", "bias"):
      _uniform_check(params[f"{layer}/{leaf}"], 1 / np.sqrt(fan_in),
                     f"{layer}/{leaf}")
  for i in range(4):
    np.testing.assert_array_equal(params[f"norm{i}/scale"], 1)
    np.testing.assert_array_equal(params[f"norm{i}/bias"], 0)
  # `classify` alone (how a fresh head is drawn) draws the whole model's head.
  key = jax.random.split(jax.random.key(0), SEEDS)[0]
  alone = module.init(key, jnp.zeros((1, 128)), method="classify")["params"]
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(alone[models.HEAD][leaf],
                                  params[f"{models.HEAD}/{leaf}"][0])


def test_resnet_fresh_head_starts_as_torch_linear():
  model = resnet.ResNet(depth=50, num_classes=7)
  backbone = {"params": {}, "batch_stats": {}}  # only the head is drawn
  head = _pooled(lambda key: resnet.with_fresh_head(model, backbone, key)[
      "params"][models.HEAD])
  bound = 1 / np.sqrt(2048)
  assert head["kernel"].shape[1:] == (2048, 7)
  _uniform_check(head["kernel"], bound, "kernel")
  _uniform_check(head["bias"], bound, "bias")


def test_random_resnet_layers_start_as_torchvision():
  """A ResNet from random weights, as torchvision's: convs N(0, 2 / fan_out)
  (kaiming_normal_, fan_out, relu), BatchNorm weight 1 / bias 0 with
  statistics 0 / 1. The stem and a Bottleneck with its downsample (every
  conv is `resnet._conv`); the head is the fresh head's module, above."""
  key = jax.random.key(0)
  stem = resnet._conv(64, 7, 2, "conv1").init(key, jnp.zeros((1, 8, 8, 3)))
  block = resnet._ResidualBlock(width=32, strides=2, downsample=True,
                                bottleneck=True)
  variables = jax.jit(block.init)(key, jnp.zeros((1, 8, 8, 64)))
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict({"stem": stem, "block": variables}).items()}
  kernels = [p for p in flat if p.endswith("/kernel")]
  assert len(kernels) == 5, kernels  # stem, 1x1, 3x3, 1x1, downsample
  for path in kernels:
    kh, kw, _, out = flat[path].shape
    _normal_check(flat[path], np.sqrt(2 / (out * kh * kw)), path)
  for path, value in flat.items():
    name = path.rsplit("/", 1)[-1]
    if name != "kernel":
      assert name in ("scale", "bias", "mean", "var"), path
      np.testing.assert_array_equal(value, name in ("scale", "var"), path)


def test_torch_default_init_checks_the_kernel_fan_in():
  kernel_init, _ = models.torch_default_init(12)
  assert kernel_init(jax.random.key(0), (2, 2, 3, 5)).shape == (2, 2, 3, 5)
  with pytest.raises(ValueError, match="fan_in 18, not 12"):
    kernel_init(jax.random.key(0), (3, 3, 2, 5))


def test_colored_mnist_mlp_keeps_the_irm_scripts_init():
  """The IRM script's MLP: Xavier-uniform weights, zero biases (not torch's
  defaults: its numbers depend on it)."""
  module = models.MLP(hidden_dims=(390, 390), num_outputs=1)
  params = _pooled(lambda key: module.init(key, jnp.zeros((1, 14, 14, 2)))[
      "params"], seeds=4)
  for layer, (fan_in, fan_out) in {"hidden_0": (392, 390),
                                   "hidden_1": (390, 390),
                                   models.HEAD: (390, 1)}.items():
    _uniform_check(params[f"{layer}/kernel"], np.sqrt(6 / (fan_in + fan_out)),
                   f"{layer}/kernel")
    np.testing.assert_array_equal(params[f"{layer}/bias"], 0)
