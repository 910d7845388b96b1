"""Flax models. Every classifier is a featurizer followed by a linear head.

`__call__` returns `(features, logits)`: Fishr's closed form needs the head's
inputs, and the penalty's gradient must flow back into the featurizer. The
head's parameters live under the name `classifier` (kernel (D, C), bias (C,)),
so algorithms can address "the head" as `params["classifier"]`.

`dtype` is the compute dtype (None: float32; jnp.bfloat16 for GPU/TPU
speed); parameters stay float32, and the losses and Fishr's moments are
taken in float32 from the bfloat16 activations.
"""

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


class MNISTCNN(nn.Module):
  """DomainBed's MNIST_CNN featurizer (4 convs 64-128-128-128, each followed
  by ReLU then GroupNorm(8), global average pool: 128-d) and a linear head.
  Inputs NHWC (28, 28, C)."""
  num_outputs: int
  dtype: Any = None

  def setup(self):
    conv = lambda n, stride, name: nn.Conv(
        n, (3, 3), strides=stride, padding=((1, 1), (1, 1)), dtype=self.dtype,
        name=name)
    self.convs = [conv(64, 1, "conv1"), conv(128, 2, "conv2"),
                  conv(128, 1, "conv3"), conv(128, 1, "conv4")]
    # torch GroupNorm's epsilon is 1e-5 (flax's default is 1e-6).
    self.norms = [nn.GroupNorm(num_groups=8, epsilon=1e-5, dtype=self.dtype,
                               name=f"norm{i}") for i in range(4)]
    self.classifier = nn.Dense(self.num_outputs, dtype=self.dtype, name=HEAD)

  def featurize(self, x: jax.Array) -> jax.Array:
    for conv, norm in zip(self.convs, self.norms):
      x = norm(relu(conv(x)))
    return x.mean(axis=(1, 2))

  def classify(self, features: jax.Array) -> jax.Array:
    return self.classifier(features)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = self.featurize(x)
    return features, self.classify(features)
