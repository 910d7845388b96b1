"""Which parameters Fishr sees, and the Dense layers' per-example signals.

For a Dense layer y = a @ W + b inside a network, example i's loss gradient
is g^W_i = a_i (outer) delta_i and g^b_i = delta_i, where a_i is the layer's
input and delta_i = d loss_i / d y_i the signal backpropagated to its output.
`forward_with_signals` gets every chosen layer's (a, delta) from one forward
pass and one backward pass: the backward pass is taken w.r.t. zero
perturbations added to the layers' outputs, so it computes no weight
gradient. `penalties.dense_grad_variance` then gives the exact per-domain
variances at O(N * in * out * E) per layer, without materialising the
N x params per-example gradients that `vmap(grad)` needs.

This needs each example's loss to depend on that example only (true of
GroupNorm, LayerNorm and frozen BatchNorm; not of BatchNorm in train mode).
"""

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fishr_jax import losses
from fishr_jax import models

PyTree = Any
# (params, x, rng) -> (features, logits), as algorithms.Network.forward.
ForwardFn = Callable[[PyTree, jax.Array, jax.Array | None],
                     tuple[jax.Array, jax.Array]]


def param_names(params: PyTree) -> list[str]:
  """Every leaf's path, '/'-joined: 'hidden_0/kernel', 'classifier/bias'."""
  return ["/".join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def select_params(params: PyTree, which: str) -> list[str]:
  """The names of the parameters Fishr's penalty covers.

  which: "head" (the classifier, as the paper), "all", or a regular
  expression searched in each name, e.g. "hidden_1|classifier".
  """
  names = param_names(params)
  if which == "all":
    return names
  pattern = f"^{models.HEAD}/" if which == "head" else which
  try:
    chosen = [n for n in names if re.search(pattern, n)]
  except re.error as e:
    raise ValueError(f"fishr.params={which!r} is not a valid pattern: {e}.")
  if not chosen:
    raise ValueError(f"fishr.params={which!r} matches no parameter; the "
                     f"parameters are: {', '.join(names)}.")
  return chosen


def subtree(params: PyTree, names: list[str]) -> dict[str, jax.Array]:
  """{name: leaf} for the chosen names."""
  leaves = dict(zip(param_names(params), jax.tree.leaves(params)))
  return {n: leaves[n] for n in names}


def with_subtree(params: PyTree, chosen: dict[str, jax.Array]) -> PyTree:
  """`params` with the leaves named in `chosen` replaced."""
  names = param_names(params)
  leaves = [chosen.get(n, leaf) for n, leaf in zip(names,
                                                   jax.tree.leaves(params))]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def dense_layers(names: list[str]) -> dict[str, tuple[str, ...]]:
  """Group parameter names by layer: {'hidden_0': ('kernel', 'bias')}."""
  layers: dict[str, tuple[str, ...]] = {}
  for name in names:
    layer, _, leaf = name.rpartition("/")
    if leaf not in ("kernel", "bias"):
      raise ValueError(
          f"The closed form covers Dense layers' kernel and bias; {name!r} is "
          "neither. Use fishr.grad_path='vmap' for any parameter.")
    layers[layer] = layers.get(layer, ()) + (leaf,)
  return layers


def forward_with_signals(
    forward: ForwardFn, params: PyTree, x: jax.Array, rng: jax.Array | None,
    labels: jax.Array, layers: list[str]
) -> tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
  """One forward and one backward pass of `forward` that also return, for
  each named Dense layer, its inputs (N, in) and signals (N, out).

  Returns (features, logits, {layer: (inputs, signals)}); features and logits
  are those of the plain forward pass, and everything is differentiable
  w.r.t. `params` (the penalty's gradient goes back through the signals).
  """
  n = x.shape[0]
  kernels = subtree(params, [f"{layer}/kernel" for layer in layers])
  zeros = {layer: jnp.zeros((n, kernels[f"{layer}/kernel"].shape[-1]),
                            kernels[f"{layer}/kernel"].dtype)
           for layer in layers}

  def perturbed(perturbations):
    inputs = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      name = "/".join(module.path)
      if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
          or name not in perturbations):
        return next_fun(*args, **kwargs)
      if name in inputs:
        raise ValueError(f"Dense layer {name!r} is applied twice in one "
                         "forward pass; use fishr.grad_path='vmap'.")
      if args[0].ndim != 2:
        raise ValueError(f"Dense layer {name!r} gets inputs of shape "
                         f"{args[0].shape}; the closed form needs (N, in). "
                         "Use fishr.grad_path='vmap'.")
      inputs[name] = args[0]
      out = next_fun(*args, **kwargs)
      return out + perturbations[name].astype(out.dtype)

    with nn.intercept_methods(interceptor):
      features, logits = forward(params, x, rng)
    missing = sorted(set(perturbations) - set(inputs))
    if missing:
      raise ValueError(f"{missing} are not Dense layers called by the model's "
                       "forward pass; use fishr.grad_path='vmap'.")
    return logits, (features, inputs)

  logits, backward, (features, inputs) = jax.vjp(perturbed, zeros,
                                                 has_aux=True)
  # d sum_i loss_i / d y_i = d loss_i / d y_i: examples do not interact.
  (signals,) = backward(losses.loss_residual(logits, labels).astype(logits.dtype))
  return features, logits, {l: (inputs[l], signals[l]) for l in layers}
