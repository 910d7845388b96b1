"""Which parameters Fishr sees, and its layers' per-example signals.

For a Dense layer y = a @ W + b inside a network, example i's loss gradient
is g^W_i = a_i (outer) delta_i and g^b_i = delta_i, where a_i is the layer's
input and delta_i = d loss_i / d y_i the signal backpropagated to its output.
`forward_with_signals` gets every chosen layer's (a, delta) from one forward
pass and one backward pass: the backward pass is taken w.r.t. zero
perturbations added to the layers' outputs, so it computes no weight
gradient. `penalties.dense_grad_variance` then gives the exact per-domain
variances at O(N * in * out * E) per layer, without materialising the
N x params per-example gradients that `vmap(grad)` needs. A Conv layer's
per-example gradients are a sum over positions, which does not factor: they
are built for that layer alone from its input patches and signals (N x the
layer's parameters), still without a per-example backward pass.

This needs each example's loss to depend on that example only (true of
GroupNorm, LayerNorm and frozen BatchNorm; not of BatchNorm in train mode).
"""

import re
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fishr_jax import errors
from fishr_jax import losses
from fishr_jax import models
from fishr_jax import penalties

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
    raise errors.ConfigError(
        f"fishr.params={which!r} is not a valid pattern: {e}.")
  if not chosen:
    raise errors.ConfigError(
        f"fishr.params={which!r} matches no parameter; the "
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


def group_by_layer(names: list[str]) -> dict[str, tuple[str, ...]]:
  """Group parameter names by layer: {'hidden_0': ('kernel', 'bias')}."""
  layers: dict[str, tuple[str, ...]] = {}
  for name in names:
    layer, _, leaf = name.rpartition("/")
    if leaf not in ("kernel", "bias"):
      raise ValueError(
          f"The closed form covers Dense and Conv layers' kernel and bias; "
          f"{name!r} is neither. Use fishr.grad_path='vmap' for any parameter.")
    layers[layer] = layers.get(layer, ()) + (leaf,)
  return layers


class ConvGeometry(NamedTuple):
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  padding: str | tuple[tuple[int, int], tuple[int, int]]


class LayerSignals(NamedTuple):
  """One layer's inputs, and each example's loss gradient w.r.t. its output
  (shaped like the output); `conv` is None for a Dense layer."""
  inputs: jax.Array
  signals: jax.Array
  conv: ConvGeometry | None


def _pair(value, what: str, name: str) -> tuple[int, int]:
  value = (value, value) if isinstance(value, int) else tuple(value)
  if len(value) != 2:
    raise ValueError(f"Conv layer {name!r}: the closed form needs 2-D "
                     f"convolutions, got {what}={value}.")
  return value


def _conv_geometry(module: nn.Conv, name: str) -> ConvGeometry:
  """The layer's window, checked to be a plain 2-D convolution."""
  unit = lambda v: v is None or all(d == 1 for d in _pair(v, "dilation", name))
  if (module.feature_group_count != 1 or not unit(module.kernel_dilation)
      or not unit(module.input_dilation) or module.mask is not None):
    raise ValueError(f"Conv layer {name!r} is grouped, dilated or masked; "
                     "use fishr.grad_path='vmap'.")
  padding = module.padding
  if isinstance(padding, int):
    padding = ((padding, padding),) * 2
  elif not isinstance(padding, str):
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise ValueError(f"Conv layer {name!r} pads {padding!r}; the closed form "
                     "takes SAME, VALID or explicit padding. Use "
                     "fishr.grad_path='vmap'.")
  return ConvGeometry(_pair(module.kernel_size, "kernel_size", name),
                      _pair(module.strides or 1, "strides", name), padding)


def layer_grad_variance(
    layer: LayerSignals, domain_ids: jax.Array, num_domains: int,
    centered: bool = True,
    dense_variance: Callable[..., dict[str, jax.Array]] = (
        penalties.dense_grad_variance)) -> dict[str, jax.Array]:
  """Per-domain variance of the layer's per-example kernel and bias
  gradients, {"kernel": (E, *kernel.shape), "bias": (E, *bias.shape)}.

  Dense: `dense_variance` (penalties.dense_grad_variance, or a form of
  fast_paths.py). Conv: penalties.conv_grad_variance of its input patches.
  """
  if layer.conv is None:
    return dense_variance(layer.inputs, layer.signals, domain_ids, num_domains,
                          centered)
  patches = penalties.conv_patches(layer.inputs, layer.conv.kernel_size,
                                   layer.conv.strides, layer.conv.padding,
                                   layer.signals.shape[1:3])
  return penalties.conv_grad_variance(patches, layer.signals, domain_ids,
                                      num_domains, centered)


def _is_covered(module: nn.Module) -> bool:
  return type(module) in (nn.Dense, nn.Conv)  # not subclasses: their math may differ


def forward_with_signals(
    forward: ForwardFn, params: PyTree, x: jax.Array, rng: jax.Array | None,
    labels: jax.Array, layers: list[str]
) -> tuple[jax.Array, jax.Array, dict[str, LayerSignals]]:
  """One forward and one backward pass of `forward` that also return, for
  each named Dense or Conv layer, its inputs and per-example signals.

  Returns (features, logits, {layer: LayerSignals}); features and logits
  are those of the plain forward pass, and everything is differentiable
  w.r.t. `params` (the penalty's gradient goes back through the signals).
  """
  # d sum_i loss_i / d y_i = d loss_i / d y_i: examples do not interact.
  features, logits, (signals,) = forward_with_backprops(
      forward, params, x, rng, layers,
      lambda logits: [losses.loss_residual(logits, labels)])
  return features, logits, signals


def forward_with_backprops(
    forward: ForwardFn, params: PyTree, x: jax.Array, rng: jax.Array | None,
    layers: list[str],
    cotangents: Callable[[jax.Array], list[jax.Array]]
) -> tuple[jax.Array, jax.Array, list[dict[str, LayerSignals]]]:
  """`forward_with_signals` for any cotangents at the logits: one forward
  pass, then one backward pass per array of `cotangents(logits)` (each
  like the logits), whose signals at each named layer's output it returns
  (a list of {layer: LayerSignals}, in the cotangents' order)."""
  wanted = set(layers)
  # Static facts seen while tracing: each layer's window and output shape.
  geometry: dict[str, ConvGeometry | None] = {}
  outputs: dict[str, jax.ShapeDtypeStruct] = {}

  def run(perturbations):
    inputs = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      name = "/".join(module.path)
      if (context.method_name != "__call__" or name not in wanted
          or not _is_covered(module)):
        return next_fun(*args, **kwargs)
      if name in inputs:
        raise ValueError(f"Layer {name!r} is applied twice in one forward "
                         "pass; use fishr.grad_path='vmap'.")
      x = args[0]
      if isinstance(module, nn.Conv):
        geometry[name] = _conv_geometry(module, name)
        if x.ndim != 4:
          raise ValueError(f"Conv layer {name!r} gets inputs of shape "
                           f"{x.shape}; the closed form needs NHWC.")
      else:
        geometry[name] = None
        if x.ndim != 2:
          raise ValueError(f"Dense layer {name!r} gets inputs of shape "
                           f"{x.shape}; the closed form needs (N, in). Use "
                           "fishr.grad_path='vmap'.")
      inputs[name] = x
      out = next_fun(*args, **kwargs)
      outputs[name] = jax.ShapeDtypeStruct(out.shape, out.dtype)
      if perturbations is None:
        return out
      return out + perturbations[name].astype(out.dtype)

    with nn.intercept_methods(interceptor):
      features, logits = forward(params, x, rng)
    missing = sorted(wanted - set(inputs))
    if missing:
      raise ValueError(f"{missing} are not Dense or Conv layers called by the "
                       "model's forward pass; use fishr.grad_path='vmap'.")
    return logits, (features, inputs)

  jax.eval_shape(lambda: run(None))  # fills `outputs`
  zeros = {name: jnp.zeros(out.shape, jnp.promote_types(out.dtype, jnp.float32))
           for name, out in outputs.items()}
  logits, backward, (features, inputs) = jax.vjp(run, zeros, has_aux=True)
  per_cotangent = []
  for cotangent in cotangents(logits):
    (signals,) = backward(cotangent.astype(logits.dtype))
    per_cotangent.append({
        name: LayerSignals(inputs[name], signals[name], geometry[name])
        for name in layers})
  return features, logits, per_cotangent


# ------------------------------------------- the chosen layers, for Fishr


def chosen_layers(params: PyTree, which: str) -> dict[str, tuple[str, ...]]:
  """{layer: its chosen leaves} for fishr.params = `which`."""
  return group_by_layer(select_params(params, which))


def forward_with_chosen_signals(forward: ForwardFn, which: str, params: PyTree,
                                x: jax.Array, rng: jax.Array | None,
                                labels: jax.Array):
  """`forward_with_signals` for the layers `which` chooses."""
  return forward_with_signals(forward, params, x, rng, labels,
                              list(chosen_layers(params, which)))


def chosen_layer_variances(
    signals: dict[str, LayerSignals], params: PyTree, which: str,
    domain_ids: jax.Array, num_domains: int, centered: bool,
    dense_variance: Callable[..., dict[str, jax.Array]]) -> PyTree:
  """{layer: {leaf: (E, ...) variance}} of the chosen layers, in closed form
  from the signals `forward_with_chosen_signals` recorded."""
  out = {}
  for layer, leaves in chosen_layers(params, which).items():
    variance = layer_grad_variance(signals[layer], domain_ids, num_domains,
                                   centered, dense_variance)
    out[layer] = {leaf: variance[leaf] for leaf in leaves}
  return out


def chosen_per_example_grads(forward: ForwardFn, params: PyTree, which: str,
                             x: jax.Array, labels: jax.Array,
                             rng: jax.Array | None,
                             chunk_size: int | None = None) -> PyTree:
  """vmap(grad) of each example's loss w.r.t. the chosen parameters, one
  forward pass per example (each with its own dropout key)."""
  def example_loss(chosen, x, y, key=None):
    _, logits = forward(with_subtree(params, chosen), x[None], key)
    return losses.per_example_loss(logits, y[None])[0]

  examples = (x, labels)
  if rng is not None:
    examples += (jax.random.split(rng, x.shape[0]),)
  return penalties.per_example_grads(
      example_loss, subtree(params, select_params(params, which)), *examples,
      chunk_size=chunk_size)


def head_per_example_grads(classify: Callable[[PyTree, jax.Array], jax.Array],
                           params: PyTree, features: jax.Array,
                           labels: jax.Array,
                           chunk_size: int | None = None) -> PyTree:
  """vmap(grad) of each example's loss w.r.t. the head alone, from the
  features the forward pass already computed."""
  def example_loss(head, z, y):
    logits = classify({**params, models.HEAD: head}, z[None])
    return losses.per_example_loss(logits, y[None])[0]

  return penalties.per_example_grads(example_loss, params[models.HEAD],
                                     features, labels, chunk_size=chunk_size)
