"""The one interface every algorithm implements, and the shared penalty recipe.

Most algorithms are a pure loss function

    loss_fn(params, state, batch, step, rng) -> (loss, (new_state, metrics))

over a batch {"x": (N, ...), "y": (N,), "domain": (N,) int} that holds every
training domain, plus `init_state(params, batch)` for whatever it carries
across steps (Fishr's moving averages, GroupDRO's weights; `()` for most).
`rng` is this step's key (dropout, Mixup's draws). The train step
differentiates `loss_fn` w.r.t. `params` and applies the run's optimizer
(`gradient_update`), so such an algorithm never sees the optimizer.
Algorithms call the model through a `Network`, which hides frozen
collections (batch statistics) and dropout plumbing.

An algorithm that must own its update, as DomainBed's `update()` does
(per-domain inner steps, edited gradients, meta updates), gives

    update(tx, params, opt_state, state, batch, step, rng)
        -> (params, opt_state, state, metrics)

instead: `tx` is the run's optax optimizer (call `tx.init` for a fresh inner
one), `opt_state` what `init_optimizer(tx, params)` made (default
`tx.init(params)`; e.g. a dict of named optimizer states). The train step
still resets `opt_state` to `init_optimizer`'s at the anneal step when the
Schedule asks, and checkpoints, resume, data parallelism and vectorized
groups see only these pure functions. An algorithm whose predictions are not
its network's logits (MTL's classifier reads noise beside the features;
ARM's reads a context shared by a support set of examples) gives
`predict(params, x, valid, rng) -> logits`, which evaluation calls; `valid`
(N,) bool marks the rows that are examples (evaluation pads a batch's tail),
which a predictor that mixes examples must keep apart from padding.

Each algorithm module owns a frozen `Config` dataclass with its own fields;
every algorithm shares one `Schedule` (penalty annealing, loss rescaling,
optimizer reset, L2). algorithms/settings.py builds both from each
experiment's config. Most invariance methods are "mean risk +
weight(step) * penalty"; `penalized` builds that from a penalty function so
each of them is a few lines.

Traced config fields: in a vectorized group (vectorized.py) every float
field of a Config, the Schedule's scalars, the learning rate and weight
decay may be a traced per-run value. Use them in arithmetic only; a Python
decision on one (an `if`, a shape, `range`) must go through `is_zero` or
`require`, or the field must not be a float (then runs share it).
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fishr_jax import errors
from fishr_jax import losses
from fishr_jax import penalties
from fishr_jax import ranges

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[PyTree, PyTree, Batch, jax.Array, jax.Array],
                  tuple[jax.Array, tuple[PyTree, Metrics]]]
# (tx, params, opt_state, state, batch, step, rng)
#   -> (params, opt_state, state, metrics)
UpdateFn = Callable[[optax.GradientTransformation, PyTree, PyTree, PyTree,
                     Batch, jax.Array, jax.Array],
                    tuple[PyTree, PyTree, PyTree, Metrics]]


@dataclasses.dataclass(frozen=True)
class Network:
  """A featurizer + linear head as pure functions of the trainable params.

  forward(params, x, rng) -> (features, logits); rng None means deterministic
  (evaluation). classify(params, features) -> logits applies only the head,
  reading its weights from params[models.HEAD].
  """
  forward: Callable[[PyTree, jax.Array, jax.Array | None],
                    tuple[jax.Array, jax.Array]]
  classify: Callable[[PyTree, jax.Array], jax.Array]

  @classmethod
  def from_module(cls, module: nn.Module, frozen: PyTree | None = None,
                  stochastic: bool = False) -> "Network":
    """Wraps a flax module whose __call__ returns (features, logits).

    frozen: non-trainable variable collections, e.g. {"batch_stats": ...}.
    stochastic: the module takes `deterministic=` and uses a "dropout" rng.
    """
    frozen = dict(frozen or {})

    def forward(params, x, rng=None):
      variables = {"params": params, **frozen}
      if not stochastic:
        return module.apply(variables, x)
      return module.apply(variables, x, deterministic=rng is None,
                          rngs=None if rng is None else {"dropout": rng})

    def classify(params, features):
      return module.apply({"params": params, **frozen}, features,
                          method="classify")

    return cls(forward=forward, classify=classify)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How the penalty enters the loss over training, shared by every
  algorithm (DomainBed's defaults; the IRM-setup script differs).

  penalty_anneal_iters: the step from which the full penalty weight applies.
  penalty_warmup_weight: the weight before it (DomainBed 0, IRM script 1.0).
  rescale_loss: divide the whole loss by the weight while it exceeds 1 (the
    IRM script keeps gradients in range this way).
  reset_optimizer_at_anneal: a fresh optimizer state at the anneal step
    (DomainBed, for algorithms with an anneal step).
  l2_regularizer_weight: weight of sum ||p||^2 over every parameter in the
    loss (the IRM script's explicit L2; DomainBed uses weight decay).
  """
  penalty_anneal_iters: int = ranges.field(0, ranges.COUNT, "a step")
  penalty_warmup_weight: float = ranges.field(0.0, ranges.NON_NEGATIVE,
                                              "a penalty weight")
  rescale_loss: bool = False
  reset_optimizer_at_anneal: bool = False
  l2_regularizer_weight: float = ranges.field(0.0, ranges.NON_NEGATIVE,
                                              "a penalty weight")

  def __post_init__(self):
    ranges.check_fields("schedule", self)

  def resets_optimizer(self, step: jax.Array) -> jax.Array | bool:
    """Whether the update of `step` starts from a fresh optimizer."""
    if not self.reset_optimizer_at_anneal:
      return False
    anneal = self.penalty_anneal_iters
    return (step == anneal) & (anneal > 0)


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """An algorithm: a `loss_fn`, or its own `update` (module docstring)."""
  name: str
  init_state: Callable[[PyTree, Batch], PyTree]
  loss_fn: LossFn | None = None
  update: UpdateFn | None = None
  # (tx, params) -> the opt_state an own `update` reads; None: tx.init.
  init_optimizer: Callable[[optax.GradientTransformation, PyTree],
                           PyTree] | None = None
  # (rng, the network's params, batch) -> every trained parameter: the
  # network's and, under their own keys, the algorithm's own networks'
  # (DANN's discriminator); the network ignores keys it does not have.
  init_params: Callable[[jax.Array, PyTree, Batch], PyTree] | None = None
  # True: the batch must come as the loaders give it (on each device, E
  # equal blocks of examples in domain order); parallel.shard_batch checks.
  needs_domain_blocks: bool = False
  # (params, x, valid, rng) -> logits at evaluation; None: the network's.
  predict: Callable[[PyTree, jax.Array, jax.Array, jax.Array],
                    jax.Array] | None = None

  def __post_init__(self):
    if (self.loss_fn is None) == (self.update is None):
      raise TypeError(f"Algorithm {self.name!r}: give exactly one of loss_fn "
                      "and update.")
    if self.init_optimizer is not None and self.update is None:
      raise TypeError(f"Algorithm {self.name!r}: init_optimizer goes with an "
                      "own update.")

  def step_update(self) -> UpdateFn:
    """The update the train step applies: the own one, or one gradient step
    of `loss_fn` with the run's optimizer."""
    return self.update or gradient_update(self.loss_fn)

  def logits_fn(self, network: Network
                ) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array],
                              jax.Array]:
    """(params, x, valid, rng) -> the logits evaluation scores: `predict`,
    or the network's deterministic forward pass (valid and rng unused)."""
    if self.predict is not None:
      return self.predict
    return lambda params, x, valid, rng: network.forward(params, x, None)[1]

  def fresh_optimizer(self, tx: optax.GradientTransformation,
                      params: PyTree) -> PyTree:
    """The optimizer state of step 0 (and of the anneal step's reset)."""
    if self.init_optimizer is None:
      return tx.init(params)
    return self.init_optimizer(tx, params)


def apply_gradients(tx: optax.GradientTransformation, grads: PyTree,
                    params: PyTree, opt_state: PyTree
                    ) -> tuple[PyTree, PyTree]:
  """(params, opt_state) after one step of `tx` along `grads`."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def gradient_update(loss_fn: LossFn) -> UpdateFn:
  """The plain update: the gradient of `loss_fn` w.r.t. params, one step of
  the run's optimizer."""

  def update(tx, params, opt_state, state, batch, step, rng):
    grads, (state, metrics) = jax.grad(loss_fn, has_aux=True)(
        params, state, batch, step, rng)
    params, opt_state = apply_gradients(tx, grads, params, opt_state)
    return params, opt_state, state, metrics

  return update


class Forward(NamedTuple):
  """What one forward pass over the training batch gives a penalty."""
  features: jax.Array  # (N, D), the head's inputs
  logits: jax.Array  # (N, C)
  domain_nll: jax.Array  # (E,), each domain's mean loss
  extras: Any = None  # what a custom forward_fn adds (Fishr: layer signals)


# (params, batch, rng) -> (features, logits, extras): the training forward
# pass; the default is the network's, with no extras.
ForwardFn = Callable[[PyTree, Batch, jax.Array | None],
                     tuple[jax.Array, jax.Array, Any]]


# A penalty sees the parameters, its carried state, the batch, the forward
# pass and the step's rng, and returns (scalar penalty, new state).
PenaltyFn = Callable[[PyTree, PyTree, Batch, Forward, jax.Array | None],
                     tuple[jax.Array, PyTree]]


def penalty_weight(step: jax.Array, lambda_: float,
                   schedule: Schedule) -> jax.Array:
  """`penalty_warmup_weight` before `penalty_anneal_iters`, `lambda_` from it
  (float32, or float64 under jax_enable_x64: 0.1 is not a float32)."""
  return jnp.where(step >= schedule.penalty_anneal_iters, lambda_,
                   schedule.penalty_warmup_weight).astype(float)


def squared_l2_norm(params: PyTree) -> jax.Array:
  """sum over all parameters, biases included, of ||p||^2 (not halved)."""
  return sum(jnp.sum(p**2) for p in jax.tree.leaves(params))


def is_traced(value: Any) -> bool:
  """Whether `value` is a traced array: a per-run value inside a vectorized
  step (vectorized.py), checked when that run's config was built."""
  return isinstance(value, jax.core.Tracer)


def require(ok: bool | jax.Array, message: str) -> None:
  """Raises errors.ConfigError(message) unless `ok`; a traced `ok` (see
  `is_traced`) was checked already."""
  if not is_traced(ok) and not ok:
    raise errors.ConfigError(message)


def is_zero(value: float | jax.Array) -> bool:
  """Whether a scalar option is zero, for the choices it makes about the
  program's structure (Fishr keeps no moving average when ema is 0). A
  traced value is not zero: runs are vectorized together only if they agree
  on which of their options are zero (vectorized.group_key)."""
  return not is_traced(value) and value == 0


def check_choices(block: str, **fields: tuple[Any, tuple[Any, ...]]) -> None:
  """Raises, naming `block.field`, unless each value is among its allowed."""
  for field, (value, allowed) in fields.items():
    if value not in allowed:
      raise errors.ConfigError(f"{block}.{field} must be one of {allowed}, got "
                               f"{value!r}.")


def zeros_like_output(fn: Callable[[PyTree], PyTree], params: PyTree) -> PyTree:
  """Zeros shaped like fn(params)'s output, without computing it."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      jax.eval_shape(fn, params))


def no_state(params: PyTree, batch: Batch) -> PyTree:
  del params, batch
  return ()


def domain_losses(network: Network, params: PyTree, batch: Batch,
                  num_domains: int, rng: jax.Array | None,
                  forward_fn: ForwardFn | None = None):
  """One forward pass: Forward(features, logits, domain_nll, extras) and
  metrics."""
  if forward_fn is None:
    features, logits = network.forward(params, batch["x"], rng)
    extras = None
  else:
    features, logits, extras = forward_fn(params, batch, rng)
  # A bfloat16 network's outputs; penalties and losses work in float32.
  features = losses.at_least_float32(features)
  logits = losses.at_least_float32(logits)
  per_example = losses.per_example_loss(logits, batch["y"])
  domain_nll = penalties.domain_mean(per_example, batch["domain"], num_domains)
  domain_acc = penalties.domain_mean(
      losses.correct(logits, batch["y"]), batch["domain"], num_domains)
  metrics = {"nll": domain_nll.mean(), "batch_acc": domain_acc.mean()}
  return Forward(features, logits, domain_nll, extras), metrics


def penalized(name: str, network: Network, num_domains: int,
              schedule: Schedule, lambda_: float,
              penalty_fn: PenaltyFn | None,
              init_state: Callable[[PyTree, Batch], PyTree] = no_state,
              forward_fn: ForwardFn | None = None,
              needs_domain_blocks: bool = False) -> Algorithm:
  """mean_e risk_e + l2 * ||params||^2 + weight(step) * penalty.

  With `schedule.rescale_loss` the whole loss is divided by the weight while
  it exceeds 1. `penalty_fn=None` is ERM: no penalty term and no rescaling.
  `forward_fn` replaces the network's forward pass (see `domain_losses`).
  """

  def loss_fn(params, state, batch, step, rng):
    forward, metrics = domain_losses(network, params, batch, num_domains, rng,
                                     forward_fn)
    loss = metrics["nll"] + l2_term(params, schedule)
    if penalty_fn is not None:
      penalty, state = penalty_fn(params, state, batch, forward, rng)
      weight = penalty_weight(step, lambda_, schedule)
      loss = loss + weight * penalty
      if schedule.rescale_loss:
        loss = jnp.where(weight > 1.0, loss / weight, loss)
      metrics.update(penalty=penalty, penalty_weight=weight)
    metrics["loss"] = loss
    return loss, (state, metrics)

  return Algorithm(name=name, init_state=init_state, loss_fn=loss_fn,
                   needs_domain_blocks=needs_domain_blocks)


# ------------------------------------- helpers of algorithms with own updates


def l2_term(params: PyTree, schedule: Schedule) -> jax.Array:
  """The Schedule's explicit L2 term (0 in DomainBed, which decays weights
  in the optimizer instead)."""
  return schedule.l2_regularizer_weight * squared_l2_norm(params)


def domain_gradients(network: Network, params: PyTree, batch: Batch,
                     num_domains: int, schedule: Schedule,
                     rng: jax.Array | None) -> tuple[PyTree, Forward, Metrics]:
  """Each domain's risk's gradient (leaves (E, ...)), from one forward pass:
  the gradient of risk_e + the Schedule's L2 term, as DomainBed's
  `autograd.grad(F.cross_entropy(network(x_e), y_e), params)` per domain."""

  def risks(p):
    forward, metrics = domain_losses(network, p, batch, num_domains, rng)
    return forward.domain_nll + l2_term(p, schedule), (forward, metrics)

  values, pullback, (forward, metrics) = jax.vjp(risks, params, has_aux=True)
  # One backward pass per domain, not vmap(pullback): XLA:CPU runs a conv
  # net's batched backward passes, and their own gradients (IGA), far slower.
  grads = [pullback(jax.nn.one_hot(e, num_domains, dtype=values.dtype))[0]
           for e in range(num_domains)]
  return jax.tree.map(lambda *g: jnp.stack(g), *grads), forward, metrics


def domain_block(batch: Batch, domain: int | jax.Array, num_domains: int,
                 shards: int) -> Batch:
  """Domain `domain`'s examples of a batch laid out in domain blocks
  (`Algorithm.needs_domain_blocks`: on each of `shards` devices, E equal
  blocks in domain order); `domain` may be traced."""

  def take(a):
    blocks = a.reshape((shards, num_domains, -1) + a.shape[1:])
    return jnp.take(blocks, domain, axis=1).reshape((-1,) + a.shape[1:])

  return jax.tree.map(take, batch)


def mean_risk(network: Network, params: PyTree, batch: Batch,
              schedule: Schedule, rng: jax.Array | None) -> jax.Array:
  """Cross-entropy over `batch`'s examples + the Schedule's L2 term."""
  _, logits = network.forward(params, batch["x"], rng)
  nll = losses.per_example_loss(losses.at_least_float32(logits),
                                batch["y"]).mean()
  return nll + l2_term(params, schedule)
