"""Per-example losses and accuracies for the two kinds of classifier head.

A head with one output unit is binary (sigmoid + BCE, float labels in {0, 1});
a head with C > 1 outputs is a softmax classifier (integer labels in [0, C)).
Every function here works on a batch (logits (N, C)) and on one example
(logits (C,)), so it can sit inside `jax.vmap(jax.grad(...))`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def is_binary(logits: jax.Array) -> bool:
  return logits.shape[-1] == 1


def at_least_float32(x: jax.Array) -> jax.Array:
  """bfloat16 activations -> float32; float32 and float64 stay as they are.
  Losses and Fishr's moments are always taken in float32 or wider."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_labels(logits: jax.Array, labels: jax.Array) -> None:
  """ValueError if concrete `labels` (not traced) are not the head's: in
  {0, 1} for a binary head, integers in [0, C) for C outputs (optax's
  cross-entropy takes any other value without a word)."""
  if isinstance(labels, jax.core.Tracer):
    return
  values = np.asarray(labels)
  if values.size == 0:
    return
  if is_binary(logits):
    if not np.isin(values, (0, 1)).all():
      raise ValueError("A binary head's labels must be 0 or 1, got values "
                       f"in [{values.min()}, {values.max()}].")
  elif not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or (
      values.max() >= logits.shape[-1]):
    raise ValueError(f"Labels must be integers in [0, {logits.shape[-1]}) "
                     f"for {logits.shape[-1]} outputs, got {values.dtype} "
                     f"values in [{values.min()}, {values.max()}].")


def per_example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Each example's own loss (no reduction): shape logits.shape[:-1]."""
  check_labels(logits, labels)
  logits = at_least_float32(logits)
  if is_binary(logits):
    return optax.sigmoid_binary_cross_entropy(
        logits[..., 0], labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def loss_residual(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """d per_example_loss / d logits, shape like logits.

  softmax(logits) - onehot(labels), or sigmoid(logit) - label for a binary
  head. The per-example gradient of a linear head is this residual times
  [features; 1], which is what the closed-form variance builds on.
  """
  check_labels(logits, labels)
  if is_binary(logits):
    return jax.nn.sigmoid(logits) - labels.astype(logits.dtype)[..., None]
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return jax.nn.softmax(logits) - one_hot


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the prediction is right (binary: logit > 0), else 0.0."""
  if is_binary(logits):
    prediction = (logits[..., 0] > 0).astype(jnp.float32)
    return (prediction == labels.astype(jnp.float32)).astype(jnp.float32)
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
