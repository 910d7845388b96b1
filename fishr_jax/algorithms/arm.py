"""ARM, Adaptive Risk Minimization (Zhang et al., 2021), as DomainBed's
context-network variant (ARM-CML).

A context network (DomainBed's ContextNet: three 5x5 convs, 64-64-1
channels, BatchNorm and ReLU between) maps each image to one channel; its
mean over a support set of examples is appended to every image of the set as
an extra input channel, and the network (built for C + 1 channels,
`added_input_channels=1`) classifies the result. The loss is ERM's
cross-entropy.

What DomainBed's code does, and this module with it:
- Support sets: in training, each domain's minibatch (DomainBed's
  `support_size` is the batch size, and the batch is the domains' minibatches
  in order); at evaluation, DomainBed's loaders give 64 examples of a split
  at a time (`EVAL_CHUNK`), and `predict` splits such a chunk into support
  sets of `support_size` when it divides the chunk's length, else keeps the
  chunk as one set (`support_sets`). One difference, chosen: DomainBed's
  eval loader draws its chunks from a fresh random permutation of the split
  at every evaluation (FastDataLoader's RandomSampler), so its ARM accuracy
  is itself random; here the chunks are consecutive in the split's order,
  which is already a seeded shuffle, so one evaluation draws from the same
  distribution and evaluating the same parameters twice gives the same
  accuracy.
- The context network is never trained: ERM's optimizer is built over the
  network's parameters before ARM adds it. So ARM owns its update, which
  steps the network alone, and keeps the context network's weights and its
  BatchNorm running statistics (torch's: momentum 0.1, unbiased running
  variance) under params[CONTEXT] and params[CONTEXT_STATS], where `predict`
  reads them. It trains in BatchNorm's training mode (batch statistics of
  the whole batch, every domain together) and predicts with the running
  statistics.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fishr_jax import losses
from fishr_jax import models
from fishr_jax import penalties
from fishr_jax import ranges
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

PyTree = Any
CONTEXT = "arm_context"  # the context network's weights
CONTEXT_STATS = "arm_context_stats"  # its BatchNorm running statistics
# The batch of DomainBed's evaluation loaders (scripts/train.py): the unit
# `predict` cuts into support sets.
EVAL_CHUNK = 64
_BN_MOMENTUM = 0.1  # torch's
_BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class Config:
  # examples per support set at evaluation (DomainBed: the batch size)
  support_size: int = ranges.field(64, ranges.POSITIVE_COUNT, "a batch size")

  def __post_init__(self):
    ranges.check_fields("arm", self)


DOMAINBED = registry.DomainBedSpec(
    name="ARM", hparams={},
    to_config=lambda h: {"support_size": int(h["batch_size"])})


class TorchBatchNorm(nn.Module):
  """torch's BatchNorm2d over NHWC: batch statistics in training (biased
  variance), running ones otherwise; the running variance is updated with
  the unbiased batch variance, as torch does."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), x.dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), x.dtype)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,),
                                 x.dtype)
    running_var = self.variable("batch_stats", "var", jnp.ones, (channels,),
                                x.dtype)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean, var = x.mean(axes), x.var(axes)
      count = x.size // channels
      running_mean.value = ((1 - _BN_MOMENTUM) * running_mean.value
                            + _BN_MOMENTUM * mean)
      running_var.value = ((1 - _BN_MOMENTUM) * running_var.value
                           + _BN_MOMENTUM * var * count / (count - 1))
    else:
      mean, var = running_mean.value, running_var.value
    return (x - mean) * jax.lax.rsqrt(var + _BN_EPSILON) * scale + bias


class ContextNet(nn.Module):
  """DomainBed's networks.ContextNet, NHWC: (N, H, W, C) -> (N, H, W, 1);
  torch's default initialization."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(2):
      x = models.torch_conv(64, (5, 5), x.shape[-1], f"conv{i}",
                            padding=((2, 2), (2, 2)))(x)
      x = models.relu(TorchBatchNorm(name=f"norm{i}")(x, train))
    return models.torch_conv(1, (5, 5), x.shape[-1], "conv2",
                             padding=((2, 2), (2, 2)))(x)


def support_sets(valid: jax.Array, support_size: int
                 ) -> tuple[jax.Array, int]:
  """(each row's support set (N,), the number of sets) at evaluation, for a
  batch that starts a split or follows batches of a multiple of EVAL_CHUNK
  rows, whose examples are its first valid.sum() rows (padding after).
  Chunks of EVAL_CHUNK rows are DomainBed's loader batches; a chunk of
  length L is L / support_size sets of support_size rows when that divides,
  else one set. Padding rows are in sets of their own (never read)."""
  rows = valid.shape[0]
  per_chunk = -(-EVAL_CHUNK // support_size)
  position = jnp.arange(rows)
  chunk, in_chunk = position // EVAL_CHUNK, position % EVAL_CHUNK
  length = jnp.clip(valid.sum() - chunk * EVAL_CHUNK, 0, EVAL_CHUNK)
  divides = length % support_size == 0
  sets = chunk * per_chunk + jnp.where(divides, in_chunk // support_size, 0)
  num_chunks = -(-rows // EVAL_CHUNK)
  return jnp.where(valid, sets, num_chunks * per_chunk), num_chunks * per_chunk + 1


def network_params(params: PyTree) -> PyTree:
  """The parameters ARM trains: everything but the context network's."""
  return {k: v for k, v in params.items() if k not in (CONTEXT, CONTEXT_STATS)}


@registry.register("arm", Config, DOMAINBED, added_input_channels=1)
def make(network: base.Network, num_domains: int, config: Config,
         schedule: base.Schedule, mesh: Any = None) -> base.Algorithm:
  del mesh  # the context's means are over the global batch
  context_net = ContextNet()

  def context(params, x, train):
    """(N, H, W, 1) context maps, and the new running statistics."""
    variables = {"params": params[CONTEXT],
                 "batch_stats": params[CONTEXT_STATS]}
    if not train:
      return context_net.apply(variables, x, False), params[CONTEXT_STATS]
    maps, updates = context_net.apply(variables, x, True,
                                      mutable=["batch_stats"])
    return maps, updates["batch_stats"]

  def with_context(x, maps, sets, num_sets):
    """x with each example's support set's mean context map appended (a set
    with no example has no mean, and no example reads it)."""
    means = penalties.domain_mean(maps, sets, num_sets)
    return jnp.concatenate([x, means[sets].astype(x.dtype)], axis=-1)

  def init_params(rng, params, batch):
    variables = context_net.init(rng, batch["x"][:1], False)
    return {**params, CONTEXT: variables["params"],
            CONTEXT_STATS: variables["batch_stats"]}

  def init_optimizer(tx, params):
    return tx.init(network_params(params))

  def update(tx, params, opt_state, state, batch, step, rng):
    del step
    maps, stats = context(params, batch["x"], train=True)
    x = with_context(batch["x"], jax.lax.stop_gradient(maps), batch["domain"],
                     num_domains)

    def loss_fn(trained):
      _, logits = network.forward(trained, x, rng)
      nll = losses.per_example_loss(losses.at_least_float32(logits),
                                    batch["y"])
      domain_nll = penalties.domain_mean(nll, batch["domain"], num_domains)
      loss = nll.mean() + base.l2_term(trained, schedule)
      return loss, {"loss": loss, "nll": domain_nll.mean()}

    grads, metrics = jax.grad(loss_fn, has_aux=True)(network_params(params))
    trained, opt_state = base.apply_gradients(tx, grads, network_params(params),
                                              opt_state)
    return ({**trained, CONTEXT: params[CONTEXT], CONTEXT_STATS: stats},
            opt_state, state, metrics)

  def predict(params, x, valid, rng):
    del rng
    maps, _ = context(params, x, train=False)
    sets, num_sets = support_sets(valid, config.support_size)
    x = with_context(x, maps, sets, num_sets)
    return network.forward(params, x, None)[1]

  return base.Algorithm(name="arm", init_state=base.no_state, update=update,
                        init_optimizer=init_optimizer, init_params=init_params,
                        predict=predict)


# DomainBed's ContextNet is an nn.Sequential: its index of each layer here
# (the ReLUs, 2 and 5, hold no weights). For the DomainBed vectors
# (tests/test_domainbed_updates.py).
_TORCH_LAYERS = {"0": "conv0", "1": "norm0", "3": "conv1", "4": "norm1",
                 "6": "conv2"}


def load_domainbed_extras(params: PyTree, alg_state: PyTree,
                          extras: dict[str, Any]) -> tuple[PyTree, PyTree]:
  """params with DomainBed's context_net weights and running statistics
  ({DomainBed name: torch-layout array})."""
  context = {}
  # Running statistics not in `extras` keep their initial 0 and 1 (torch's).
  stats = {layer: dict(v) for layer, v in params[CONTEXT_STATS].items()}
  for name, value in extras.items():
    _, _, index, leaf = name.split(".")  # context_net.context_net.<i>.<leaf>
    layer = _TORCH_LAYERS[index]
    value = jnp.asarray(value)
    if layer.startswith("conv"):
      context.setdefault(layer, {})[leaf.replace("weight", "kernel")] = (
          value.transpose(2, 3, 1, 0) if leaf == "weight" else value)
    elif leaf in ("weight", "bias"):
      context.setdefault(layer, {})["scale" if leaf == "weight" else "bias"] = value
    elif leaf in ("running_mean", "running_var"):
      stats.setdefault(layer, {})[leaf[len("running_"):]] = value
  return {**params, CONTEXT: context, CONTEXT_STATS: stats}, alg_state


def domainbed_extras(params: PyTree, alg_state: PyTree) -> dict[str, Any]:
  """{DomainBed name: torch-layout array} of the context network's weights
  and running statistics."""
  del alg_state
  out = {}
  for index, layer in _TORCH_LAYERS.items():
    prefix = f"context_net.context_net.{index}."
    if layer.startswith("conv"):
      out[prefix + "weight"] = params[CONTEXT][layer]["kernel"].transpose(
          3, 2, 0, 1)
      out[prefix + "bias"] = params[CONTEXT][layer]["bias"]
    else:
      out[prefix + "weight"] = params[CONTEXT][layer]["scale"]
      out[prefix + "bias"] = params[CONTEXT][layer]["bias"]
      out[prefix + "running_mean"] = params[CONTEXT_STATS][layer]["mean"]
      out[prefix + "running_var"] = params[CONTEXT_STATS][layer]["var"]
  return out
