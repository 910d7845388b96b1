"""Flax models. Every classifier is a featurizer followed by a linear head.

`__call__` returns `(features, logits)`: Fishr's closed form needs the head's
inputs, and the penalty's gradient must flow back into the featurizer. The
head's parameters live under the name `classifier` (kernel (D, C), bias (C,)),
so algorithms can address "the head" as `params["classifier"]`.

`dtype` is the compute dtype (None: float32; jnp.bfloat16 for GPU/TPU
speed); parameters stay float32, and the losses and Fishr's moments are
taken in float32 from the bfloat16 activations.
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fishr_jax import errors

HEAD = "classifier"
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """config.compute_dtype -> the modules' `dtype` argument."""
  if name not in COMPUTE_DTYPES:
    raise errors.ConfigError(
        f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
        f"got {name!r}.")
  return COMPUTE_DTYPES[name]


@functools.partial(jax.jit, static_argnums=0)
def init_variables(module: nn.Module, rng: jax.Array, x: jax.Array) -> Any:
  """module.init(rng, x), compiled once per module and input shape in a
  process (modules compare by value): the runs of a sweep or a group, and
  every test, share it."""
  return module.init(rng, x)


@jax.custom_jvp
def relu(x: jax.Array) -> jax.Array:
  """max(x, 0), whose derivative is a multiply by the mask sign(relu(x)).

  jax.nn.relu's derivative is a select, which XLA:CPU cannot fuse into the
  matmul that produces its operand; a multiply it can (YNNPACK dot fusion,
  fast_paths.cpu_compiler_options), so the backward matmul of the next layer
  runs as one fused kernel (docs/speed.md). The values are jax.nn.relu's, the
  derivative at 0 included (0).
  """
  return jnp.maximum(x, 0)


@relu.defjvp
def _relu_jvp(primals, tangents):
  x, = primals
  t, = tangents
  y = relu(x)
  # Not (x > 0).astype(...): XLA rewrites a multiply by a converted
  # comparison back into a select.
  return y, t * jnp.sign(y)


class Dropout(nn.Module):
  """flax's nn.Dropout (the same mask and scaling for the same rng) for a
  rate in [0, 1), which may also be a traced per-run value of a vectorized
  program (vectorized.py): a traced rate of 0 keeps every input, as 0
  does."""
  rate: float

  def __post_init__(self):
    traced = isinstance(self.rate, jax.core.Tracer)
    if not traced and not 0.0 <= self.rate < 1.0:
      raise errors.ConfigError(f"The dropout rate must be in [0, 1), got "
                               f"{self.rate}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or (not isinstance(self.rate, jax.core.Tracer)
                         and self.rate == 0.0):
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
    return jax.lax.select(mask, x / jnp.asarray(keep, x.dtype),
                          jnp.zeros_like(x))


# --- PyTorch's default initialization ---------------------------------------


def torch_default_init(fan_in: int) -> tuple[jax.nn.initializers.Initializer,
                                             jax.nn.initializers.Initializer]:
  """(kernel_init, bias_init) of a torch nn.Linear / nn.Conv2d with `fan_in`
  inputs per output (in_features; in_channels * kh * kw).

  torch draws the weight with kaiming_uniform_(a=sqrt(5)), whose bound is
  gain * sqrt(3 / fan_in) with gain sqrt(2 / (1 + a^2)) = sqrt(1/3): that is
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), jax's variance_scaling(1/3, "fan_in",
  "uniform"), which reads fan_in off a Flax kernel (in, out) or
  (kh, kw, in, out) itself. The bias is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  too; its initializer only sees the bias's shape, hence the argument. The
  kernel initializer checks that its shape has this fan_in, so the two
  cannot disagree. (torch's GroupNorm / BatchNorm start at weight 1, bias 0,
  as Flax's scale and bias do.)
  """
  if fan_in < 1:
    raise ValueError(f"fan_in must be positive, got {fan_in}.")
  bound = 1.0 / math.sqrt(fan_in)
  kaiming_uniform = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

  def kernel_init(key, shape, dtype=jnp.float32):
    if math.prod(shape[:-1]) != fan_in:
      raise ValueError(f"Kernel of shape {tuple(shape)} has fan_in "
                       f"{math.prod(shape[:-1])}, not {fan_in}.")
    return kaiming_uniform(key, shape, dtype)

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return kernel_init, bias_init


def torch_dense(features: int, in_features: int, name: str | None = None,
                dtype: Any = None) -> nn.Dense:
  """nn.Dense(features) initialized as torch's nn.Linear(in_features,
  features)."""
  kernel_init, bias_init = torch_default_init(in_features)
  return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init,
                  dtype=dtype, name=name)


def torch_conv(features: int, kernel_size: tuple[int, int], in_channels: int,
               name: str | None = None, dtype: Any = None,
               **conv_kwargs) -> nn.Conv:
  """nn.Conv(features, kernel_size, **conv_kwargs) initialized as torch's
  nn.Conv2d(in_channels, features, kernel_size) (bias included)."""
  kernel_init, bias_init = torch_default_init(in_channels * math.prod(kernel_size))
  return nn.Conv(features, kernel_size, kernel_init=kernel_init,
                 bias_init=bias_init, dtype=dtype, name=name, **conv_kwargs)


class MLP(nn.Module):
  """Flatten, then ReLU dense layers, then a linear head.

  The IRM-setup Colored MNIST network (392-H-H-1): Xavier-uniform weights and
  zero biases everywhere, as in the official script.
  """
  hidden_dims: Sequence[int]
  num_outputs: int
  dtype: Any = None

  def setup(self):
    dense = lambda n, name: nn.Dense(
        n, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros, dtype=self.dtype, name=name)
    self.hidden = [dense(n, f"hidden_{i}") for i, n in enumerate(self.hidden_dims)]
    self.classifier = dense(self.num_outputs, HEAD)

  def featurize(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = relu(layer(x))
    return x

  def classify(self, features: jax.Array) -> jax.Array:
    return self.classifier(features)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = self.featurize(x)
    return features, self.classify(features)


class DomainBedMLP(nn.Module):
  """DomainBed's networks.MLP: Linear(in, width), then depth - 2 hidden
  Linear(width, width), each followed by dropout and ReLU, then
  Linear(width, num_outputs) with no activation; torch's default
  initialization. DANN's discriminator (its mlp_* hparams)."""
  width: int
  depth: int
  num_outputs: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    names = ["input"] + [f"hidden_{i}" for i in range(self.depth - 2)]
    for name in names:
      x = torch_dense(self.width, x.shape[-1], name)(x)
      x = relu(Dropout(self.dropout_rate)(x, deterministic))
    return torch_dense(self.num_outputs, x.shape[-1], "output")(x)


class MNISTCNN(nn.Module):
  """DomainBed's MNIST_CNN featurizer (4 convs 64-128-128-128, each followed
  by ReLU then GroupNorm(8), global average pool: 128-d) and a linear head.
  Inputs NHWC (28, 28, C).

  Every conv and the head start as torch's nn.Conv2d / nn.Linear do
  (`torch_default_init`), as DomainBed's network does. A conv's bias bound
  depends on its input channels, which conv1 learns from the input, so the
  convs are built in `featurize` (compact) and the head in `setup` (so that
  `classify` can run alone).
  """
  num_outputs: int
  dtype: Any = None

  _WIDTHS = (64, 128, 128, 128)
  _STRIDES = (1, 2, 1, 1)

  def setup(self):
    self.classifier = torch_dense(self.num_outputs, self._WIDTHS[-1], HEAD,
                                  self.dtype)

  @nn.compact
  def featurize(self, x: jax.Array) -> jax.Array:
    for i, (width, stride) in enumerate(zip(self._WIDTHS, self._STRIDES)):
      conv = torch_conv(width, (3, 3), x.shape[-1], f"conv{i + 1}", self.dtype,
                        strides=stride, padding=((1, 1), (1, 1)))
      # torch GroupNorm's epsilon is 1e-5 (flax's default is 1e-6).
      norm = nn.GroupNorm(num_groups=8, epsilon=1e-5, dtype=self.dtype,
                          name=f"norm{i}")
      x = norm(relu(conv(x)))
    return x.mean(axis=(1, 2))

  def classify(self, features: jax.Array) -> jax.Array:
    return self.classifier(features)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = self.featurize(x)
    return features, self.classify(features)
