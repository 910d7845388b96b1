"""Flax models. Every classifier is a featurizer followed by a linear head.

`__call__` returns `(features, logits)`: Fishr's closed form needs the head's
inputs, and the penalty's gradient must flow back into the featurizer. The
head's parameters live under the name `classifier` (kernel (D, C), bias (C,)),
so algorithms can address "the head" as `params["classifier"]`.
"""

from typing import Sequence

import flax.linen as nn
import jax

HEAD = "classifier"


class MLP(nn.Module):
  """Flatten, then ReLU dense layers, then a linear head.

  The IRM-setup Colored MNIST network (392-H-H-1): Xavier-uniform weights and
  zero biases everywhere, as in the official script.
  """
  hidden_dims: Sequence[int]
  num_outputs: int

  def setup(self):
    dense = lambda n, name: nn.Dense(
        n, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros, name=name)
    self.hidden = [dense(n, f"hidden_{i}") for i, n in enumerate(self.hidden_dims)]
    self.classifier = dense(self.num_outputs, HEAD)

  def featurize(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = nn.relu(layer(x))
    return x

  def classify(self, features: jax.Array) -> jax.Array:
    return self.classifier(features)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = self.featurize(x)
    return features, self.classify(features)
